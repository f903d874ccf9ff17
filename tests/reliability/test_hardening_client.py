"""Issue 15, the client side: a malicious or careless client over raw sockets, the project's mock upstream
behind the proxy. Expect: 100-continue (item 2), slow bodies and too many connections (item 4), paths
matched in one form and forwarded in another (item 10), CONNECT and TRACE (item 11)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import openai
import pytest

from proxy.events import RequestFinished
from proxy.routes import compile_path, normalize_path
from proxy.testing import MockUpstream

from ..conftest import TEST_KEY, write_config
from .rawhttp import exchange, parse_reply

AUTH = f"Authorization: Bearer {TEST_KEY}\r\n".encode()
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
GUARD = 5.0  # seconds: a wait that has not ended by then is a hang, not a slow machine


class Conn:
    """One raw client connection: what it sends is exactly what is written."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.got = reader, writer, b""

    @classmethod
    async def open(cls, url: str) -> Conn:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self) -> bytes:
        """The next response head (an interim 1xx included), up to its blank line."""
        async with asyncio.timeout(GUARD):
            while b"\r\n\r\n" not in self.got:
                chunk = await self.reader.read(65536)
                assert chunk, f"closed before a whole response head: {self.got!r}"
                self.got += chunk
        head, _, self.got = self.got.partition(b"\r\n\r\n")
        return head

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next whole final response: (status, lower-case headers, body)."""
        async with asyncio.timeout(GUARD):
            while not (reply := parse_reply(self.got))[3]:
                chunk = await self.reader.read(65536)
                assert chunk, f"closed before a whole response: {self.got!r}"
                self.got += chunk
        status, headers, body, _ = reply
        assert status is not None
        return status, headers, body

    async def closed(self) -> bool:
        """Whether the proxy closes the connection (rather than leaving it open) within the guard."""
        try:
            async with asyncio.timeout(GUARD):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


def _code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


# ----------------------------------------------------------------------------- item 2: Expect: 100-continue


@pytest.mark.parametrize("size", ["buffered", "streamed"])
async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(start_proxy, mock: MockUpstream, size):
    """The client sends its head, waits for `100 Continue` (as curl does above 1 MiB), then the body. The
    proxy answers the expectation itself, as nginx and Envoy do, and the upstream never sees `Expect`."""
    proxy = await start_proxy({"defaults": {"retry": {"replay_limit": "32"}}} if size == "streamed" else None)
    c = await Conn.open(proxy.url)
    try:
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(CHAT))
        interim = await c.head()
        assert interim == b"HTTP/1.1 100 Continue", interim
        await c.send(CHAT)
        status, _, body = await c.response()
    finally:
        c.close()
    assert status == 200 and json.loads(body)["choices"], body
    [rec] = mock.requests_to("/v1/chat/completions")
    assert "Expect" not in rec.headers and rec.body_size == len(CHAT)


async def test_expect_from_an_http_1_0_client_is_ignored_and_not_forwarded(start_proxy, mock: MockUpstream):
    """RFC 9110 10.1.1: an HTTP/1.0 client's 100-continue expectation is ignored (no 100); the header stays behind."""
    proxy = await start_proxy()
    reply = await exchange(proxy.url, b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n" + AUTH
                           + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(CHAT) + CHAT)
    assert reply.status == 200 and not reply.raw.startswith(b"HTTP/1.1 100"), reply.raw[:80]
    [rec] = mock.requests_to("/v1/chat/completions")
    assert "Expect" not in rec.headers


# ----------------------------------------------------------------------------- item 4: slow clients


@pytest.mark.parametrize("size", ["buffered", "streamed"])
async def test_a_trickled_body_is_cut_at_the_total_timeout(start_proxy, mock: MockUpstream, size):
    """One byte every 50 ms never trips the 10 s idle timeout; the route's total (500 ms) bounds the whole
    body phase: 408 request_body_timeout while the client is still sending, and nothing to the upstream
    but the part of a streamed upload it had already received."""
    limit = "16" if size == "streamed" else "1MiB"
    proxy = await start_proxy({"defaults": {"timeouts": {"total": "500ms"}, "retry": {"replay_limit": limit}}})
    length = 200  # 10 s at this pace
    c = await Conn.open(proxy.url)
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for _ in range(length):
            await c.send(b"x")
            sent += 1
            await asyncio.sleep(0.05)  # the client's pace, not a synchronisation

    await c.send(b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % length)
    dribbling = asyncio.create_task(trickle())
    try:
        status, headers, body = await c.response()
        assert not dribbling.done() and sent < length, "the whole body went through"
    finally:
        dribbling.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dribbling
        c.close()
    assert (status, headers.get("x-proxy-error"), _code(body)) == (408, "request_body_timeout", "request_body_timeout")
    assert b"total timeout" in body
    uploads = mock.requests_to("/v1/files")
    assert all(rec.body_size < length for rec in uploads)
    if size == "buffered":
        assert uploads == []


async def test_connections_past_the_cap_get_a_clear_503_and_are_closed(tmp_path, mock: MockUpstream, proxy_process):
    """listen.max_connections: 2, in a real `python -m proxy` (uvloop). Two keep-alive clients hold their
    connections; a third connection is answered 503 too_many_connections and closed (never silently
    dropped, never forwarded); the SDK reads it as an ordinary 503; once a held connection closes, a new
    one is served."""
    path = write_config(tmp_path, mock.url, {"listen": {"max_connections": 2}})
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
    held = [await Conn.open(p.traffic) for _ in range(2)]
    try:
        for c in held:
            await c.send(get)
            assert (await c.response())[0] == 200  # accepted and counted: the connection stays open
        extra = await Conn.open(p.traffic)
        try:
            await extra.send(get)
            status, headers, body = await extra.response()
            assert await extra.closed()
        finally:
            extra.close()
        assert (status, headers.get("x-proxy-error"), _code(body)) == (503, "too_many_connections",
                                                                         "too_many_connections")
        assert headers.get("connection") == "close" and b"listen.max_connections" in body
        async with openai.AsyncOpenAI(base_url=p.traffic + "/v1", api_key=TEST_KEY, max_retries=0) as sdk:
            with pytest.raises(openai.InternalServerError) as caught:
                await sdk.models.list()
        assert caught.value.status_code == 503 and caught.value.code == "too_many_connections"
        assert len(mock.requests_to("/v1/models")) == 2  # the refused requests never left
    finally:
        held[0].close()
    async with asyncio.timeout(GUARD):  # the proxy notices the close on its own time: ask until it has
        while (reply := await exchange(p.traffic, get)).status == 503:
            pass
    held[1].close()
    assert reply.status == 200


# ----------------------------------------------------------------------------- item 10: one form for paths

PATHS = [
    # (method, target as sent, route it gets, path the upstream sees)
    ("POST", "/v1/%63hat/completions", "chat_completions", "/v1/chat/completions"),  # %63 is "c": unreserved
    ("POST", "/v1/%76ideos", "videos_create", "/v1/videos"),  # a create's cautious policy cannot be dodged
    ("GET", "/v1/files/file-a%2Fb/content", "files_content", "/v1/files/file-a%2Fb/content"),  # %2F stays: one segment
    ("POST", "/v1/x/../chat/completions", "chat_completions", "/v1/chat/completions"),
    ("GET", "/v1/./models", "default", "/v1/models"),
    ("GET", "/v1/%2e%2E/v1/models", "default", "/v1/models"),  # an escaped dot segment is a dot segment
    ("GET", "/v1/models/..", "default", "/v1/"),
]


@pytest.mark.parametrize("method, target, route, forwarded", PATHS, ids=[p[1] for p in PATHS])
async def test_the_path_matched_is_the_path_forwarded(start_proxy, mock: MockUpstream, recorder, method, target,
                                                      route, forwarded):
    """Percent-escapes of unreserved characters are decoded and dot-segments resolved (RFC 3986 6.2.2,
    5.2.4; nginx and Envoy's normalize_path do the same) before the route is chosen, and the upstream
    gets that same path: a route's policy is given only to the path the upstream will serve."""
    proxy = await start_proxy()
    body = CHAT if method == "POST" else b""
    reply = await exchange(proxy.url, f"{method} {target}?q=%41 HTTP/1.1\r\nHost: x\r\n".encode() + AUTH
                           + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert reply.status is not None and reply.status < 500, reply.raw[:200]
    [rec] = mock.received
    assert (rec.path, rec.query_string) == (forwarded, "q=%41")  # the query is never rewritten
    [done] = recorder.of(RequestFinished)
    assert (done.route, done.path) == (route, forwarded)


@pytest.mark.parametrize("target", ["/v1/../../x", "/..", "/v1/%2e%2e/%2E%2E/x"])
async def test_a_path_above_the_root_is_refused(start_proxy, mock: MockUpstream, target):
    """nginx answers 400 to a path whose '..' segments climb above the root; so does the proxy, so no
    path can leave the upstream URL's own base path."""
    proxy = await start_proxy()
    reply = await exchange(proxy.url, f"GET {target} HTTP/1.1\r\nHost: x\r\n".encode() + AUTH + b"\r\n")
    assert (reply.status, reply.headers.get("x-proxy-error")) == (400, "invalid_request_target")
    assert mock.received == []


# ----------------------------------------------------------------------------- item 11: CONNECT and TRACE

REFUSED = [
    ("CONNECT, origin-form", b"CONNECT /v1/models HTTP/1.1\r\nHost: x\r\n"),
    ("CONNECT, authority-form", b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"),
    ("TRACE", b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\n"),
    ("TRACE with Max-Forwards", b"TRACE /v1/chat/completions HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n"),
]


@pytest.mark.parametrize("name, head", REFUSED, ids=[r[0] for r in REFUSED])
async def test_connect_and_trace_are_refused_with_405(start_proxy, mock: MockUpstream, name, head):
    """The proxy is no tunnel (CONNECT), and TRACE would echo the request back, key included: 405 in the
    OpenAI error shape, and nothing reaches the upstream."""
    proxy = await start_proxy()
    reply = await exchange(proxy.url, head + AUTH + b"\r\n")
    assert (reply.status, reply.headers.get("x-proxy-error")) == (405, "method_not_allowed"), reply.raw[:200]
    assert _code(reply.body) == "method_not_allowed"
    assert mock.received == []


NORMAL = [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/%63%68at/%7Eme%2d%5F%2E", "/v1/chat/~me-_."),  # every escaped unreserved character, either case
    ("/v1/files/a%2Fb%20c%3F", "/v1/files/a%2Fb%20c%3F"),  # reserved and other escapes stay as sent
    ("/v1//models", "/v1//models"),
    ("/v1/.well-known/x", "/v1/.well-known/x"),
    ("/v1/./models/.", "/v1/models/"),
    ("/v1/a/b/../../models", "/v1/models"),
    ("/v1/..", "/"),
    ("/v1/../..", None),
    ("/%2E%2E", None),
]


@pytest.mark.parametrize("path, normal", NORMAL)
def test_normalize_path(path, normal):
    assert normalize_path(path) == normal


def test_route_literals_are_matched_in_the_normalized_form():
    assert compile_path("/v1/%63hat/*").segments == ("v1", "chat")
    with pytest.raises(ValueError, match="dot-segment"):
        compile_path("/v1/../x")


async def test_a_clients_broken_upload_does_not_count_against_the_upstream(start_proxy, mock: MockUpstream, recorder):
    """A streamed upload cut by the total timeout while the client trickles it is the client's failure
    (408): the route's breaker (failure_threshold 1) must not open, so the next request is forwarded."""
    proxy = await start_proxy({"defaults": {"timeouts": {"total": "500ms"}, "retry": {"replay_limit": "16"},
                                            "breaker": {"failure_threshold": 1}}})
    c = await Conn.open(proxy.url)
    await c.send(b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/octet-stream\r\n"
                 b"Content-Length: 200\r\n\r\n" + b"x" * 32)

    async def trickle() -> None:
        for _ in range(168):
            await c.send(b"x")
            await asyncio.sleep(0.05)  # the client's pace, not a synchronisation

    dribbling = asyncio.create_task(trickle())
    try:
        status, headers, _ = await c.response()
    finally:
        dribbling.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dribbling
        c.close()
    assert (status, headers.get("x-proxy-error")) == (408, "request_body_timeout")
    reply = await exchange(proxy.url, b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + AUTH
                           + b"Content-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nabcd")
    assert reply.status == 200, reply.body[:200]
    assert [e.new for e in recorder.events if type(e).__name__ == "BreakerChange"] == []
