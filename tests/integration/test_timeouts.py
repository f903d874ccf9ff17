"""Upstream failures before and after the commit, with millisecond timeouts."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import openai
import pytest

from proxy.events import RequestFinished
from proxy.testing import Delay, MockUpstream, Reset, Stall, WaitGate

from .test_forwarding import assert_transport_error

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-test", max_retries=0, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_connect_refused_is_502_upstream_connect_error(start_proxy, recorder):
    proxy = await start_proxy(upstream=f"http://127.0.0.1:{_free_port()}")
    async with _sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    err = info.value
    assert err.status_code == 502 and err.code == "upstream_connect_error"
    assert err.response.headers["x-proxy-error"] == "upstream_connect_error"
    assert err.type == "proxy_error"
    assert "Could not connect to 127.0.0.1" in err.message and "refused" in err.message
    assert "gave up after 3 attempts" in err.message
    assert err.response.headers["x-proxy-attempts"] == "3" and err.response.headers["x-should-retry"] == "false"
    assert [a.category for a in recorder.attempts] == ["connect"] * 3
    assert recorder.requests[0].stop_reason == "limit"


async def test_no_headers_within_first_byte_is_504_after_max_attempts(start_proxy, mock: MockUpstream):
    proxy = await start_proxy({"defaults": {"timeouts": {"first_byte": "50ms"}}})
    mock.script("/v1/chat/completions", *[WaitGate("never")] * 3)
    async with _sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"
    assert "did not send response headers within 50ms; gave up after 3 attempts in" in info.value.message
    assert "the upstream may be overloaded, retry later. (request id " in info.value.message  # the id ends it
    assert len(mock.requests_to("/v1/chat/completions")) == 3


async def test_first_byte_longer_than_idle_is_honoured(start_proxy, mock: MockUpstream):
    # headers may take longer than the idle timeout: idle applies only once the body streams
    proxy = await start_proxy({"defaults": {"timeouts": {"first_byte": "10s", "idle": "20ms"}}})
    mock.script("/v1/chat/completions", Delay(0.1))
    async with _sdk(proxy) as client:
        resp = await client.chat.completions.create(**CHAT)
    assert resp.choices[0].message.content


async def test_reset_before_headers_without_retries_is_502_network_error(start_proxy, mock: MockUpstream):
    proxy = await start_proxy({"defaults": {"retry": {"max_attempts": 1}}})
    mock.script("/v1/chat/completions", Reset())
    async with _sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.status_code == 502 and info.value.code == "upstream_network_error"


async def test_idle_stream_is_aborted_after_commit(start_proxy, mock: MockUpstream):
    # first_byte far longer than the test's bound: only the idle timeout can end this in time
    proxy = await start_proxy({"defaults": {"timeouts": {"idle": "50ms", "first_byte": "60s", "total": "60s"}}})
    mock.script("/v1/chat/completions", Stall(after_events=2, gate="never"))
    got = []

    async def consume() -> None:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        async for chunk in stream:
            got.append(chunk)

    async with _sdk(proxy) as client:
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(consume(), 10)
    assert len(got) == 2
    assert_transport_error(info.value)
    rec = mock.requests_to("/v1/chat/completions")[0]
    await asyncio.wait_for(rec.cancelled.wait(), 10)  # the upstream request was given up


async def test_total_timeout_bounds_a_stream(start_proxy, mock: MockUpstream):
    proxy = await start_proxy({"defaults": {"timeouts": {"total": "200ms", "idle": "60s", "first_byte": "60s"}}})
    mock.script("/v1/chat/completions", Stall(after_events=1, gate="never"))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(r.read(), 10)


async def test_a_client_that_stops_reading_is_cut_at_total(start_proxy, mock: MockUpstream, recorder):
    """Blocked writing to a client that reads nothing, the proxy still gives up at timeouts.total and
    releases the upstream request (a stalled reader must not hold a handler and a connection forever)."""
    proxy = await start_proxy({"defaults": {"timeouts": {"total": "300ms", "idle": "60s", "first_byte": "60s"}}})
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        size = 256 * 1024 * 1024  # far more than socket buffers hold
        writer.write(f"GET /v1/files/file-size-{size}/content HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await mock.wait_for_requests(1)
        rec = mock.received[0]
        await asyncio.wait_for(rec.cancelled.wait(), 10)  # the proxy gave the upstream request up
        (req,) = await recorder.wait_for(RequestFinished)
        assert (req.category, req.aborted) == ("timeout", True)
    finally:
        writer.close()
