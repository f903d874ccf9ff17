"""Invalid config files: each exits 2 with one line naming the file and the key path, no traceback.

Most run in-process through `proxy.__main__.main([...])` (fast); a handful through the real CLI
(`python -m proxy --config F --check-config`) as subprocesses.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from proxy.__main__ import main

from ..conftest import CANARY, ROOT, TEST_KEY

PROG = "openai-resilience-proxy: config error: "

# (id, YAML text, key path the message must name, a fragment of the message)
CASES: list[tuple[str, str, str, str]] = [
    # unknown keys at every level
    ("unknown top-level key", "listne: {port: 1}\n", "", "unknown key 'listne'"),  # the path is the parent's
    ("unknown key in listen", "listen: {prot: 1}\n", "listen", "unknown key 'prot'"),
    ("unknown key in admin", "admin: {hots: x}\n", "admin", "unknown key 'hots'"),
    ("unknown key in upstream", "upstream: {uri: http://x}\n", "upstream", "unknown key 'uri'"),
    ("unknown key in log", "log: {lvl: info}\n", "log", "unknown key 'lvl'"),
    ("unknown key in defaults", "defaults: {timeout: {}}\n", "defaults", "unknown key 'timeout'"),
    ("unknown key in defaults.timeouts", "defaults: {timeouts: {read: 1s}}\n", "defaults.timeouts",
     "unknown key 'read'"),
    ("unknown key in defaults.retry", "defaults: {retry: {attempts: 2}}\n", "defaults.retry", "unknown key 'attempts'"),
    ("unknown key in defaults.retry.backoff", "defaults: {retry: {backoff: {jitter: full}}}\n",
     "defaults.retry.backoff", "unknown key 'jitter'"),
    ("unknown key in defaults.retry.budget", "defaults: {retry: {budget: {percent: 20}}}\n",
     "defaults.retry.budget", "unknown key 'percent'"),
    ("unknown key in defaults.breaker", "defaults: {breaker: {threshold: 3}}\n", "defaults.breaker",
     "unknown key 'threshold'"),
    ("unknown key in a route", "routes: [{name: a, path: /v1/a, retries: 2}]\n", "routes[0]", "unknown key 'retries'"),
    ("unknown key in a route's timeouts", "routes: [{name: a, path: /v1/a, timeouts: {ttfb: 1s}}]\n",
     "routes[0].timeouts", "unknown key 'ttfb'"),
    ("unknown key in a route's backoff", "routes: [{name: a, path: /v1/a, retry: {backoff: {min: 1s}}}]\n",
     "routes[0].retry.backoff", "unknown key 'min'"),
    ("unknown key in a route's breaker", "routes: [{name: a, path: /v1/a, breaker: {open_for: 1s}}]\n",
     "routes[0].breaker", "unknown key 'open_for'"),
    # wrong types
    ("port is text", "listen: {port: eighty}\n", "listen.port", "expected a port number from 0 to 65535"),
    ("port out of range", "admin: {port: 70000}\n", "admin.port", "65535"),
    ("max_connections zero", "upstream: {max_connections: 0}\n", "upstream.max_connections", ">= 1"),
    ("max_attempts zero", "defaults: {retry: {max_attempts: 0}}\n", "defaults.retry.max_attempts", ">= 1"),
    ("max_attempts fractional", "defaults: {retry: {max_attempts: 2.5}}\n", "defaults.retry.max_attempts",
     "expected an integer"),
    ("retry_on a string", "defaults: {retry: {retry_on: server}}\n", "defaults.retry.retry_on", "expected a list"),
    ("workers zero", "workers: 0\n", "workers", ">= 1"),
    ("log level unknown", "log: {level: verbose}\n", "log.level", "expected one of debug, info, warning, error"),
    ("duration without a unit", "shutdown_grace: 5\n", "shutdown_grace", 'expected a duration like "250ms"'),
    ("routes a mapping", "routes: {chat: /v1/chat}\n", "routes", "expected a list"),
    ("a route a string", "routes: [chat]\n", "routes[0]", "expected a mapping"),
    ("defaults a list", "defaults: [1, 2]\n", "defaults", "expected a mapping"),
    ("size unparsable", "defaults: {retry: {replay_limit: 1 potato}}\n", "defaults.retry.replay_limit",
     'expected a size like "64KiB"'),
    ("multiplier below 1", "defaults: {retry: {backoff: {multiplier: 0.5}}}\n", "defaults.retry.backoff.multiplier",
     ">= 1"),
    ("negative budget ratio", "defaults: {retry: {budget: {ratio: -0.1}}}\n", "defaults.retry.budget.ratio", ">= 0"),
    # negative and zero durations
    ("negative connect timeout", "defaults: {timeouts: {connect: -1s}}\n", "defaults.timeouts.connect",
     "expected a duration"),
    ("negative route idle", "routes: [{name: a, path: /v1/a, timeouts: {idle: -5ms}}]\n", "routes[0].timeouts.idle",
     "expected a duration"),
    ("zero total", "defaults: {timeouts: {total: 0s}}\n", "defaults.timeouts.total", "above zero"),
    ("zero budget window", "defaults: {retry: {budget: {window: 0ms}}}\n", "defaults.retry.budget.window",
     "above zero"),
    # max < initial
    ("backoff max below initial", "defaults: {retry: {backoff: {initial: 2s, max: 1s}}}\n",
     "defaults.retry.backoff.max", "must not be less than backoff.initial"),
    ("route backoff max below initial", "routes: [{name: a, path: /v1/a, retry: {backoff: {initial: 10s}}}]\n",
     "routes[0].retry.backoff.max", "must not be less than backoff.initial"),
    # bad path patterns
    ("path without a slash", "routes: [{name: a, path: v1/chat}]\n", "routes[0].path", "starting with '/'"),
    ("star in the middle", "routes: [{name: a, path: /v1/*/content}]\n", "routes[0].path", "'*' is allowed only"),
    ("unclosed parameter", "routes: [{name: a, path: '/v1/{id'}]\n", "routes[0].path", "bad parameter segment"),
    ("empty segment", "routes: [{name: a, path: /v1//chat}]\n", "routes[0].path", "empty segment"),
    ("bare slash", "routes: [{name: a, path: /}]\n", "routes[0].path", "matches nothing"),
    ("parameter twice", "routes: [{name: a, path: '/v1/{id}/x/{id}'}]\n", "routes[0].path", "appears twice"),
    ("path a number", "routes: [{name: a, path: 5}]\n", "routes[0].path", "expected a path starting with '/', got 5"),
    ("route without a path", "routes: [{name: a}]\n", "routes[0]", "missing required key 'path'"),
    # names
    ("duplicate route names", "routes: [{name: a, path: /v1/a}, {name: a, path: /v1/b}]\n", "routes[1].name",
     "duplicate route name 'a'"),
    ("route named default", "routes: [{name: default, path: /v1/a}]\n", "routes[0].name", "'default'"),
    ("route name with a space", "routes: [{name: 'my route', path: /v1/a}]\n", "routes[0].name", "'my route'"),
    ("lower-case method", "routes: [{name: a, path: /v1/a, methods: [get]}]\n", "routes[0].methods[0]",
     "upper-case HTTP method"),
    # unknown categories
    ("unknown retry_on category", "defaults: {retry: {retry_on: [connect, servr]}}\n", "defaults.retry.retry_on[1]",
     "expected one of connect, network"),
    ("unknown breaker category", "defaults: {breaker: {count: [timeouts]}}\n", "defaults.breaker.count[0]",
     "expected one of"),
    ("circuit_open is not a retry category", "routes: [{name: a, path: /v1/a, retry: {retry_on: [circuit_open]}}]\n",
     "routes[0].retry.retry_on[0]", "expected one of"),
    # breaker groups, URLs
    ("breaker group set up twice", "routes: [{name: a, path: /v1/a, breaker: {group: g}},"
     " {name: b, path: /v1/b, breaker: {group: g, failure_threshold: 2}}]\n", "routes[1].breaker",
     "breaker group 'g' is set up differently"),
    ("upstream not http", "upstream: {url: 'ftp://example.com'}\n", "upstream.url", "http:// or https://"),
    ("upstream with a query", "upstream: {url: 'https://example.com/?key=1'}\n", "upstream.url", "without query"),
    # the file itself
    ("YAML syntax error", "listen: {port: 1\n", "line 2, column 1", "YAML syntax error"),
    ("top level a list", "- listen\n- admin\n", "", "expected a mapping of settings at the top level"),
]


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("PROXY_"):
            monkeypatch.delenv(name)


def _expect_one_line(err: str, path: Path, key: str, fragment: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    where = f"{path}: {key}: " if key else f"{path}: "
    assert lines[0].startswith(PROG + where), f"{lines[0]!r} does not start with {PROG + where!r}"
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("text,key,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_config_exits_2_naming_file_and_key(tmp_path, capsys, leaks, text, key, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["--config", str(path), "--check-config"]) == 2
    out, err = capsys.readouterr()
    leaks.texts.append(out + err)
    assert out == ""
    _expect_one_line(err, path, key, fragment)


def test_missing_and_unreadable_files(tmp_path, capsys):
    for path, fragment in ((tmp_path / "absent.yaml", "file not found"), (tmp_path, "cannot read the file"),
                           (_write_bytes(tmp_path / "latin1.yaml", b"listen: {host: \xe9}\n"), "cannot read")):
        assert main(["--config", str(path), "--check-config"]) == 2
        _expect_one_line(capsys.readouterr().err, path, "", fragment)


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


SUBPROCESS_CASES = ["unknown key in a route's backoff", "negative connect timeout", "backoff max below initial",
                    "star in the middle", "duplicate route names", "unknown breaker category"]


async def test_real_cli_exits_2_without_traceback(tmp_path):
    """The same checks through `python -m proxy` itself: a handful, in parallel."""
    table = {c[0]: c for c in CASES}

    async def run(name: str) -> None:
        _, text, key, fragment = table[name]
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(text)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--config", str(path), "--check-config", cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2, (name, err)
        assert out == b""
        _expect_one_line(err.decode(), path, key, fragment)

    await asyncio.gather(*(run(name) for name in SUBPROCESS_CASES))


# A key pasted where it does not belong: an Azure-style `api-key=` query or a user:password in the
# upstream URL, in the file, the environment or a flag. The error (or --check-config's echo of the
# effective config) must not print it back; a CI log or a terminal recording would keep it.
SECRET_SPOTS = [
    ("file: key in the URL query", ["--config", "{file}"], {}, f"upstream: {{url: 'https://example.com/v1?api-key={TEST_KEY}'}}\n"),
    ("file: key as a bad enum value", ["--config", "{file}"], {}, f"log: {{level: {TEST_KEY}}}\n"),
    ("env: key in the URL query", [], {"PROXY_UPSTREAM_URL": f"https://example.com/?key={TEST_KEY}"}, None),
    ("flag: key as URL password", ["--upstream", f"ftp://user:{TEST_KEY}@example.com"], {}, None),
    ("valid: key as URL password, --check-config", ["--config", "{file}"], {},
     f"upstream: {{url: 'https://user:{TEST_KEY}@example.com'}}\n"),
]


def test_config_messages_never_print_the_api_key(tmp_path, capsys, monkeypatch):
    printed = {}
    for name, args, env, text in SECRET_SPOTS:
        file = tmp_path / "secret.yaml"
        if text is not None:
            file.write_text(text)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        main([a.format(file=file) for a in args] + ["--check-config"])
        for var in env:
            monkeypatch.delenv(var)
        out, err = capsys.readouterr()
        printed[name] = CANARY in out + err
    assert not any(printed.values()), f"the key was printed for: {[n for n, hit in printed.items() if hit]}"
