"""The command line as a user meets it: a real process, real ports, exit codes, no tracebacks."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import spawn_proxy, write_config

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    p = await spawn_proxy(*args, env=env, wait_listening=False)
    return await p.finish()


async def test_check_config_prints_effective_config_and_exits_0():
    code, out, err = await _run("--check-config", "--port", "8181", "--upstream", "http://upstream.example:9")
    assert code == 0, err
    doc = yaml.safe_load(out)
    assert doc["listen"] == {"host": "127.0.0.1", "port": 8181, "max_connections": 4096}
    assert doc["upstream"]["url"] == "http://upstream.example:9"
    assert doc["defaults"]["timeouts"] == {"connect": "5s", "first_byte": "10m", "idle": "5m", "total": "15m"}


async def test_environment_beats_file_and_flags_beat_environment(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("listen: {port: 7000, host: 127.0.0.2}\nadmin: {port: 7100}\n")
    code, out, err = await _run("--check-config", "--port", "7002",
                                env={"PROXY_CONFIG": str(path), "PROXY_PORT": "7001", "PROXY_ADMIN_PORT": "7101"})
    assert code == 0, err
    doc = yaml.safe_load(out)
    assert doc["listen"] == {"host": "127.0.0.2", "port": 7002, "max_connections": 4096}
    assert doc["admin"]["port"] == 7101


@pytest.mark.parametrize("text, message", [
    ("defaults:\n  retry:\n    backoff: {initial: fast}\n",
     'config.yaml: defaults.retry.backoff.initial: expected a duration like "250ms", "5s" or "2m", got \'fast\''),
    ("routes:\n  - name: a\n    path: /v1/{id}x\n", "config.yaml: routes[0].path: bad parameter segment '{id}x'"),
    ("listen: [\n", "config.yaml: line 2, column 1: YAML syntax error"),
])
async def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path, text: str, message: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    for args in (("--config", str(path)), ("--config", str(path), "--check-config")):
        code, out, err = await _run(*args)
        assert code == 2
        assert message in err
        assert "Traceback" not in err and "Traceback" not in out
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, env, message", [
    (("--config", "/nonexistent/proxy.yaml"), {}, "/nonexistent/proxy.yaml: file not found"),
    ((), {"PROXY_PORT": "http"}, "PROXY_PORT: expected a port number from 0 to 65535, got 'http'"),
    (("--upstream", "localhost:8000"), {}, "--upstream: expected an http:// or https:// base URL"),
    (("--workers", "0"), {}, "--workers: expected an integer >= 1, got '0'"),
    (("--log-format", "xml"), {}, "--log-format: expected one of json, console, got 'xml'"),
    ((), {"PROXY_LOG_LEVEL": "loud"}, "PROXY_LOG_LEVEL: expected one of debug, info, warning, error, got 'loud'"),
])
async def test_bad_flags_and_environment_exit_2(args, env, message):
    code, out, err = await _run(*args, env=env)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_workers_run_the_checked_config_and_never_parse_it_again(tmp_path: Path, mock, proxy_process):
    """Workers get the supervisor's parsed config: one restarted after the file went bad still
    runs what was checked at startup (a worker that read the file again could not start)."""
    path = write_config(tmp_path, mock.url)
    p = await proxy_process("--port", "0", "--admin-port", "0", "--workers", "2", env={"PROXY_CONFIG": str(path)})
    pids = next(line for line in p.lines if line["event"] == "startup")["pids"]
    path.write_text("listen: {port: nope}\n")
    os.kill(pids[0], signal.SIGKILL)
    await p.wait_event("worker_started", where=lambda line: line["pid"] not in pids)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            async with s.post(p.traffic + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
    p.signal()
    code, out, err = await p.finish()
    assert code == 0 and "Traceback" not in err, err


async def test_port_in_use_is_a_clear_startup_error(proxy_process):
    first = await proxy_process("--port", "0", "--admin-port", "0")
    port = first.traffic.rsplit(":", 1)[1]
    code, out, err = await _run("--port", port, "--admin-port", "0")
    assert code == 3
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


async def test_console_script_is_installed():
    script = Path(sys.executable).parent / "openai-resilience-proxy"
    assert script.exists() or shutil.which("openai-resilience-proxy"), "pip install . must install the script"


async def test_runs_on_builtin_defaults_and_serves_admin(proxy_process):
    p = await proxy_process("--port", "0", "--admin-port", "0")
    startup = next(line for line in p.lines if line["event"] == "startup")
    assert startup["config_source"] == "built-in defaults"
    assert startup["config"]["upstream"]["url"] == "https://api.openai.com"
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + "/healthz") as r:
            assert r.status == 200
        async with s.get(p.admin + "/readyz") as r:
            assert r.status == 200
        async with s.get(p.admin + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    p.signal()
    code, out, err = await p.finish()
    assert code == 0 and "Traceback" not in err
