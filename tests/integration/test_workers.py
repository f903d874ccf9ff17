"""--workers N: one port, N processes, one /metrics summing them, one log line per request."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp

from ..conftest import write_config

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _metric(admin: str, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/metrics") as r:
            text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def test_two_workers_share_the_port_and_the_metrics(tmp_path, mock, proxy_process):
    path = write_config(tmp_path, mock.url)
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0", "--workers", "2")
    startup = next(line for line in p.lines if line["event"] == "startup")
    assert startup["workers"] == 2 and len(startup["pids"]) == 2
    n = 40
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time: the kernel spreads them
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one() -> int:
            async with s.post(p.traffic + "/v1/chat/completions", json=CHAT) as r:
                await r.read()
                return r.status
        assert await asyncio.gather(*[one() for _ in range(n)]) == [200] * n
    assert await _metric(p.admin, "openai_proxy_requests_total") == n
    assert await _metric(p.admin, "openai_proxy_in_flight_requests") == 0

    # every line is out before a worker is killed (SIGKILL loses what a worker has not flushed yet)
    counted = 0

    def nth(line: dict) -> bool:
        nonlocal counted
        counted += 1
        return counted == n
    await p.wait_event("request", where=nth)

    # a worker that dies is replaced, and the port keeps answering
    os.kill(startup["pids"][0], signal.SIGKILL)
    await p.wait_event("worker_exited")
    await p.wait_event("worker_started", where=lambda line: line["pid"] not in startup["pids"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(10):
            async with s.post(p.traffic + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
    # the dead worker's requests still count; nothing of it stays in flight
    assert await _metric(p.admin, "openai_proxy_requests_total") == n + 10
    assert await _metric(p.admin, "openai_proxy_in_flight_requests") == 0

    p.signal()
    code, out, err = await p.finish()
    assert code == 0, err
    lines = p.lines + [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert sum(1 for x in lines if x.get("event") == "request") == n + 10
    assert "Traceback" not in err, err


async def test_workers_leave_when_the_supervisor_is_killed(tmp_path, mock, proxy_process):
    """SIGKILL leaves the supervisor no time to stop its workers: each sees its pipe close, drains and
    exits, instead of serving on without metrics, reloads or restarts."""
    path = write_config(tmp_path, mock.url)
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0", "--workers", "2")
    pids = next(line for line in p.lines if line["event"] == "startup")["pids"]
    p.signal(signal.SIGKILL)
    code, out, _ = await p.finish()  # returns once every worker has closed the output pipe: they exited
    gone = [json.loads(line) for line in out.splitlines() if '"supervisor_gone"' in line]
    assert code == -signal.SIGKILL and sorted(line["pid"] for line in gone) == sorted(pids)
