"""Event streams are judged by whole SSE lines (issue 13, item 4), through real sockets: the
upstream ends each stream cleanly, so only the proxy's end-marker check decides."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from proxy.testing import Raw

from ..conftest import TEST_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _chunk(content: str) -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return f"data: {json.dumps(doc)}\n\n".encode()


def _response(*events: bytes) -> Raw:
    """A clean chunked event stream: every event its own chunk, then the terminating chunk."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    return Raw(head + body, then="hold", seconds=30)


async def _collect(proxy) -> list[str]:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0, timeout=30) as client:
        return [c.choices[0].delta.content async for c in await client.chat.completions.create(**CHAT)]


@pytest.mark.parametrize("content", ["see data: [DONE] here", "event: response.completed", 'x\\ndata: [DONE]'])
async def test_marker_text_inside_content_does_not_end_a_cut_stream(start_proxy, mock, recorder, content):
    proxy = await start_proxy()
    mock.script("/v1/chat/completions", _response(_chunk("a"), _chunk(content)))  # no real [DONE]
    with pytest.raises(openai.APIError):
        await _collect(proxy)
    (req,) = recorder.requests
    assert (req.status, req.aborted, req.category) == (200, True, "invalid_response")


@pytest.mark.parametrize("done", [b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"data:[DONE]\r\n\r\n"])
async def test_done_with_or_without_the_space_completes(start_proxy, mock, recorder, done):
    proxy = await start_proxy()
    mock.script("/v1/chat/completions", _response(_chunk("a"), _chunk("b"), done))
    assert await _collect(proxy) == ["a", "b"]
    (req,) = recorder.requests
    assert (req.status, req.aborted, req.category) == (200, False, "ok")


async def test_responses_terminal_text_inside_content_does_not_end_a_cut_stream(start_proxy, mock, recorder):
    sneaky = '\nevent: response.completed\ndata: {"type":"response.completed"}\n'  # escaped in the JSON
    delta = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "delta": sneaky, "sequence_number": 1, "logprobs": []}
    event = b"event: response.output_text.delta\ndata: " + json.dumps(delta).encode() + b"\n\n"
    proxy = await start_proxy()
    mock.script("/v1/responses", _response(event[:40], event[40:]))  # no terminal event
    got = []
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0, timeout=30) as client:
        with pytest.raises(openai.APIError):
            async for ev in await client.responses.create(model="gpt-4o-mini", input="hi", stream=True):
                got.append(ev.type)
    assert got == ["response.output_text.delta"]
    (req,) = recorder.requests
    assert (req.status, req.aborted, req.category) == (200, True, "invalid_response")


async def test_a_compressed_stream_is_relayed_byte_identical_not_judged(start_proxy, mock, recorder):
    import gzip

    import aiohttp

    body = gzip.compress(_chunk("a") + b"data: [DONE]\n\n")
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    mock.script("/v1/chat/completions", Raw(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), then="hold", seconds=30))
    proxy = await start_proxy()
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT,
                          headers={"Authorization": f"Bearer {TEST_KEY}", "Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert await r.read() == body  # complete, byte-identical: no marker check on bytes it cannot read
    (req,) = recorder.requests
    assert (req.status, req.aborted, req.category) == (200, False, "ok")


def _sized(*events: bytes) -> Raw:
    """A short event stream with a Content-Length: read whole before the commit."""
    body = b"".join(events)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
    return Raw(head + body, then="hold", seconds=30)


async def test_a_short_stream_read_whole_is_judged_before_the_commit(start_proxy, mock, recorder):
    proxy = await start_proxy()
    mock.script("/v1/chat/completions", _sized(_chunk("a"), _chunk("see data: [DONE] here")))
    with pytest.raises(openai.APIStatusError) as info:
        await _collect(proxy)
    assert (info.value.status_code, info.value.code) == (502, "invalid_upstream_response")
    assert "ended before its end marker" in info.value.message
    assert recorder.requests[-1].category == "invalid_response"
    mock.script("/v1/chat/completions", _sized(_chunk("a"), b"data:[DONE]\n\n"))
    assert await _collect(proxy) == ["a"]
    assert (recorder.requests[-1].status, recorder.requests[-1].aborted) == (200, False)



async def test_a_stream_reached_through_dot_segments_is_judged_too(start_proxy, mock, recorder):
    """`/v1/x/../chat/completions` is routed and forwarded as /v1/chat/completions: its stream is
    judged by that path's end marker, so a cut one is aborted, not closed as complete. Raw bytes:
    the SDKs resolve dot-segments before sending."""
    proxy = await start_proxy()
    mock.script("/v1/chat/completions", _response(_chunk("a")))  # no [DONE]
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(CHAT).encode()
    writer.write(b"POST /v1/x/../chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + TEST_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    async with asyncio.timeout(10):
        answer = await reader.read()  # to the end: the proxy cuts the connection of an aborted stream
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and not answer.endswith(b"0\r\n\r\n")
    (req,) = recorder.requests
    assert (req.status, req.aborted, req.category) == (200, True, "invalid_response")
