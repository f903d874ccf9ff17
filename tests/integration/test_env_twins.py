"""Environment twins through the real command line: every flag has a PROXY_* twin, and a PROXY_* name
that is no setting gets one warning line on stderr naming it (and the setting it is close to), never its value."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import yaml

from tests.conftest import TEST_KEY, LeakCheck, spawn_proxy

WARN = "openai-resilience-proxy: warning: "
SECRET_URL = f"https://example.com/v1?key={TEST_KEY}"  # a value that must never be printed back


async def _run(*args: str, env: dict[str, str], leaks: LeakCheck) -> tuple[int, str, str]:
    p = await spawn_proxy(*args, env=env, wait_listening=False)
    code, out, err = await p.finish()
    leaks.texts.append(out + err)
    return code, out, err


def _effective(out: str) -> dict:
    return yaml.safe_load(out)


async def test_every_flag_has_an_environment_twin_that_takes_effect(tmp_path: Path, leaks: LeakCheck):
    """--help lists every flag; each setting flag names its twin there, and the twin sets the value
    (beating the file, beaten by the flag). A new flag without a twin, or without a row here, fails."""
    code, out, err = await _run("--help", env={}, leaks=leaks)
    assert code == 0, err
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", out)) - {"--help", "--check-config"}
    path = tmp_path / "c.yaml"
    path.write_text("shutdown_grace: 7s\nlisten: {port: 7000}\nlog: {format: json}\n")
    twins = {  # flag: (variable, value, where the effective config shows it, as shown)
        "--config": ("PROXY_CONFIG", str(path), ("shutdown_grace",), "7s"),
        "--host": ("PROXY_HOST", "127.0.0.3", ("listen", "host"), "127.0.0.3"),
        "--port": ("PROXY_PORT", "7001", ("listen", "port"), 7001),
        "--admin-port": ("PROXY_ADMIN_PORT", "7101", ("admin", "port"), 7101),
        "--upstream": ("PROXY_UPSTREAM_URL", "http://up.example:9", ("upstream", "url"), "http://up.example:9"),
        "--workers": ("PROXY_WORKERS", "3", ("workers",), 3),
        "--log-level": ("PROXY_LOG_LEVEL", "debug", ("log", "level"), "debug"),
        "--log-format": ("PROXY_LOG_FORMAT", "console", ("log", "format"), "console"),
    }
    assert flags == set(twins), "a flag without a row here: give it a PROXY_* twin and a row"
    for flag, (var, *_) in twins.items():
        assert re.search(rf"{flag} \S+\s+.*?\(env {var}[;)]", " ".join(out.split())), f"--help: {flag} names {var}"
    code, out, err = await _run("--check-config", env={var: value for var, value, *_ in twins.values()}, leaks=leaks)
    assert code == 0 and err == "", err
    doc = _effective(out)
    for flag, (var, _, keys, shown) in twins.items():
        got = doc
        for key in keys:
            got = got[key]
        assert got == shown, f"{var} did not set {'.'.join(keys)}"
    # the flag still beats its twin
    code, out, err = await _run("--check-config", "--log-format", "json", env={"PROXY_LOG_FORMAT": "console"},
                                leaks=leaks)
    assert code == 0 and _effective(out)["log"]["format"] == "json"


async def test_a_bad_log_format_twin_exits_2_naming_it(leaks: LeakCheck):
    code, out, err = await _run("--check-config", env={"PROXY_LOG_FORMAT": "xml"}, leaks=leaks)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == ("openai-resilience-proxy: config error: "
                           "PROXY_LOG_FORMAT: expected one of json, console, got 'xml'")


UNKNOWN = {  # name: what its warning says after "is not a setting; "
    "PROXY_UPSTREAM": "did you mean PROXY_UPSTREAM_URL?",  # the case: it went to api.openai.com
    "PROXY_LISTEN_PORT": "did you mean PROXY_PORT?",  # guessed from the config key listen.port
    "PROXY_LOGFORMAT": "did you mean PROXY_LOG_FORMAT?",
    "PROXY_WORKER": "did you mean PROXY_WORKERS?",
    "PROXY_CONFIG_FILE": "did you mean PROXY_CONFIG?",
    "proxy_log_level": "did you mean PROXY_LOG_LEVEL?",  # names are case-sensitive: ignored too
    "PROXY_API_KEY": "ignored (--help lists the PROXY_* variables)",  # close to none: named all the same
    "PROXY_CHECK_CONFIG": "--check-config is a command with no environment twin; pass the flag",
}


async def test_each_unknown_proxy_variable_gets_one_warning_naming_it_never_its_value(leaks: LeakCheck):
    code, out, err = await _run("--check-config", env=dict.fromkeys(UNKNOWN, SECRET_URL), leaks=leaks)
    assert code == 0, err
    assert err.splitlines() == [f"{WARN}{name} is not a setting; {UNKNOWN[name]}" for name in sorted(UNKNOWN)]
    assert "example.com" not in out + err  # nor any part of the value
    assert _effective(out)["upstream"]["url"] == "https://api.openai.com"  # ignored, as before, but not silently


async def test_kubernetes_service_links_are_one_line_and_a_warning_keeps_the_exit_code(leaks: LeakCheck):
    """A Service named `proxy` injects PROXY_SERVICE_HOST, PROXY_PORT_3128_TCP... into a sidecar's pod:
    one line for the lot. A bad value still exits 2, the warning before its error line."""
    links = {"PROXY_SERVICE_HOST": "10.0.0.5", "PROXY_SERVICE_PORT": "3128",
             "PROXY_PORT_3128_TCP": "tcp://10.0.0.5:3128"}
    code, out, err = await _run("--check-config", env=links | {"PROXY_UPSTREM_URL": SECRET_URL, "PROXY_PORT": "http"},
                                leaks=leaks)
    assert code == 2, err
    assert err.splitlines() == [
        f"{WARN}PROXY_UPSTREM_URL is not a setting; did you mean PROXY_UPSTREAM_URL?",
        f"{WARN}PROXY_PORT_3128_TCP, PROXY_SERVICE_HOST, PROXY_SERVICE_PORT: Kubernetes service links for a Service"
        " named proxy, not settings; ignored (enableServiceLinks: false drops them)",
        "openai-resilience-proxy: config error: PROXY_PORT: expected a port number from 0 to 65535, got 'http'",
    ]
    assert "10.0.0.5" not in err and "example.com" not in err


async def test_a_running_proxy_warns_once_even_with_workers(mock, proxy_process, leaks: LeakCheck):
    """The warning is the supervisor's, at startup: spawned workers do not repeat it."""
    p = await proxy_process("--port", "0", "--admin-port", "0", "--workers", "2",
                            env={"PROXY_UPSTREAM_URL": mock.url, "PROXY_UPSTREAM": SECRET_URL})
    p.signal(signal.SIGTERM)
    code, out, err = await p.finish()
    leaks.texts.append(out + err)
    assert code == 0 and "Traceback" not in err, err
    assert err.count("PROXY_UPSTREAM is not a setting") == 1, err
    assert "example.com" not in err
