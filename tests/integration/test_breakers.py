"""Circuit breakers per route: open on counted failures, fail fast, one half-open probe.

The proxy runs on a fake monotonic clock: the open period passes when the test says so.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from proxy.events import BreakerChange, BreakerState
from proxy.testing import MockUpstream, SSECut, WaitGate, error, insufficient_quota
from tests.conftest import TEST_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"


def config(threshold: int = 3, attempts: int = 1, **extra):
    doc = {"defaults": {"retry": {"max_attempts": attempts},
                        "breaker": {"failure_threshold": threshold, "reset_timeout": "30s"}}}
    doc.update(extra)
    return doc


async def post(proxy, path: str = PATH) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, json=CHAT, headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
            await r.read()
            return r


def is_circuit_open(r: aiohttp.ClientResponse) -> bool:
    return r.status == 503 and r.headers.get("x-proxy-error") == "circuit_open"


async def trip(proxy, mock: MockUpstream, n: int = 3, path: str = PATH) -> None:
    mock.script(path, *[error(503, "overloaded", type="server_error")] * n)
    for _ in range(n):
        assert (await post(proxy, path)).status == 503


async def test_opens_after_threshold_and_fails_fast(start_proxy, mock, clock, recorder):
    proxy = await start_proxy(config(), clock=clock)
    await trip(proxy, mock)
    r = await post(proxy)
    assert is_circuit_open(r)
    assert r.headers["retry-after"] == "30" and r.headers["x-proxy-attempts"] == "0"
    assert r.headers.getall("x-should-retry") == ["false"]  # an open breaker ends the SDK's retries too
    assert len(mock.requests_to(PATH)) == 3  # the fourth never reached the upstream
    changes = recorder.of(BreakerChange)
    assert [(c.breaker, c.old, c.new) for c in changes] == [("chat_completions", BreakerState.CLOSED,
                                                             BreakerState.OPEN)]
    assert recorder.requests[-1].category == "circuit_open" and recorder.requests[-1].stop_reason == "breaker"
    clock.t += 12.2
    assert (await post(proxy)).headers["retry-after"] == "18"


async def test_sdk_sees_an_openai_shaped_503(start_proxy, mock, clock):
    proxy = await start_proxy(config(), clock=clock)
    await trip(proxy, mock)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.status_code == 503 and info.value.code == "circuit_open"
    assert info.value.type == "proxy_error" and "retry after 30s" in info.value.message


@pytest.mark.parametrize("step", [
    error(401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key"),
    error(400, "bad", type="invalid_request_error"),
    insufficient_quota(),
])
async def test_business_errors_never_open_it(start_proxy, mock, clock, step):
    proxy = await start_proxy(config(), clock=clock)
    mock.script(PATH, *[step] * 10)
    statuses = [(await post(proxy)).status for _ in range(10)]
    assert statuses == [step.status] * 10
    assert len(mock.requests_to(PATH)) == 10


async def test_half_open_admits_exactly_one_of_ten(start_proxy, mock, clock):
    proxy = await start_proxy(config(), clock=clock)
    await trip(proxy, mock)
    clock.t += 30
    mock.script(PATH, WaitGate("probe"))
    tasks = [asyncio.ensure_future(post(proxy)) for _ in range(10)]
    await mock.wait_for_requests(4, PATH)  # the probe is at the upstream
    done: set[asyncio.Future] = set()
    pending: set[asyncio.Future] = set(tasks)
    while len(done) < 9:  # the nine others are answered while the probe is still out
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        done |= finished
    assert all(is_circuit_open(t.result()) for t in done)
    assert len(mock.requests_to(PATH)) == 4
    mock.gate("probe").set()
    results = await asyncio.gather(*tasks)
    assert sum(r.status == 200 for r in results) == 1
    assert (await post(proxy)).status == 200  # closed again


async def test_probe_failure_reopens(start_proxy, mock, clock):
    proxy = await start_proxy(config(), clock=clock)
    await trip(proxy, mock)
    clock.t += 30
    mock.script(PATH, error(500, "still down", type="server_error"))
    assert (await post(proxy)).status == 500
    r = await post(proxy)
    assert is_circuit_open(r) and r.headers["retry-after"] == "30"
    assert len(mock.requests_to(PATH)) == 4


async def test_routes_are_independent_unless_grouped(start_proxy, mock, clock):
    routes = [{"name": "a", "path": "/v1/a"}, {"name": "b", "path": "/v1/b"}]
    proxy = await start_proxy(config(routes=routes), clock=clock)
    await trip(proxy, mock, path="/v1/a")
    assert is_circuit_open(await post(proxy, "/v1/a"))
    assert (await post(proxy, "/v1/b")).status == 200


async def test_grouped_routes_trip_together(start_proxy, mock, clock, recorder):
    group = {"breaker": {"group": "openai"}}
    routes = [{"name": "a", "path": "/v1/a", **group}, {"name": "b", "path": "/v1/b", **group}]
    proxy = await start_proxy(config(routes=routes), clock=clock)
    await trip(proxy, mock, path="/v1/a")
    assert is_circuit_open(await post(proxy, "/v1/b"))
    assert len(mock.requests_to("/v1/b")) == 0
    (change,) = recorder.of(BreakerChange)
    assert change.breaker == "openai" and change.routes == ("a", "b")


async def test_retry_loop_stops_on_an_open_breaker(start_proxy, mock, clock, recorder):
    # the request's own second failure opens the breaker: it gets that answer, not circuit_open
    proxy = await start_proxy(config(threshold=2, attempts=5), clock=clock)
    mock.script(PATH, *[error(503, "overloaded", type="server_error")] * 10)
    r = await post(proxy)
    assert r.status == 503 and "x-proxy-error" not in r.headers and r.headers["x-proxy-attempts"] == "2"
    assert r.headers.getall("x-should-retry") == ["false"]
    assert len(mock.requests_to(PATH)) == 2
    (req,) = recorder.requests
    assert (req.attempts, req.stop_reason, req.category) == (2, "breaker", "server")


async def test_stream_failing_after_commit_counts(start_proxy, mock, clock):
    proxy = await start_proxy(config(threshold=1), clock=clock)
    mock.script(PATH, SSECut(after_events=1, clean=False))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + PATH, json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    assert is_circuit_open(await post(proxy))
