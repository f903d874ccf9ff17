"""The outage path (issue 13): fail fast, tell the truth, count what clients saw.

A fake monotonic clock drives the breakers' open period, and an injected sleep records every
backoff the loop would wait: nothing here waits on the wall clock.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from proxy.events import RequestFinished, RequestStarted
from proxy.testing import HoldEnd, MockUpstream, Raw, Reset, SSECut, error

from ..conftest import TEST_KEY
from ..conftest import FakeClock

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


class Sleeps:
    """The loop's sleep: records each wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def config(threshold: int = 3, attempts: int = 3, **retry):
    return {"defaults": {"retry": {"max_attempts": attempts, **retry},
                         "breaker": {"failure_threshold": threshold, "reset_timeout": "30s"}}}


def sdk(proxy, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, **{"max_retries": 0, "timeout": 30, **kw})


async def post(proxy, path: str = PATH, **kw) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, json=CHAT, headers=AUTH, **kw) as r:
            await r.read()
            return r


async def open_breaker(proxy, mock: MockUpstream, n: int) -> None:
    """Fail requests until the breaker answers circuit_open (at most `n` + 1 requests)."""
    mock.script(PATH, *[error(500)] * n)
    for _ in range(n + 1):
        r = await post(proxy)
        if r.headers.get("x-proxy-error") == "circuit_open":
            return
        assert r.status == 500
    raise AssertionError("the breaker did not open")


# ---- 1. circuit_open only for requests never sent; the last upstream answer otherwise ------------

async def test_breaker_opening_during_retries_returns_the_upstreams_answer(start_proxy, mock, recorder):
    sleeps = Sleeps()
    proxy = await start_proxy(config(threshold=2, attempts=5), clock=FakeClock(), sleep=sleeps)
    mock.script(PATH, *[error(502, "upstream overloaded, code 7", type="server_error")] * 5)
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**CHAT)
    err = info.value
    assert err.status_code == 502 and err.body["message"] == "upstream overloaded, code 7"  # the upstream's own body
    assert "x-proxy-error" not in err.response.headers
    assert err.response.headers["x-proxy-attempts"] == "2"
    assert err.response.headers.get_list("x-should-retry") == ["false"]
    assert len(mock.requests_to(PATH)) == 2
    assert sleeps.waits and len(sleeps.waits) == 1  # one backoff, before attempt 2; none after it
    (req,) = recorder.requests
    assert (req.status, req.category, req.attempts, req.stop_reason) == (502, "server", 2, "breaker")


async def test_transport_failure_that_opens_the_breaker_is_reported_as_such(start_proxy, mock, recorder):
    proxy = await start_proxy(config(threshold=1, attempts=3), clock=FakeClock(), sleep=Sleeps())
    mock.script(PATH, Reset())
    r = await post(proxy)
    body = await r.json()
    assert r.status == 502 and r.headers["x-proxy-error"] == "upstream_network_error"
    assert r.headers["x-proxy-attempts"] == "1" and r.headers.getall("x-should-retry") == ["false"]
    assert "did not send" not in body["error"]["message"]
    assert "circuit breaker of this route opened" in body["error"]["message"]
    assert recorder.requests[-1].stop_reason == "breaker"


async def test_circuit_open_always_has_zero_attempts_and_a_true_message(start_proxy, mock, recorder):
    proxy = await start_proxy(config(threshold=2, attempts=1), clock=FakeClock())
    await open_breaker(proxy, mock, 2)
    r = await post(proxy)
    body = await r.json()
    assert r.status == 503 and r.headers["x-proxy-error"] == "circuit_open"
    assert r.headers["x-proxy-attempts"] == "0" and "did not send this request" in body["error"]["message"]
    assert len(mock.requests_to(PATH)) == 2
    assert all(e.attempts == 0 for e in recorder.requests if e.category == "circuit_open")


# ---- 2. an open breaker ends the SDK's retries too --------------------------------------------

@pytest.mark.parametrize("attempts", [1, 3])
async def test_sdk_with_default_retries_stops_at_an_open_breaker(start_proxy, mock, recorder, attempts):
    proxy = await start_proxy(config(threshold=2, attempts=attempts), clock=FakeClock(), sleep=Sleeps())
    await open_breaker(proxy, mock, 2)
    sent_before = len(mock.requests_to(PATH))
    seen_before = len(recorder.requests)
    async with sdk(proxy, max_retries=2) as client:  # the SDK's default
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.status_code == 503 and info.value.code == "circuit_open"
    assert info.value.response.headers["retry-after"] == "30"  # kept, as information
    assert len(recorder.requests) - seen_before == 1  # the SDK did not come back (no 30 s sleeps)
    assert len(mock.requests_to(PATH)) == sent_before  # 0 upstream attempts


# ---- 3. no waiting for a retry that cannot happen -----------------------------------------------

async def test_no_backoff_when_the_breaker_will_still_be_open(start_proxy, mock, recorder):
    clock, sleeps = FakeClock(), Sleeps()
    proxy = await start_proxy(config(threshold=1, attempts=4, backoff={"initial": "700ms", "max": "8s"}),
                              clock=clock, sleep=sleeps)
    mock.script(PATH, error(500), error(500))
    assert (await post(proxy)).status == 500  # opens the breaker
    assert sleeps.waits == [] and recorder.requests[-1].stop_reason == "breaker"
    clock.t += 30  # half-open: this request is the probe; it fails and reopens the breaker
    assert (await post(proxy)).status == 500
    assert sleeps.waits == [] and recorder.requests[-1].stop_reason == "breaker"
    assert len(mock.requests_to(PATH)) == 2


# ---- 7. the proxy's coordination headers replace the upstream's -------------------------------

async def test_upstream_should_retry_true_cannot_multiply_sdk_retries(start_proxy, mock, recorder):
    proxy = await start_proxy(config(threshold=50, attempts=3), sleep=Sleeps())
    flaky = error(503, headers={"x-should-retry": "true", "x-proxy-attempts": "9"})
    mock.script(PATH, *[flaky] * 20)
    async with sdk(proxy, max_retries=2) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    headers = info.value.response.headers
    assert headers.get_list("x-should-retry") == ["false"] and headers.get_list("x-proxy-attempts") == ["3"]
    assert len(mock.requests_to(PATH)) == 3  # max_attempts, not 3 x 3


async def test_upstream_should_retry_passes_when_the_proxy_sets_none(start_proxy, mock):
    proxy = await start_proxy(config(threshold=50, attempts=1))
    mock.script(PATH, error(503, headers={"x-should-retry": "true"}))
    r = await post(proxy)
    assert r.headers.getall("x-should-retry") == ["true"] and r.headers.getall("x-proxy-attempts") == ["1"]


# ---- 8. the breaker is fair and counts what clients saw -----------------------------------------

async def test_stalled_upload_does_not_hold_the_half_open_probe(start_proxy, mock, recorder):
    clock = FakeClock()
    proxy = await start_proxy(config(threshold=1, attempts=1), clock=clock)
    await open_breaker(proxy, mock, 1)
    clock.t += 30  # half-open
    host, port = proxy.url[len("http://"):].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        body = b'{"model": "gpt-4o-mini", "messages": []}'
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])  # then stalls
        await writer.drain()
        await recorder.wait_for(RequestStarted, n=2)  # the stalled request is in the proxy
        r = await post(proxy)  # another client is the probe, and closes the breaker
        assert r.status == 200
        assert (await post(proxy)).status == 200
    finally:
        writer.close()


async def test_streams_cut_after_their_headers_open_the_breaker(start_proxy, mock, recorder):
    proxy = await start_proxy(config(threshold=3, attempts=1), clock=FakeClock())
    mock.script(PATH, *[SSECut(after_events=1, clean=False)] * 3)
    async with sdk(proxy) as client:
        for _ in range(3):
            with pytest.raises(openai.APIError):
                async for _chunk in await client.chat.completions.create(**CHAT, stream=True):
                    pass
    r = await post(proxy)
    assert r.status == 503 and r.headers["x-proxy-error"] == "circuit_open"
    assert len(mock.requests_to(PATH)) == 3


async def test_complete_streams_reset_the_failure_count_when_they_end(start_proxy, mock, recorder):
    proxy = await start_proxy(config(threshold=2, attempts=1), clock=FakeClock())
    mock.script(PATH, SSECut(after_events=1, clean=False))
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIError):
            async for _chunk in await client.chat.completions.create(**CHAT, stream=True):
                pass
        async for _chunk in await client.chat.completions.create(**CHAT, stream=True):
            pass
    mock.script(PATH, error(500))
    assert (await post(proxy)).status == 500  # one failure since the good stream: still closed
    assert (await post(proxy)).status == 200


# ---- 5. the request event is exact for every delivered response --------------------------------

@pytest.mark.parametrize("upstream_end", ["prompt", "late"])
async def test_request_events_are_exact_for_200_concurrent_streams(start_proxy, mock, recorder, upstream_end):
    # The SDK closes its connection soon after it has read `data: [DONE]` (it drains for 0.1 s), and
    # with an upstream that ends its stream late (`late`), before the proxy has seen that end: the
    # request event must still say what was delivered.
    proxy = await start_proxy(config(threshold=50, attempts=1))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + PATH, json={**CHAT, "stream": True}, headers=AUTH) as r:
            first = len(await r.read())  # the mock's request 1; request n's ids are longer by its digits
    if upstream_end == "late":
        mock.script(PATH, *[HoldEnd(seconds=60)] * 200)

    def expected(e: RequestFinished) -> int:
        n = (e.upstream_request_id or "never delivered_?").rsplit("_", 1)[1]
        return first + mock.sse_events * (len(n) - 1)
    async with sdk(proxy) as client:
        async def one() -> int:
            n = 0
            async for _chunk in await client.chat.completions.create(**CHAT, stream=True):
                n += 1
            return n

        counts = await asyncio.gather(*(one() for _ in range(200)))
    assert len(set(counts)) == 1 and counts[0] > 1
    await recorder.wait_for(RequestFinished, n=201)
    for e in recorder.requests:
        assert (e.status, e.aborted, e.category, e.bytes_out) == (200, False, "ok", expected(e)), e


# ---- 6. HTTP/0.9 is never forwarded -----------------------------------------------------------

@pytest.mark.parametrize("line", [b"GET /v1/models\r\n\r\n", b"GET /v1/models HTTP/0.9\r\n\r\n"])
async def test_http09_request_lines_are_refused(start_proxy, mock, line):
    proxy = await start_proxy()
    host, port = proxy.url[len("http://"):].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(line)
        data = await asyncio.wait_for(reader.read(), 10)  # the proxy closes the connection
    finally:
        writer.close()
    assert data == b"" or data.split(b" ", 2)[1] == b"400"
    assert mock.received == []


# ---- 9. an upstream response the proxy cannot relay is invalid_response ------------------------

UNRELAYABLE = [
    ("a control character in a header", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Evil: a\x01b\r\n\r\n{}"),
    ("a DEL in a streamed response's header",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Evil: a\x7fb\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    ("status 600", b"HTTP/1.1 600 Weird\r\nContent-Length: 2\r\n\r\n{}"),
    ("status 999", b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\n{}"),
    ("status 099", b"HTTP/1.1 099 Weird\r\nContent-Length: 2\r\n\r\n{}"),
]


@pytest.mark.parametrize("name, raw", UNRELAYABLE, ids=[n for n, _ in UNRELAYABLE])
async def test_unrelayable_upstream_response_is_invalid_response(start_proxy, mock, recorder, capfd, leaks,
                                                                 name, raw):
    proxy = await start_proxy(config(threshold=1, attempts=1), clock=FakeClock())
    mock.script("/v1/models", Raw(raw))
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.models.list()
    err = info.value
    assert (err.status_code, err.code) == (502, "invalid_upstream_response"), name
    assert "could not read" in err.message
    (req,) = recorder.requests
    assert (req.status, req.category, req.aborted) == (502, "invalid_response", False)
    async with aiohttp.ClientSession() as s:  # counted by the breaker (threshold 1)
        async with s.get(proxy.url + "/v1/models", headers=AUTH) as r:
            assert r.headers.get("x-proxy-error") == "circuit_open"
    out, errs = capfd.readouterr()
    leaks.texts.extend([out, errs])
    assert "Traceback" not in out + errs
