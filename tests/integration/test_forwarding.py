"""Transparent forwarding through a real socket: the official SDK -> proxy -> mock upstream."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
from typing import Any

import aiohttp
import openai
import pytest
from yarl import URL

from proxy.testing import (MODELS_BODY, CutBody, MockUpstream, Respond, SetCookie, SSECut, Stall, error,
                           mock_bytes_sha256)
from proxy.events import RequestStarted
from tests.conftest import TEST_KEY, RunningProxy

MiB = 1 << 20


def assert_transport_error(exc: BaseException) -> None:
    """The SDK saw a broken transfer (httpx's RemoteProtocolError, possibly wrapped), not an end."""
    chain = [exc, exc.__cause__, exc.__context__]
    names = {type(e).__name__ for e in chain if e is not None}
    assert names & {"RemoteProtocolError", "ReadError", "APIConnectionError"}, repr(chain)


async def test_chat_completion(client: openai.AsyncOpenAI, mock: MockUpstream):
    resp = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "Hello from the mock upstream."
    assert resp.model == "gpt-4o-mini"
    (rec,) = mock.requests_to("/v1/chat/completions")
    assert rec.headers["Authorization"] == f"Bearer {TEST_KEY}"


async def test_stream_first_chunk_arrives_before_upstream_sends_the_last(client, mock: MockUpstream):
    mock.script("/v1/chat/completions", Stall(after_events=1, gate="rest"))
    async with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
    ) as raw:
        assert raw.headers["x-accel-buffering"] == "no"
        assert raw.headers["content-type"].startswith("text/event-stream")
        chunks = aiter(await raw.parse())
        first = await asyncio.wait_for(anext(chunks), 10)
        rec = mock.requests_to("/v1/chat/completions")[0]
        assert not rec.finished.is_set()  # the upstream is still holding the rest
        assert first.choices[0].delta.role == "assistant"
        mock.gate("rest").set()
        rest = [c async for c in chunks]
    tokens = [c.choices[0].delta.content for c in [first, *rest] if c.choices and c.choices[0].delta.content]
    assert tokens == [f"tok{i} " for i in range(mock.sse_events)]
    await asyncio.wait_for(rec.finished.wait(), 5)


async def test_responses_stream(client, mock):
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    types = [ev.type async for ev in stream]
    assert types[0] == "response.created" and types[-1] == "response.completed"


@pytest.mark.parametrize("size", [100 * 1024, 5 * MiB], ids=["replayable-100KiB", "streamed-5MiB"])
async def test_file_upload_arrives_byte_identical(client, mock, size):
    data = bytes(range(256)) * (size // 256)
    f = await client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.bytes == size
    assert f.model_extra["sha256"] == hashlib.sha256(data).hexdigest()
    rec = mock.requests_to("/v1/files")[0]
    assert "Transfer-Encoding" not in rec.headers  # a known length stays a known length
    assert int(rec.headers["Content-Length"]) == rec.body_size


@pytest.mark.parametrize("size", [10 * 1024, 3 * MiB], ids=["small", "over-replay-limit"])
async def test_chunked_upload_without_length(proxy: RunningProxy, mock, size):
    data = hashlib.sha256(b"seed").digest() * (size // 32)

    async def gen():
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/echo/upload", data=gen()) as r:
            echo = await r.json()
    assert r.status == 200
    assert echo["body_size"] == size and echo["body_sha256"] == hashlib.sha256(data).hexdigest()


async def test_download_20MiB_arrives_byte_identical(client, mock):
    size = 20 * MiB
    digest = hashlib.sha256()
    n = 0
    async with client.files.with_streaming_response.content(f"file-size-{size}") as content:
        async for chunk in content.iter_bytes():
            digest.update(chunk)
            n += len(chunk)
    assert n == size and digest.hexdigest() == mock_bytes_sha256(size)


async def test_video_content_download(client, mock):
    size = 3 * MiB
    with pytest.warns(DeprecationWarning):
        content = await client.videos.download_content(f"video-size-{size}", variant="video")
    assert hashlib.sha256(content.read()).hexdigest() == mock_bytes_sha256(size)


async def test_multipart_endpoints(client, mock):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 4096
    img = await client.images.edit(image=("a.png", io.BytesIO(png), "image/png"), prompt="a cat", model="gpt-image-1")
    assert img.model_extra["received"]["image"]["sha256"] == hashlib.sha256(png).hexdigest()
    part = await client.uploads.parts.create("upload_123", data=io.BytesIO(b"x" * 70000))
    assert part.upload_id == "upload_123"
    with pytest.warns(DeprecationWarning):
        video = await client.videos.create(prompt="a cat", model="sora-2",
                                           input_reference=("ref.png", io.BytesIO(png), "image/png"))
    assert video.status == "queued"
    assert video.model_extra["received"]["input_reference"]["sha256"] == hashlib.sha256(png).hexdigest()


async def test_gzip_response_passes_compressed(proxy: RunningProxy, mock):
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(proxy.url + "/v1/models", headers={"Accept-Encoding": "gzip"}) as r:
            raw = await r.read()
    assert r.headers["Content-Encoding"] == "gzip"
    assert raw == gzip.compress(MODELS_BODY, mtime=0)


async def test_gzip_request_body_passes_compressed(proxy: RunningProxy, mock):
    body = gzip.compress(b'{"model": "gpt-4o-mini", "input": "' + b"x" * 5000 + b'"}')
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/echo/gz", data=body,
                          headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}) as r:
            echo = await r.json()
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ["Content-Encoding", "gzip"] in echo["headers"]


async def test_query_string_and_any_method_pass_intact(proxy: RunningProxy, mock):
    query = "a=1&b=%20x&b=2&empty=&q=%E2%9C%93&slash=%2F"
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            url = URL(f"{proxy.url}/v1/some/odd/path?{query}", encoded=True)
            async with s.request(method, url) as r:
                echo = await r.json()
            assert r.status == 200
            assert (echo["method"], echo["path"], echo["query_string"]) == (method, "/v1/some/odd/path", query)
        async with s.head(f"{proxy.url}/v1/files/file-size-1000/content") as r:
            assert r.status == 200 and r.headers["Content-Length"] == "1000"
            assert await r.read() == b""


async def test_hop_by_hop_headers_dropped_both_ways(proxy: RunningProxy, mock):
    mock.script("/v1/echo/hop", Respond(200, {"ok": True}, headers={
        "X-Hop": "1", "Connection": "X-Hop", "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic",
        "X-Keep": "yes", "x-request-id": "req_123"}))
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")) as s:
        async with s.get(proxy.url + "/v1/echo/hop", headers={
            "Authorization": f"Bearer {TEST_KEY}", "Connection": "keep-alive, X-Custom", "X-Custom": "drop-me",
            "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic eA==",
            "Proxy-Connection": "keep-alive", "OpenAI-Organization": "org-1", "X-Stainless-Lang": "python",
        }) as r:
            await r.read()
            assert r.headers["X-Keep"] == "yes" and r.headers["x-request-id"] == "req_123"
            for h in ("X-Hop", "Keep-Alive", "Proxy-Authenticate"):
                assert h not in r.headers
    rec = mock.requests_to("/v1/echo/hop")[0]
    names = {k.lower() for k in rec.headers}
    assert rec.headers["Authorization"] == f"Bearer {TEST_KEY}"
    assert rec.headers["OpenAI-Organization"] == "org-1" and rec.headers["X-Stainless-Lang"] == "python"
    assert rec.headers["Host"] == f"127.0.0.1:{mock.port}"
    for h in ("x-custom", "keep-alive", "te", "proxy-authorization", "proxy-connection", "user-agent", "accept",
              "accept-encoding", "content-type"):
        assert h not in names, h


async def test_4xx_passes_through_unchanged(client, proxy: RunningProxy, mock):
    mock.script("/v1/chat/completions", error(400, "Invalid 'messages': empty array.", type="invalid_request_error",
                                              code="empty_array", headers={"x-request-id": "req_bad"}))
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert info.value.code == "empty_array" and info.value.request_id == "req_bad"
    assert "x-proxy-error" not in info.value.response.headers
    body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                      "param": None, "code": "invalid_api_key"}}
    mock.script("/v1/models", Respond(401, body, headers={"x-request-id": "req_401"}))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/models") as r:
            assert r.status == 401 and json.loads(await r.read()) == body


async def test_cut_mid_body_is_an_error_for_the_client(client, mock):
    size = 4 * MiB
    mock.script(f"/v1/files/file-size-{size}/content", CutBody(after_bytes=MiB))
    got = 0
    with pytest.raises(Exception) as info:
        async with client.files.with_streaming_response.content(f"file-size-{size}") as content:
            async for chunk in content.iter_bytes():
                got += len(chunk)
    assert_transport_error(info.value)
    assert got < size


async def test_small_json_cut_becomes_a_proxy_error(client, mock):
    mock.script("/v1/chat/completions", CutBody(after_bytes=20))
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert info.value.response.headers["x-proxy-error"] == "invalid_upstream_response"
    assert info.value.code == "invalid_upstream_response"


async def test_cut_mid_stream_is_an_error_for_the_client(client, mock):
    mock.script("/v1/chat/completions", SSECut(after_events=2, clean=False))
    got = []
    with pytest.raises(Exception) as info:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
        async for chunk in stream:
            got.append(chunk)
    assert len(got) == 2
    assert_transport_error(info.value)


async def test_upstream_set_cookie_is_never_replayed(start_proxy, mock: MockUpstream):
    # a hostname upstream: aiohttp's default jar ignores IP addresses, which would hide a leak
    proxy = await start_proxy(upstream=f"http://localhost:{mock.port}")
    mock.script("/v1/models", SetCookie("session=secret-of-client-a; Path=/"))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(proxy.url + "/v1/models") as r:
            assert "session=secret-of-client-a" in r.headers.get("Set-Cookie", "")
        async with s.get(proxy.url + "/v1/models") as r:
            await r.read()
    second = mock.requests_to("/v1/models")[1]
    assert "Cookie" not in second.headers


async def test_client_disconnect_mid_stream_cancels_upstream_quietly(proxy, mock, caplog):
    caplog.set_level(logging.DEBUG)
    mock.script("/v1/chat/completions", Stall(after_events=1, gate="never"))
    async with aiohttp.ClientSession() as s:
        r = await s.post(proxy.url + "/v1/chat/completions",
                         json={"model": "m", "messages": [], "stream": True})
        await r.content.readline()  # the first event is here
        r.close()  # the client goes away mid-stream
    rec = mock.requests_to("/v1/chat/completions")[0]
    await asyncio.wait_for(rec.cancelled.wait(), 10)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


async def test_client_disconnect_mid_upload_cancels_upstream(proxy, mock):
    started = asyncio.Event()

    async def gen():
        yield b"x" * (2 * MiB)  # over the replay limit: streamed through as it arrives
        started.set()
        await asyncio.Event().wait()  # never finishes

    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(s.post(proxy.url + "/v1/files", data=gen(),
                                            headers={"Content-Type": "application/octet-stream"}))
        await mock.wait_for_requests(1, "/v1/files")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    rec = mock.requests_to("/v1/files")[0]
    await asyncio.wait_for(rec.cancelled.wait(), 10)


@pytest.mark.parametrize("status", [204, 304])
async def test_bodyless_statuses_keep_the_connection_clean(proxy: RunningProxy, mock, status):
    mock.script("/v1/echo/empty", Respond(status, None), Respond(200, {"after": True}))
    async with aiohttp.ClientSession() as s:  # one keep-alive connection for both requests
        async with s.get(proxy.url + "/v1/echo/empty") as r:
            assert r.status == status and await r.read() == b""
        async with s.get(proxy.url + "/v1/echo/empty") as r:
            assert r.status == 200 and await r.json() == {"after": True}


async def test_head_without_length_keeps_the_connection_clean(proxy: RunningProxy, mock):
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.head(proxy.url + "/v1/echo/head") as r:
                assert r.status == 200 and await r.read() == b""
        async with s.get(proxy.url + "/v1/models") as r:
            assert r.status == 200 and (await r.json())["object"] == "list"


async def _raw_exchange(proxy: RunningProxy, data: bytes, then: bytes = b"", started: Any = None) -> bytes:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        if then:
            await started()  # the handler is reading the body now
            writer.write(then)
            await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("body, then", [
    (b"Content-Length: 100\r\n\r\n" + b"x" * 10, b""),  # short of its length, then silent
    (b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b"a" * 16 + b"\r\n", b"zz\r\n"),  # a bad chunk mid-body
], ids=["silent", "bad-chunk"])
async def test_a_stalled_request_body_gets_408_after_idle(start_proxy, mock, body, then, recorder):
    """aiohttp's server stops feeding a body after a malformed chunk without raising (3.14): the idle
    timeout on request body reads is what ends such a request."""
    proxy = await start_proxy({"defaults": {"timeouts": {"idle": "100ms"}}})

    answer = await _raw_exchange(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + body, then,
                                 lambda: recorder.wait_for(RequestStarted))
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_body_timeout" in answer
    assert mock.requests_to("/v1/chat/completions") == []  # nothing half-read was sent upstream
    assert recorder.requests[0].status == 408


async def test_a_stalled_streamed_upload_gets_408_and_the_upstream_request_is_dropped(start_proxy, mock):
    proxy = await start_proxy({"defaults": {"timeouts": {"idle": "100ms"}, "retry": {"replay_limit": "1KiB"}}})
    answer = await _raw_exchange(proxy, b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                                        b"Content-Type: application/octet-stream\r\n\r\n" + b"x" * 5000)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    rec = mock.requests_to("/v1/files")[0]
    await asyncio.wait_for(rec.cancelled.wait(), 10)
