"""Bad input from the upstream side: each gets a clear category and a clear error, never a hang.

Garbage instead of HTTP, a response whose body never ends, enormous headers, non-JSON error
bodies, and redirects (passed through to the client, never followed).
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from proxy.testing import MockUpstream, Raw, Respond

from ..conftest import TEST_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
BOUND = 5.0  # seconds: every case ends well within this (timeouts here are 300 ms)
TIMEOUTS = {"defaults": {"timeouts": {"connect": "1s", "first_byte": "300ms", "idle": "300ms", "total": "3s"}}}
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def _sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0, timeout=30)


GARBAGE = [
    ("not HTTP at all", b"\x00\x01\x02\x03 this is not http \xff\xfe\r\n\r\n"),
    ("an SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ("a bad status line", b"HTTP/1.1 OK 200\r\nContent-Length: 2\r\n\r\n{}"),
    ("a status out of range", b"HTTP/1.1 1000 Weird\r\nContent-Length: 2\r\n\r\n{}"),
    ("a header without a colon", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nNoColon\r\n\r\n{}"),
    ("a bad Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: two\r\n\r\n{}"),
    ("a bad chunk size", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"zz\r\n{}\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("then", ["close", "hold"])
async def test_garbage_instead_of_http_is_invalid_response(start_proxy, mock: MockUpstream, recorder, then):
    # seven invalid responses in a row would open the breaker (5): this test is about each answer
    proxy = await start_proxy({**TIMEOUTS, "defaults": {**TIMEOUTS["defaults"], "breaker": {"failure_threshold": 50}}})
    async with _sdk(proxy) as client:
        for name, data in GARBAGE:
            mock.script("/v1/chat/completions", Raw(data, then=then, seconds=30))
            with pytest.raises(openai.APIStatusError) as info:
                async with asyncio.timeout(BOUND):
                    await client.chat.completions.create(**CHAT)
            err = info.value
            assert (err.status_code, err.code) == (502, "invalid_upstream_response"), name
            assert err.response.headers["x-proxy-error"] == "invalid_upstream_response"
            assert "sent a response the proxy could not read" in err.message, name
            assert recorder.requests[-1].category == "invalid_response", name
            assert recorder.requests[-1].attempts == 1  # invalid_response is not retried by default


async def test_enormous_response_headers_are_invalid_response(start_proxy, mock: MockUpstream, recorder):
    proxy = await start_proxy(TIMEOUTS)
    huge_field = b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 200_000 + b"\r\nContent-Length: 2\r\n\r\n{}"
    many_fields = (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20_000))
                   + b"Content-Length: 2\r\n\r\n{}")
    async with _sdk(proxy) as client:
        for data in (huge_field, many_fields):
            mock.script("/v1/chat/completions", Raw(data, then="hold", seconds=30))
            with pytest.raises(openai.APIStatusError) as info:
                async with asyncio.timeout(BOUND):
                    await client.chat.completions.create(**CHAT)
            assert (info.value.status_code, info.value.code) == (502, "invalid_upstream_response")
            assert "could not be parsed" in info.value.message
            assert recorder.requests[-1].category == "invalid_response"


async def test_small_body_that_never_ends_times_out_with_504(start_proxy, mock: MockUpstream, recorder):
    """Content-Length announced, part of the body sent, then silence: read before the commit, so a
    clean 504 after the attempts, each bounded by first_byte."""
    proxy = await start_proxy(TIMEOUTS)
    partial = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"partial":'
    mock.script("/v1/chat/completions", *[Raw(partial, then="hold", gate="never")] * 3)
    async with _sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as info:
            async with asyncio.timeout(BOUND):
                await client.chat.completions.create(**CHAT)
    assert (info.value.status_code, info.value.code) == (504, "upstream_timeout")
    assert [a.category for a in recorder.attempts] == ["timeout"] * 3  # each ended by first_byte, not total
    chats = mock.requests_to("/v1/chat/completions")
    await asyncio.wait_for(asyncio.gather(*(r.cancelled.wait() for r in chats)), 5)  # each one hung up


@pytest.mark.parametrize("framing", ["chunked", "close-delimited", "long Content-Length"])
async def test_streamed_body_that_never_ends_is_aborted_at_idle(start_proxy, mock: MockUpstream, recorder, framing):
    """After the commit the idle timeout ends it: the client's connection is cut (it can tell), the
    category is timeout, and the upstream connection is dropped."""
    # total far beyond BOUND: only the idle timeout can end the stream in time
    proxy = await start_proxy({"defaults": {"timeouts": {**TIMEOUTS["defaults"]["timeouts"], "total": "10m"}}})
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    data = {
        "chunked": head + b"Transfer-Encoding: chunked\r\n\r\n" + b"10000\r\n" + b"x" * 0x10000 + b"\r\n",
        "close-delimited": head + b"\r\n" + b"x" * 70_000,
        "long Content-Length": head + b"Content-Length: 10000000\r\n\r\n" + b"x" * 70_000,
    }[framing]
    mock.script("/v1/files/file-1/content", Raw(data, then="hold", gate="never"))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/files/file-1/content", headers=AUTH) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(BOUND):
                    await r.read()
    assert recorder.requests[-1].category == "timeout" and recorder.requests[-1].aborted
    await asyncio.wait_for(mock.requests_to("/v1/files/file-1/content")[0].cancelled.wait(), 5)


@pytest.mark.parametrize("status,category,body,content_type", [
    (500, "server", b"<html><body><h1>500 Internal Server Error</h1></body></html>", "text/html"),
    (502, "server", b"Bad Gateway", "text/plain"),
    (429, "rate_limit", b"slow down", "text/plain"),
    (400, "client", b"\x00\xff not json", "application/octet-stream"),
    (401, "authentication", b"", "text/plain"),
])
async def test_non_json_error_bodies_pass_through_with_their_category(start_proxy, mock: MockUpstream, recorder,
                                                                      status, category, body, content_type):
    proxy = await start_proxy(TIMEOUTS)
    mock.script("/v1/chat/completions", *[Respond(status, body, {"Content-Type": content_type})] * 3)
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(BOUND):
            async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                got = await r.read()
                assert r.status == status
                assert "x-proxy-error" not in r.headers  # the upstream's answer, not the proxy's
                assert r.headers["Content-Type"].startswith(content_type)
    assert got == body  # byte for byte
    assert recorder.requests[-1].category == category
    retried = category in ("server", "rate_limit")
    assert recorder.requests[-1].attempts == (3 if retried else 1)
    if retried:
        assert r.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_passed_through_not_followed(start_proxy, mock: MockUpstream, recorder, status):
    proxy = await start_proxy(TIMEOUTS)
    location = mock.url + "/v1/elsewhere"
    mock.script("/v1/chat/completions", Respond(status, b"", {"Location": location}))
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(BOUND):
            async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH,
                              allow_redirects=False) as r:
                await r.read()
    assert r.status == status
    assert r.headers["Location"] == location
    assert [rec.path for rec in mock.received] == ["/v1/chat/completions"]  # not followed
    assert recorder.requests[-1].category == "ok" and recorder.requests[-1].attempts == 1
    samples = {tuple(sorted(s.labels.items())): s.value for m in proxy.registry.collect() for s in m.samples
               if s.name == "openai_proxy_requests_total"}
    assert samples[(("route", "chat_completions"), ("status_class", "3xx"))] == 1
