"""Metrics that show an outage as it is (issue 13, item 11), over real sockets.

The proxy runs on a fake monotonic clock: a request lasts exactly as long as the test advances the
clock while the mock holds it, and the breaker's open period passes when the test says so.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy.testing import WaitGate, error
from tests.conftest import TEST_KEY, write_config
from ..conftest import FakeClock

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"
ROUTE = "chat_completions"
DURATION = "openai_proxy_request_duration_seconds"


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


BY_UPSTREAM = {"openai_proxy_attempts_total", "openai_proxy_breaker_state", "openai_proxy_breaker_transitions_total"}


def getter(got: dict, route: str = ROUTE):
    def v(name: str, **labels: str) -> float:
        if name in BY_UPSTREAM:  # a route of one upstream: "default"
            labels = {"upstream": "default", **labels}
        return got[(name, tuple(sorted({"route": route, **labels}.items())))]
    return v


async def test_an_outage_does_not_make_latency_look_better(start_proxy, mock):
    clock = FakeClock()
    proxy_ = await start_proxy({"defaults": {"retry": {"max_attempts": 2},
                                             "breaker": {"failure_threshold": 2, "reset_timeout": "30s"}}},
                               clock=clock)
    async with openai.AsyncOpenAI(base_url=proxy_.base_url, api_key=TEST_KEY, max_retries=0) as client:
        # before: a 1.3 s success, after one retry
        mock.script(PATH, error(500, "x", type="server_error"), WaitGate("slow"))
        slow = asyncio.ensure_future(client.chat.completions.create(**CHAT))
        await mock.wait_for_requests(2, PATH)
        clock.t += 1.3
        mock.gate("slow").set()
        await slow
        # the outage: two 500s open the breaker, then fast proxy-made 503s
        mock.script(PATH, error(500, "x", type="server_error"), error(500, "x", type="server_error"))
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(**CHAT)
        # the open period passes; the probe succeeds and closes the breaker
        clock.t += 30
        await client.chat.completions.create(**CHAT)
    text = generate_latest(proxy_.registry).decode()
    got = parse(text)
    v = getter(got)

    # successes keep their latency; the failures are a series of their own
    assert v(DURATION + "_count", outcome="ok") == 2
    assert v(DURATION + "_sum", outcome="ok") == pytest.approx(1.3)
    assert [v(DURATION + "_bucket", outcome="ok", le=le) for le in ("0.005", "1.0", "2.5", "+Inf")] == [1, 1, 2, 2]
    assert v(DURATION + "_count", outcome="error") == 3
    assert v(DURATION + "_bucket", outcome="error", le="0.005") == 3
    # the last finite bound is the longest total timeout (30 s in the test config)
    finite = {float(dict(labels)["le"]) for name, labels in got if name == DURATION + "_bucket"} - {float("inf")}
    assert min(finite) == 0.005 and max(finite) == 30.0
    # every flip counted, though the gauge is back where it started
    assert [v("openai_proxy_breaker_transitions_total", to=to) for to in ("open", "half_open", "closed")] == [1, 1, 1]
    assert v("openai_proxy_breaker_state") == 0
    assert v("openai_proxy_retry_successes_total") == 1  # the probe needed one attempt
    assert v("openai_proxy_errors_total", category="circuit_open") == 2
    # a route without traffic: transition series from the start, nothing else but its gauges
    idle = getter(got, "embeddings")
    assert [idle("openai_proxy_breaker_transitions_total", to=to) for to in ("open", "half_open", "closed")] == [0] * 3
    assert ("openai_proxy_retry_successes_total", (("route", "embeddings"),)) not in got
    assert got[("openai_proxy_build_info", (("version", proxy.__version__),))] == 1


async def _scrape(admin: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/metrics") as r:
            return parse(await r.text())


def _rss(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return float(f.read().split(b")")[-1].split()[21]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process metrics read /proc")
@pytest.mark.parametrize("workers", [1, 2])
async def test_admin_metrics_have_process_metrics_and_build_info(tmp_path, mock, proxy_process, workers: int):
    path = write_config(tmp_path, mock.url)
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0", "--workers", str(workers))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(p.traffic + PATH, json=CHAT) as r:
                assert r.status == 200
        got = await _scrape(p.admin)
        pids = [p.proc.pid]
        if workers > 1:
            startup: dict[str, Any] = next(line for line in p.lines if line["event"] == "startup")
            pids += startup["pids"]
        expected = sum(_rss(pid) for pid in pids)
    finally:
        p.signal()  # SIGTERM, so a supervisor stops its workers (the fixture's SIGKILL would orphan them)
        code, _, err = await p.finish()
    assert code == 0, err
    assert got[("openai_proxy_build_info", (("version", proxy.__version__),))] == 1
    assert any(name == "python_info" for name, _ in got)
    assert got[("process_cpu_seconds_total", ())] > 0
    assert getter(got)(DURATION + "_count", outcome="ok") == 1
    # with --workers the supervisor's process metrics add up the whole proxy: its memory and its workers'
    assert got[("process_resident_memory_bytes", ())] == pytest.approx(expected, rel=0.25)
