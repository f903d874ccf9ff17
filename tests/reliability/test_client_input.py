"""Bad input from the client side, over raw sockets to a real `python -m proxy` process.

The proxy answers 4xx where HTTP says so, never crashes, keeps serving others, and a client that
leaves mid-upload or mid-stream cancels its upstream request without leaking anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from .soak import open_fds, parse_metrics
from proxy.events import RequestStarted
from proxy.testing import MockUpstream, Stall

from ..conftest import CANARY, TEST_KEY, write_config
from .procs import draining, idle_fds, poll
from .rawhttp import exchange

AUTH = f"Authorization: Bearer {TEST_KEY}\r\n".encode()
MiB = 1 << 20


@pytest.fixture
async def quick_mock() -> AsyncIterator[MockUpstream]:
    """Closes idle keep-alive connections after 0.5 s, so the proxy's pool empties and fds can be compared."""
    async with MockUpstream(keepalive_timeout=0.5) as m:
        yield m


async def _proxy(proxy_process, tmp_path, mock: MockUpstream, extra: dict[str, Any] | None = None):
    path = write_config(tmp_path, mock.url, extra)
    return await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")


async def _still_serves(p) -> None:
    async with openai.AsyncOpenAI(base_url=p.traffic + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10) as c:
        models = await c.models.list()
    assert models.data


async def _metrics(p) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(p.admin + "/metrics") as r:
            return parse_metrics(await r.text())


async def _baseline_fds(p) -> int:
    """The proxy's fd count once idle: no client connection, and its pooled upstream ones closed by the mock."""
    await _still_serves(p)
    return await idle_fds(p.proc.pid)


# ----------------------------------------------------------------------------- malformed requests

H = b"Host: proxy\r\n" + AUTH  # the canary key rides on every request
# Not here: "GET /v1/models" with no version is an HTTP/0.9 simple request, which aiohttp accepts and
# the proxy forwards (answering "HTTP/0.9 200 OK"): obsolete, but HTTP, not a malformed request.
MALFORMED: list[tuple[str, bytes]] = [
    ("garbage request line", b"GARBAGE\r\n\r\n"),
    ("binary garbage", b"\x00\x01\x02\xff\xfe\r\n\r\n"),
    ("TLS client hello on the HTTP port", bytes.fromhex("16030100f4010000f00303") + b"\x00" * 60),
    ("unknown HTTP version", b"GET /v1/models HTTP/9.9\r\n" + H + b"\r\n"),
    ("lower-case version", b"GET /v1/models http/1.1\r\n" + H + b"\r\n"),
    ("target without a slash", b"GET v1/models HTTP/1.1\r\n" + H + b"\r\n"),
    ("NUL in the path", b"GET /v1/mo\x00dels HTTP/1.1\r\n" + H + b"\r\n"),
    ("space in the path", b"GET /v1/mo dels HTTP/1.1\r\n" + H + b"\r\n"),
    ("bare LF line endings", b"GET /v1/models HTTP/1.1\n" + H.replace(b"\r", b"") + b"\n"),
    ("header without a colon", b"GET /v1/models HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n"),
    ("space in a header name", b"GET /v1/models HTTP/1.1\r\n" + H + b"Bad Name: 1\r\n\r\n"),
    ("space before the colon", b"GET /v1/models HTTP/1.1\r\n" + H + b"X-Name : 1\r\n\r\n"),
    ("control char in the key header", b"GET /v1/models HTTP/1.1\r\n" + H + AUTH[:-2] + b"\x01\r\n\r\n"),
    ("obsolete line folding", b"GET /v1/models HTTP/1.1\r\n" + H + b"X-A: 1\r\n  folded\r\n\r\n"),
    ("missing Host", b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n"),
    ("oversized header (100 KiB)", b"GET /v1/models HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"),
    ("oversized key header", b"GET /v1/models HTTP/1.1\r\n" + H + AUTH[:-2] + b"a" * 9000 + b"\r\n\r\n"),
    ("oversized request target", b"GET /v1/" + b"a" * 20_000 + b" HTTP/1.1\r\n" + H + b"\r\n"),
    ("too many headers", b"GET /v1/models HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n"),
    ("non-numeric Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n"),
    ("negative Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n"),
    ("conflicting Content-Lengths", b"POST /v1/chat/completions HTTP/1.1\r\n" + H
     + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    ("Transfer-Encoding with Content-Length (smuggling)", b"POST /v1/chat/completions HTTP/1.1\r\n" + H
     + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}"),
    ("unknown Transfer-Encoding", b"POST /v1/chat/completions HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n{}"),
    ("invalid chunk size", b"POST /v1/chat/completions HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    ("chunk without its CRLF", b"POST /v1/chat/completions HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n"),
    ("chunk size overflow", b"POST /v1/chat/completions HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n{}\r\n0\r\n\r\n"),
]


async def test_malformed_requests_get_4xx_and_the_proxy_keeps_serving(tmp_path, mock, proxy_process):
    p = await _proxy(proxy_process, tmp_path, mock)
    results = await asyncio.gather(*(exchange(p.traffic, data) for _, data in MALFORMED))
    wrong = {name: (r.status, r.raw[:120]) for (name, _), r in zip(MALFORMED, results)
             if r.status is None or not 400 <= r.status < 500 or r.timed_out}
    assert not wrong, f"not answered 4xx: {wrong}"
    assert max(r.elapsed for r in results) < 3
    assert mock.received == []  # nothing malformed was forwarded
    await _still_serves(p)
    assert p.proc.returncode is None


async def test_parse_error_answers_do_not_echo_the_api_key(tmp_path, mock, proxy_process):
    p = await _proxy(proxy_process, tmp_path, mock)
    bad = [data for _, data in MALFORMED if b"Bearer" in data]
    replies = await asyncio.gather(*(exchange(p.traffic, data) for data in bad))
    assert all(r.status == 400 for r in replies)
    echoed = [r.body[:150] for r in replies if CANARY.encode() in r.raw]
    assert not echoed, f"the key came back in {len(echoed)} error bodies: {echoed}"


async def test_admin_listener_answers_like_the_traffic_port(tmp_path, mock, proxy_process):
    """The admin port (0.0.0.0 by default) answers malformed requests, unknown paths and other methods
    with the proxy's JSON errors: aiohttp's default pages would quote the offending header, key included."""
    p = await _proxy(proxy_process, tmp_path, mock)
    bad = [data for _, data in MALFORMED if b"Bearer" in data]
    replies = await asyncio.gather(*(exchange(p.admin, data) for data in bad))
    assert all(r.status == 400 and b'"invalid_http_request"' in r.body for r in replies), [r.status for r in replies]
    assert not [r for r in replies if CANARY.encode() in r.raw]
    other = await exchange(p.admin, b"GET /v1/models HTTP/1.1\r\n" + H + b"\r\n")
    post = await exchange(p.admin, b"POST /metrics HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n")
    assert (other.status, post.status) == (404, 405)
    assert b'"not_found"' in other.body and b'"method_not_allowed"' in post.body
    assert CANARY.encode() not in other.raw + post.raw
    ok = await exchange(p.admin, b"GET /healthz HTTP/1.1\r\n" + H + b"\r\n")
    assert ok.status == 200 and b'"ok"' in ok.body


NON_ORIGIN_FORM = [
    ("absolute-form", b"GET http://evil.example/v1/models?x=1 HTTP/1.1\r\n" + H + AUTH + b"\r\n"),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + AUTH + b"\r\n"),
    ("authority-form", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n" + AUTH + b"\r\n"),
]

async def test_non_origin_form_request_targets_get_4xx(tmp_path, mock, proxy_process):
    """HTTP/1.1 lets a client send these forms; a reverse proxy must answer them (4xx) or forward the
    absolute-form as origin-form (RFC 9112 3.2: an origin server is sent origin-form only)."""
    p = await _proxy(proxy_process, tmp_path, mock)
    replies = await asyncio.gather(*(exchange(p.traffic, data) for _, data in NON_ORIGIN_FORM))
    statuses = {name: r.status for (name, _), r in zip(NON_ORIGIN_FORM, replies)}
    await _still_serves(p)
    forwarded = [(r.method, r.path, r.query_string) for r in mock.received if r.path != "/v1/models"
                 or r.method != "GET" or r.query_string]
    normalised = statuses["absolute-form"] == 200 and ("GET", "/v1/models", "x=1") in [
        (r.method, r.path, r.query_string) for r in mock.received]
    wrong = {name: s for name, s in statuses.items()
             if not (s is not None and 400 <= s < 500) and not (name == "absolute-form" and normalised)}
    assert not wrong, f"answers {statuses}; the upstream saw {forwarded}"


async def test_request_target_cannot_redirect_the_upstream(tmp_path, proxy_process):
    """CONNECT <digits> is appended to `upstream.url`: with the upstream on port 4 (say), `CONNECT 1234`
    would make the proxy call port 41234. No request may reach a host:port other than the configured one."""
    hits: list[bytes] = []

    async def other_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(4096))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(other_server, "127.0.0.1", 0)
    port = str(server.sockets[0].getsockname()[1])
    try:
        # the configured upstream: port 1..6 on loopback, where nothing listens
        path = write_config(tmp_path, f"http://127.0.0.1:{port[0]}")
        p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
        await exchange(p.traffic, f"CONNECT {port[1:]} HTTP/1.1\r\nHost: x\r\n".encode() + AUTH + b"\r\n", timeout=2)
        assert not hits, f"a request reached 127.0.0.1:{port}, not the configured upstream"
    finally:
        server.close()
        await server.wait_closed()
        hits.clear()  # it held the key; nothing else may see it


@pytest.mark.parametrize("size", ["buffered", "streamed"])
async def test_bad_chunk_after_the_body_started_is_answered(start_proxy, mock: MockUpstream, recorder, size):
    """aiohttp's server stops feeding a body after a malformed chunk without failing it: found hanging until
    the client gave up; a99ba43 bounds each body read by the route's idle timeout."""
    proxy = await start_proxy({"defaults": {"retry": {"replay_limit": "1KiB"}, "timeouts": {"idle": "500ms"}}})
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        first = b"10\r\n" + b"a" * 16 + b"\r\n" if size == "buffered" else b"800\r\n" + b"a" * 0x800 + b"\r\n"
        writer.write(b"POST /v1/echo/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + AUTH + b"\r\n"
                     + first)
        await writer.drain()
        if size == "buffered":  # the handler is reading the body
            await recorder.wait_for(RequestStarted, timeout=5)
        else:  # the body is streaming to the upstream
            await asyncio.wait_for(mock.wait_for_requests(1), 5)
        writer.write(b"zz\r\n")  # not a chunk size
        await writer.drain()
        try:
            async with asyncio.timeout(3):  # idle is 500 ms
                answer = await reader.read(65536)
        except TimeoutError:
            answer = None
        assert answer is not None, "no answer and no close within 3 s of a malformed chunk"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.0 4")
        if size == "streamed":
            await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)
    finally:
        writer.close()


# ----------------------------------------------------------------------------- slow clients


async def test_slow_headers_do_not_stop_others(tmp_path, quick_mock, proxy_process):
    """100 slowloris connections dribble header bytes while 100 normal requests are served quickly."""
    p = await _proxy(proxy_process, tmp_path, quick_mock)
    async with draining(p):
        await _slowloris(p)


async def _slowloris(p) -> None:
    base = await _baseline_fds(p)
    host, port = p.traffic.removeprefix("http://").rsplit(":", 1)
    stop = asyncio.Event()
    opened: list[asyncio.StreamWriter] = []

    async def slowloris(i: int) -> None:
        _, writer = await asyncio.open_connection(host, int(port))
        opened.append(writer)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"X-Slow-%d: " % i)
        for _ in range(5000):  # bounded (100 s): one header byte per 20 ms, never the end of the headers
            writer.write(b"a")
            try:
                await asyncio.wait_for(stop.wait(), 0.02)  # paces the drip; ends it when the test is done
                break
            except TimeoutError:
                pass

    slow = [asyncio.create_task(slowloris(i)) for i in range(100)]
    try:
        assert await poll(lambda: len(opened) == 100, 10)
        async with openai.AsyncOpenAI(base_url=p.traffic + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10) as c:
            async def normal() -> None:  # each within the SDK's 10 s timeout, while every slow client dribbles
                completion = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                assert completion.choices[0].message.content

            await asyncio.gather(*(normal() for _ in range(100)))
        assert not stop.is_set() and not any(t.done() for t in slow)  # still dribbling throughout
    finally:
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)
        for w in opened:
            w.close()
    assert await poll(lambda: open_fds(p.proc.pid) <= base, 10), (open_fds(p.proc.pid), base)
    assert p.proc.returncode is None


# ----------------------------------------------------------------------------- clients that leave


async def _in_flight(p) -> float:
    return sum((await _metrics(p)).get("openai_proxy_in_flight_requests", {}).values())


@pytest.mark.parametrize("size", ["buffered", "streamed"])
async def test_client_gone_mid_upload_cancels_the_upstream_request(tmp_path, quick_mock, proxy_process, size):
    p = await _proxy(proxy_process, tmp_path, quick_mock)
    base = await _baseline_fds(p)
    host, port = p.traffic.removeprefix("http://").rsplit(":", 1)
    length = 512 * 1024 if size == "buffered" else 8 * MiB  # replay_limit is 1 MiB
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n" + AUTH
                 + b"Content-Length: %d\r\n\r\n" % length)
    writer.write(b"x" * (length // 4))
    await writer.drain()
    if size == "streamed":
        await asyncio.wait_for(quick_mock.wait_for_requests(1, "/v1/files"), 5)  # the upstream request is under way
    else:
        assert await poll(lambda: _in_flight(p), 5)  # the proxy is reading the body
    writer.transport.abort()  # the client is gone
    uploads = quick_mock.requests_to("/v1/files")
    if size == "streamed":
        await asyncio.wait_for(uploads[0].cancelled.wait(), 5)
        assert not uploads[0].finished.is_set()
    assert await poll(lambda: _not_in_flight(p), 5)
    assert await poll(lambda: open_fds(p.proc.pid) <= base, 10), (open_fds(p.proc.pid), base)
    if size == "buffered":
        assert uploads == []  # a body that never arrived whole was never sent
    aborted = (await _metrics(p))["openai_proxy_requests_total"]
    assert sum(v for labels, v in aborted.items() if ("status_class", "aborted") in labels) >= 1
    await _still_serves(p)


async def _not_in_flight(p) -> bool:
    return await _in_flight(p) == 0


async def test_client_gone_mid_stream_cancels_the_upstream_request(tmp_path, quick_mock, proxy_process):
    p = await _proxy(proxy_process, tmp_path, quick_mock)
    base = await _baseline_fds(p)
    quick_mock.script("/v1/chat/completions", *[Stall(after_events=1, gate="never")] * 20)
    async with aiohttp.ClientSession() as s:
        streams = []
        for _ in range(20):
            r = await s.post(p.traffic + "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True},
                             headers={"Authorization": f"Bearer {TEST_KEY}"})
            assert r.status == 200
            assert (await r.content.readline()).startswith(b"data: ")
            streams.append(r)
        assert await _in_flight(p) == 20
        for r in streams:
            r.close()  # drops the connection mid-stream
    chats = quick_mock.requests_to("/v1/chat/completions")
    assert len(chats) == 20
    await asyncio.wait_for(asyncio.gather(*(rec.cancelled.wait() for rec in chats)), 5)
    assert await poll(lambda: _not_in_flight(p), 5)
    assert await poll(lambda: open_fds(p.proc.pid) <= base, 10), (open_fds(p.proc.pid), base)
    await _still_serves(p)
