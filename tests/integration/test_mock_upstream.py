"""The mock upstream itself: shapes the official SDK parses, recording, and every scripted fault."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from proxy.testing import (
    MODELS_BODY,
    CutBody,
    Delay,
    MockUpstream,
    Reset,
    Respond,
    SetCookie,
    SSECut,
    SSEErrorFrame,
    Stall,
    WaitGate,
    error,
    insufficient_quota,
    mock_bytes,
    mock_bytes_sha256,
    rate_limited,
    request_too_large,
)

MiB = 1024 * 1024
CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
STREAM_BODY = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as upstream:
        yield upstream


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
async def client(mock: MockUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0) as c:
        yield c


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_frames(resp: aiohttp.ClientResponse, n: int) -> list[bytes]:
    return [await resp.content.readuntil(b"\n\n") for _ in range(n)]


# ------------------------------------------------------------------ normal endpoints via the SDK


async def test_chat_completion_parses(client: openai.AsyncOpenAI, mock: MockUpstream) -> None:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.id == "chatcmpl-mock-1"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == "Hello from the mock upstream."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    rec = mock.received[0]
    assert (rec.method, rec.path, rec.step) == ("POST", CHAT, None)
    assert rec.headers["Authorization"] == "Bearer sk-test"
    assert rec.finished.is_set() and not rec.cancelled.is_set()


async def test_chat_stream_tokens_end_on_done(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert [c.choices[0].delta.content for c in chunks] == [f"tok{i} " for i in range(5)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_stream_wire_format(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    async with session.post(mock.url + CHAT, json=STREAM_BODY) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Length" not in resp.headers
        assert resp.headers["Transfer-Encoding"] == "chunked"
        body = await resp.read()
    frames = body.split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    assert len(frames) == 5 + 2 and all(f.startswith(b"data: {") for f in frames[:5])


async def test_sse_interval_spaces_events(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(sse_events=3, sse_interval=0.02) as upstream:
        start = time.monotonic()
        async with session.post(upstream.url + CHAT, json=STREAM_BODY) as resp:
            assert (await resp.read()).count(b"tok") == 3
        assert time.monotonic() - start >= 0.06  # 3 gaps: between 3 frames and before [DONE]


async def test_completions_and_embeddings_parse(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert completion.choices[0].text == "Hello from the mock upstream."
    stream = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == "tok0 tok1 tok2 tok3 tok4 "
    embeddings = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert [e.index for e in embeddings.data] == [0, 1, 2]
    b64 = await client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="base64")
    assert len(b64.data) == 1


async def test_responses_plain_and_stream(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="gpt-4o", input="hi")
    assert response.status == "completed"
    assert response.output_text == "Hello from the mock upstream."
    stream = await client.responses.create(model="gpt-4o", input="hi", stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == [f"tok{i} " for i in range(5)]
    assert events[-1].response.output_text == "".join(deltas)


async def test_models_list_and_gzip_bytes(
    client: openai.AsyncOpenAI, mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    assert "gpt-4o" in [m.id async for m in client.models.list()]
    async with session.get(mock.url + "/v1/models", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == gzip.compress(MODELS_BODY, mtime=0)
    async with session.get(mock.url + "/v1/models", headers={"Accept-Encoding": "identity"}) as resp:
        assert "Content-Encoding" not in resp.headers
        assert await resp.read() == MODELS_BODY


# ------------------------------------------------------------------ uploads and downloads


async def test_file_upload_hash(client: openai.AsyncOpenAI, mock: MockUpstream) -> None:
    data = bytes(range(256)) * (4 * 1024)  # 1 MiB
    uploaded = await client.files.create(file=("big.bin", data), purpose="batch")
    assert (uploaded.id, uploaded.bytes, uploaded.filename) == ("file-mock-1", MiB, "big.bin")
    assert uploaded.purpose == "batch" and uploaded.status == "processed"
    assert uploaded.model_extra == {"sha256": sha(data)}
    rec = mock.received[0]
    assert rec.body_size == int(rec.headers["Content-Length"]) > MiB


async def test_multipart_raw_body_hashed_byte_exact(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    boundary = "b0undary"
    body = (
        f"preamble\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"\r\n--b0undar" * 5000 + f"\r\n--{boundary}--\r\nepilogue".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with session.post(mock.url + "/v1/files", data=body, headers=headers) as resp:
        obj = await resp.json()
    assert obj["sha256"] == sha(b"\r\n--b0undar" * 5000) and obj["purpose"] == "batch"
    assert (mock.received[0].body_size, mock.received[0].body_sha256) == (len(body), sha(body))


async def test_file_content_download(client: openai.AsyncOpenAI) -> None:
    size = 3 * MiB
    content = await client.files.content(f"file-size-{size}")
    assert content.response.headers["Content-Length"] == str(size)
    assert content.response.headers["Content-Type"] == "application/octet-stream"
    assert sha(content.content) == mock_bytes_sha256(size)
    default = await client.files.content("file-abc")
    assert len(default.content) == 1024


async def test_uploads_images_and_videos_parse(client: openai.AsyncOpenAI) -> None:
    upload = await client.uploads.create(bytes=10, filename="a.txt", mime_type="text/plain", purpose="batch")
    assert upload.status == "pending"
    part = await client.uploads.parts.create(upload.id, data=b"0123456789")
    assert part.upload_id == upload.id and part.model_extra == {"sha256": sha(b"0123456789"), "bytes": 10}
    done = await client.uploads.complete(upload.id, part_ids=[part.id])
    assert done.status == "completed" and done.file is not None and done.file.filename == "a.txt"

    edited = await client.images.edit(image=("in.png", b"png-bytes"), prompt="p", mask=("m.png", b"mask"))
    assert edited.data is not None and edited.data[0].b64_json == "aGVsbG8="
    assert edited.model_extra is not None and edited.model_extra["received"] == {
        "image": {"size": 9, "sha256": sha(b"png-bytes"), "filename": "in.png"},
        "mask": {"size": 4, "sha256": sha(b"mask"), "filename": "m.png"},
    }

    with pytest.warns(DeprecationWarning, match="Sora"):  # the SDK marks the video API deprecated
        video = await client.videos.create(prompt="p", model="sora-2", input_reference=("r.png", b"ref"))
        fetched = await client.videos.retrieve("video-size-70000")
        content = await client.videos.download_content("video-size-70000")
    assert (video.status, video.progress, video.seconds, video.size) == ("queued", 0, "4", "720x1280")
    assert video.model_extra is not None
    assert video.model_extra["received"]["input_reference"]["sha256"] == sha(b"ref")
    assert (fetched.status, fetched.progress) == ("completed", 100)
    assert content.response.headers["Content-Type"] == "video/mp4"
    assert sha(content.content) == mock_bytes_sha256(70000)


def test_mock_bytes_deterministic_and_order_sensitive() -> None:
    for n in (0, 1, 65536, 65537, 200_000):
        chunks = list(mock_bytes(n))
        assert sum(map(len, chunks)) == n and all(len(c) <= 65536 for c in chunks)
        assert sha(b"".join(chunks)) == mock_bytes_sha256(n)
    blocks = list(mock_bytes(3 * 65536))
    assert sha(b"".join([blocks[1], blocks[0], blocks[2]])) != mock_bytes_sha256(3 * 65536)


# ------------------------------------------------------------------ recording and the echo


async def test_echo_query_headers_and_gzip_body(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    headers = {"X-Mixed-Case": "Value", "x-lower": "v2"}
    async with session.get(mock.url + "/v1/echo/x?b=2&a=%20z", headers=headers) as resp:
        echo = await resp.json()
    assert (echo["method"], echo["path"], echo["query_string"]) == ("GET", "/v1/echo/x", "b=2&a=%20z")
    names = [name for name, _ in echo["headers"]]
    assert names.index("X-Mixed-Case") + 1 == names.index("x-lower")
    assert echo["body_size"] == 0

    compressed = gzip.compress(b'{"a": 1}' * 100, mtime=0)
    gz_headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with session.put(mock.url + "/v1/echo/gz", data=compressed, headers=gz_headers) as resp:
        echo = await resp.json()
    assert (echo["body_size"], echo["body_sha256"]) == (len(compressed), sha(compressed))
    rec = mock.requests_to("/v1/echo/gz")[0]
    assert (rec.method, rec.body_sha256, rec.headers["content-encoding"]) == ("PUT", sha(compressed), "gzip")


async def test_wait_for_requests_while_gated(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script("/v1/echo/w", WaitGate("go"), WaitGate("go"), WaitGate("go"))

    async def fetch() -> int:
        async with session.post(mock.url + "/v1/echo/w", data=b"x") as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(fetch()) for _ in range(3)]
    await asyncio.wait_for(mock.wait_for_requests(3, "/v1/echo/w"), 5)
    await mock.wait_for_requests(3)  # no path: all requests count
    recs = mock.requests_to("/v1/echo/w")
    assert not any(r.finished.is_set() for r in recs)
    mock.gate("go").set()
    assert await asyncio.gather(*tasks) == [200, 200, 200]
    assert all(r.finished.is_set() and isinstance(r.step, WaitGate) for r in recs)
    assert [r.arrived for r in recs] == sorted(r.arrived for r in recs)


async def test_script_order_method_and_wildcard(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script("/v1/echo/s", Respond(418, b"teapot", {"X-A": "b"}), Respond(201, {"ok": True}))
    mock.script("/v1/echo/m", Respond(405), method="post")
    statuses = []
    for _ in range(3):
        async with session.get(mock.url + "/v1/echo/s") as resp:
            statuses.append((resp.status, await resp.read()))
            if resp.status == 418:
                assert resp.headers["X-A"] == "b"
            if resp.status == 201:
                assert resp.headers["Content-Type"] == "application/json"
    assert statuses[:2] == [(418, b"teapot"), (201, b'{"ok":true}')]
    assert statuses[2][0] == 200 and b'"path":"/v1/echo/s"' in statuses[2][1]

    async with session.get(mock.url + "/v1/echo/m") as resp:
        assert resp.status == 200
    async with session.post(mock.url + "/v1/echo/m") as resp:
        assert resp.status == 405

    mock.script("*", Respond(204))
    async with session.get(mock.url + "/v1/anything") as resp:
        assert resp.status == 204 and await resp.read() == b""
    async with session.get(mock.url + "/v1/anything") as resp:
        assert resp.status == 200


# ------------------------------------------------------------------ error answers


async def test_error_helpers(client: openai.AsyncOpenAI, mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script(CHAT, error(400, "bad thing", "invalid_request_error", "bad_code"), rate_limited(), error(503))
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert bad.value.code == "bad_code" and bad.value.message.endswith("bad thing")
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert limited.value.code == "rate_limit_exceeded" and limited.value.type == "requests"
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    mock.script("/v1/echo/e", rate_limited(retry_after="1", retry_after_ms="20"), insufficient_quota(),
                request_too_large())
    async with session.get(mock.url + "/v1/echo/e") as resp:
        assert resp.status == 429
        assert (resp.headers["retry-after"], resp.headers["retry-after-ms"]) == ("1", "20")
        body = await resp.json()
    assert body["error"]["param"] is None and "Please try again in 20ms." in body["error"]["message"]
    async with session.get(mock.url + "/v1/echo/e") as resp:
        assert resp.status == 429 and "retry-after" not in resp.headers
        assert (await resp.json())["error"]["code"] == "insufficient_quota"
    async with session.get(mock.url + "/v1/echo/e") as resp:
        body = await resp.json()
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["message"].startswith("Request too large")


# ------------------------------------------------------------------ connection-level faults


async def test_reset_after_reading_body(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script("/v1/echo/r", Reset())
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with session.post(mock.url + "/v1/echo/r", data=b"x" * 100_000) as resp:
            await resp.read()
    rec = mock.received[0]
    assert (rec.body_size, rec.body_sha256) == (100_000, sha(b"x" * 100_000))
    assert not rec.finished.is_set() and not rec.cancelled.is_set()


async def test_cut_body_download_and_json(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script("/v1/files/file-size-1000000/content", CutBody(300_000))
    got = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(mock.url + "/v1/files/file-size-1000000/content") as resp:
            assert resp.headers["Content-Length"] == "1000000"
            async for chunk in resp.content.iter_any():
                got += len(chunk)
    assert got == 300_000

    mock.script(CHAT, CutBody(10))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(mock.url + CHAT, json={"model": "gpt-4o", "messages": MESSAGES}) as resp:
            await resp.read()
    assert not any(r.finished.is_set() or r.cancelled.is_set() for r in mock.received)


async def test_delay(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script("/v1/echo/d", Delay(0.05))
    start = time.monotonic()
    async with session.get(mock.url + "/v1/echo/d") as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 0.05


async def test_set_cookie_and_cookie_recorded(mock: MockUpstream) -> None:
    mock.script("/v1/echo/c", SetCookie("session=secret; Path=/"))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(mock.url + "/v1/echo/c", headers={"Cookie": "mine=1"}) as resp:
            assert resp.headers["Set-Cookie"] == "session=secret; Path=/"
            assert resp.status == 200
            await resp.read()
    assert mock.received[0].headers["Cookie"] == "mine=1"


# ------------------------------------------------------------------ stream faults


async def test_stall_until_gate(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script(CHAT, Stall(2, gate="release"))
    async with session.post(mock.url + CHAT, json=STREAM_BODY) as resp:
        first = await read_frames(resp, 2)
        rec = mock.received[0]
        assert not rec.finished.is_set()  # parked on the gate
        mock.gate("release").set()
        rest = await resp.read()
    assert [b"tok0" in first[0], b"tok1" in first[1]] == [True, True]
    assert rest.count(b"tok") == 3 and rest.endswith(b"data: [DONE]\n\n")
    await asyncio.wait_for(rec.finished.wait(), 5)


async def test_stall_for_seconds(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script(CHAT, Stall(1, seconds=0.05))
    start = time.monotonic()
    async with session.post(mock.url + CHAT, json=STREAM_BODY) as resp:
        body = await resp.read()
    assert time.monotonic() - start >= 0.05
    assert body.count(b"tok") == 5 and body.endswith(b"data: [DONE]\n\n")


async def test_sse_error_frame(client: openai.AsyncOpenAI, mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script(CHAT, SSEErrorFrame(2), SSEErrorFrame(1))
    async with session.post(mock.url + CHAT, json=STREAM_BODY) as resp:
        assert resp.status == 200
        frames = (await resp.read()).split(b"\n\n")
    assert frames[2].startswith(b'data: {"error":{"message":"The server had an error')
    assert frames[3:] == [b""] and b"[DONE]" not in b"".join(frames)

    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    tokens = []
    with pytest.raises(openai.APIError, match="The server had an error"):
        async for chunk in stream:
            tokens.append(chunk.choices[0].delta.content)
    assert tokens == ["tok0 "]


async def test_sse_cut_clean_and_abort(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script(CHAT, SSECut(2, clean=True), SSECut(2))
    async with session.post(mock.url + CHAT, json=STREAM_BODY) as resp:
        body = await resp.read()
    assert body.count(b"tok") == 2 and b"[DONE]" not in body
    assert mock.received[0].finished.is_set()

    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(mock.url + CHAT, json=STREAM_BODY) as resp:
            assert len(await read_frames(resp, 2)) == 2
            await resp.read()
    assert not mock.received[1].finished.is_set() and not mock.received[1].cancelled.is_set()


async def test_cancelled_when_client_leaves_mid_stream(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script(CHAT, Stall(1, gate="never"))
    resp = await session.post(mock.url + CHAT, json=STREAM_BODY)
    assert b"tok0" in (await read_frames(resp, 1))[0]
    resp.close()  # drops the connection
    rec = mock.received[0]
    await asyncio.wait_for(rec.cancelled.wait(), 5)
    assert not rec.finished.is_set()


async def test_cancelled_when_client_leaves_mid_download(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    resp = await session.get(mock.url + f"/v1/files/file-size-{256 * MiB}/content")
    assert await resp.content.readexactly(1000)
    resp.close()
    await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)
    assert not mock.received[0].finished.is_set()


async def test_bodyless_answers_and_http10_stream(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    mock.script("*", Respond(304, b"must not be sent"))
    async with session.get(mock.url + "/v1/echo/n") as resp:
        assert (resp.status, await resp.read()) == (304, b"")
    async with session.head(mock.url + "/v1/echo/h") as resp:
        assert (resp.status, await resp.read()) == (200, b"")
    async with session.head(mock.url + "/v1/files/file-size-5000/content") as resp:
        assert (resp.headers["Content-Length"], await resp.read()) == ("5000", b"")
    async with session.get(mock.url + "/v1/echo/after") as resp:  # the keep-alive stream is intact
        assert (await resp.json())["path"] == "/v1/echo/after"

    # A close-delimited stream must end even when an HTTP/1.0 client asks for keep-alive.
    async with aiohttp.ClientSession(version=aiohttp.HttpVersion10) as old:
        async with old.post(mock.url + CHAT, json=STREAM_BODY) as resp:
            assert "Transfer-Encoding" not in resp.headers
            assert (await asyncio.wait_for(resp.read(), 5)).endswith(b"data: [DONE]\n\n")
