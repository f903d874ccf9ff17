"""Load and overload: an upstream that is down, and one slower than the clients' deadline."""

from __future__ import annotations

import asyncio
import collections
import socket
import time

import aiohttp

from .soak import open_fds, parse_metrics, rss_kib
from proxy.testing import Delay, MockUpstream

from ..conftest import TEST_KEY, write_config
from .procs import draining, idle_fds, poll

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _metrics(admin: str) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(admin + "/metrics") as r:
            return parse_metrics(await r.text())


def _total(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for key, v in metrics.get(name, {}).items() if all((k, want) in key for k, want in labels.items()))


async def test_upstream_down_1000_concurrent_answers_stay_fast(tmp_path, proxy_process):
    closed = socket.socket()  # bound, never listening: every connect is refused
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    path = write_config(tmp_path, f"http://127.0.0.1:{port}",
                        {"defaults": {"breaker": {"failure_threshold": 5, "reset_timeout": "500ms"}}})
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    try:
        async with draining(p):
            await _down_then_up(p, closed, port)
    finally:
        closed.close()


async def _down_then_up(p, closed: socket.socket, port: int) -> None:
    fds_before, rss_before = await idle_fds(p.proc.pid), rss_kib(p.proc.pid)

    async def one(s: aiohttp.ClientSession) -> tuple[int, str, float]:
        began = time.monotonic()
        async with asyncio.timeout(10):
            async with s.post(p.traffic + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                await r.read()
                return r.status, r.headers.get("x-proxy-error", ""), time.monotonic() - began

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        results = await asyncio.gather(*(one(s) for _ in range(1000)))
    rss_after = rss_kib(p.proc.pid)
    answers = collections.Counter((status, code) for status, code, _ in results)
    assert set(answers) <= {(502, "upstream_connect_error"), (503, "circuit_open")}, answers
    print(f"upstream down, 1000 concurrent: {dict(answers)}")
    latencies = sorted(t for *_, t in results)  # printed, not asserted: a busy machine moves them
    m = await _metrics(p.admin)
    attempts = _total(m, "openai_proxy_attempts_total")
    latencies_ms = [round(1000 * latencies[i]) for i in (500, 990, 999)]
    print(f"  {attempts:.0f} upstream attempts; p50/p99/max {latencies_ms} ms; RSS {rss_before} -> {rss_after} KiB")
    # without the breaker 3000 (3 attempts each). A burst that arrives at once is admitted while the breaker
    # is still closed (each request asks it before its first failure is recorded); the open breaker then
    # stops every retry and answers every later request at once.
    assert attempts < 1200, f"{attempts:.0f} connection attempts for 1000 requests: the breaker did not cut retries"
    assert rss_after - rss_before < 40 * 1024, f"RSS grew {(rss_after - rss_before) / 1024:.1f} MiB"
    assert await poll(lambda: open_fds(p.proc.pid) <= fds_before, 10), (open_fds(p.proc.pid), fds_before)

    # the upstream comes back on the same port: after reset_timeout a probe closes the breaker
    # and the pool serves a full load again (it was not exhausted by the outage)
    closed.close()
    revived = MockUpstream(keepalive_timeout=0.5)
    await revived.start(port=port)
    try:
        async with aiohttp.ClientSession() as s:
            async def healed() -> bool:
                async with s.post(p.traffic + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                    await r.read()
                    return r.status == 200

            assert await poll(healed, 10)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            results = await asyncio.gather(*(one(s) for _ in range(300)))
        assert collections.Counter(status for status, *_ in results) == {200: 300}
        assert max(t for *_, t in results) < 5
    finally:
        await revived.close()
    assert await poll(lambda: open_fds(p.proc.pid) <= fds_before, 10), (open_fds(p.proc.pid), fds_before)


async def test_slow_upstream_under_load_no_pile_up_and_clear_504s(start_proxy, mock: MockUpstream, recorder):
    """The upstream answers in 10 s, the clients' deadline is the proxy's 1 s total: at most
    max_connections (8) requests ever reach the upstream at once, the rest wait for the pool and
    time out with a 504, and nothing hangs."""
    proxy = await start_proxy({
        "upstream": {"max_connections": 8},
        "defaults": {"timeouts": {"connect": "1s", "first_byte": "300ms", "idle": "300ms", "total": "1s"},
                     "breaker": {"failure_threshold": 100_000}},  # this test is about the pool, not the breaker
    })
    mock.script("/v1/chat/completions", *[Delay(10)] * 1000)
    mock.reset_peak()

    async def one(s: aiohttp.ClientSession) -> tuple[int, str, str, float]:
        began = time.monotonic()
        async with asyncio.timeout(4):  # total + a margin: a hang fails here
            async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                body = await r.json()
                return r.status, r.headers.get("x-proxy-error", ""), body["error"]["message"], time.monotonic() - began

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        results = await asyncio.gather(*(one(s) for _ in range(200)))
    assert collections.Counter((status, code) for status, code, *_ in results) == {(504, "upstream_timeout"): 200}
    assert mock.peak_active <= 8, f"{mock.peak_active} upstream requests at once with max_connections 8"
    waited = [msg for *_, msg, _ in results if "total timeout of 1s" in msg]
    assert waited, "no request was queued for a connection: the load did not exceed the pool"
    assert len(mock.received) < 200  # fewer upstream calls than client requests, never 200 x 3
    assert all(r.category == "timeout" for r in recorder.requests)
    print(f"slow upstream: 200 x 504 upstream_timeout, peak {mock.peak_active} upstream requests at once, "
          f"{len(mock.received)} upstream calls, {len(waited)} ended by the 1s total, "
          f"max {max(t for *_, t in results):.2f} s")
    await asyncio.wait_for(asyncio.gather(*(r.cancelled.wait() for r in mock.received)), 5)  # all hung up
    in_flight = {tuple(sorted(s.labels.items())): s.value for m in proxy.registry.collect() for s in m.samples
                 if s.name == "openai_proxy_in_flight_requests"}
    assert sum(in_flight.values()) == 0
