"""Issue 15, the upstream side: a malicious upstream written for each test (raw asyncio sockets), a raw
client on the other side, and the proxy's own client in between.

- no request is ever handed another request's response, whatever the upstream writes on an idle
  pooled connection;
- a request with `Content-Length: 0` reaches the upstream with it;
- a status outside 100-599, or a 101, is `invalid_response`; interim 1xx responses do not hold
  `first_byte` off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from ..conftest import TEST_KEY
from .rawhttp import exchange

AUTH = f"Authorization: Bearer {TEST_KEY}\r\n"
BOUND = 5.0  # seconds: each case ends well within this
TIMEOUTS = {"defaults": {"timeouts": {"connect": "1s", "first_byte": "300ms", "idle": "300ms", "total": "10m"},
                         "breaker": {"failure_threshold": 50}}}


@dataclass
class Request:
    line: str
    headers: dict[str, str]  # lower-case names


@dataclass
class Conn:
    """One upstream connection as the malicious upstream sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[Request] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the proxy closed (or reset) it

    async def request(self) -> Request | None:
        """The next request head (its body, by Content-Length, is read and dropped); None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        line, *fields = head.decode("latin-1").split("\r\n")[:-2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        if n := int(headers.get("content-length", 0)):
            await self.reader.readexactly(n)
        self.requests.append(Request(line, headers))
        return self.requests[-1]

    async def until_closed(self) -> None:
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass

    def answer(self, body: bytes, then: bytes = b"") -> None:
        """200 with `body`, and `then` in the same write."""
        self.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s%s"
                          % (len(body), body, then))


class EvilUpstream:
    """asyncio.start_server on an ephemeral port; each accepted connection is handed to `serve`."""

    def __init__(self, serve: Callable[[Conn, int], Awaitable[None]]) -> None:
        self.serve = serve
        self.conns: list[Conn] = []

    async def __aenter__(self) -> EvilUpstream:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for conn in self.conns:
            conn.writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        self.conns.append(conn)
        try:
            await self.serve(conn, len(self.conns))
            await conn.until_closed()
        except ConnectionError:
            pass
        finally:
            conn.closed.set()
            writer.close()


def _target(req: Request) -> bytes:
    return req.line.split(" ")[1].encode()


async def _get(proxy_url: str, target: str, *, extra: str = "", method: str = "GET") -> tuple[int | None, bytes]:
    async with asyncio.timeout(BOUND):
        reply = await exchange(proxy_url, f"{method} {target} HTTP/1.1\r\nHost: proxy\r\n{AUTH}{extra}\r\n".encode(),
                               timeout=BOUND)
    return reply.status, reply.body


# ------------------------------------------------------------------ item 1: no cross-client response

UNSOLICITED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nunsolicited"


@pytest.mark.parametrize("extra,then", [
    ("a whole response, idle", "answers"),
    ("a whole response, idle", "silent"),
    ("an interim 100, idle", "answers"),
    ("a second response in the same write", "answers"),
])
async def test_bytes_on_an_idle_connection_never_reach_another_request(start_proxy, recorder, extra, then):
    """Client A is answered; the upstream then writes bytes nobody asked for on that keep-alive
    connection. The proxy must drop it: B and C each get their own answer, never A's nor the stray one."""
    go = asyncio.Event()

    async def serve(conn: Conn, n: int) -> None:
        req = await conn.request()
        assert req is not None
        glued = n == 1 and extra.startswith("a second")
        conn.answer(_target(req), UNSOLICITED if glued else b"")
        if n == 1:
            if not glued:
                await go.wait()  # A's answer has reached the client: the connection is idle in the pool
                conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" if "100" in extra else UNSOLICITED)
            if then == "silent":
                return
        while (req := await conn.request()) is not None:
            conn.answer(_target(req))  # whoever is sent here gets the answer to its own request

    async with EvilUpstream(serve) as up:
        proxy = await start_proxy(TIMEOUTS, upstream=up.url)
        assert await _get(proxy.url, "/v1/models?who=A") == (200, b"/v1/models?who=A")
        go.set()
        async with asyncio.timeout(BOUND):
            await up.conns[0].closed.wait()  # the proxy dropped the connection that spoke out of turn
        for who in "BC":
            assert await _get(proxy.url, f"/v1/models?who={who}") == (200, f"/v1/models?who={who}".encode())
    assert [len(c.requests) for c in up.conns] == [1, 2]  # B went to a fresh connection, C reused it
    assert [r.category for r in recorder.requests] == ["ok"] * 3


# ------------------------------------------------------------------ item 7: Content-Length: 0 kept

async def _echo(conn: Conn, n: int) -> None:
    while (req := await conn.request()) is not None:
        conn.answer(_target(req))


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("framing", ["Content-Length: 0\r\n", ""])
async def test_empty_body_of_a_body_method_reaches_the_upstream_with_content_length_0(start_proxy, method, framing):
    """`POST /v1/batches/{id}/cancel` with `Content-Length: 0` (as the SDK sends it): an upstream may
    answer 411 to a POST without a length, so it keeps it; with no framing header at all it gets one."""
    async with EvilUpstream(_echo) as up:
        proxy = await start_proxy(TIMEOUTS, upstream=up.url)
        assert await _get(proxy.url, "/v1/batches/b1/cancel", method=method, extra=framing) == (
            200, b"/v1/batches/b1/cancel")
        assert await _get(proxy.url, "/v1/models") == (200, b"/v1/models")
    sent = [r.headers for c in up.conns for r in c.requests]
    assert sent[0].get("content-length") == "0" and "transfer-encoding" not in sent[0]
    assert "content-length" not in sent[1]  # a GET without a body gets none (RFC 9110 8.6)


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
async def test_a_clients_content_length_0_is_kept_for_any_method(start_proxy, method):
    """The client framed its request with `Content-Length: 0`: the upstream sees the same framing."""
    async with EvilUpstream(_echo) as up:
        proxy = await start_proxy(TIMEOUTS, upstream=up.url)
        assert await _get(proxy.url, "/v1/files/f1", method=method, extra="Content-Length: 0\r\n") == (
            200, b"/v1/files/f1")
    sent = [r.headers for c in up.conns for r in c.requests]
    assert sent[0].get("content-length") == "0" and "transfer-encoding" not in sent[0]


# ------------------------------------------------------------------ item 8: the status line

def _raw(data: bytes, then: str = "hold") -> Callable[[Conn, int], Awaitable[None]]:
    async def serve(conn: Conn, n: int) -> None:
        await conn.request()
        conn.writer.write(data)
        if then == "close":
            conn.writer.close()
    return serve


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 600 Beyond\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 999 Beyond\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 099 Below\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n",
], ids=["600", "999", "099", "000", "101", "101 upgrade", "101 with a body", "100 then 101"])
@pytest.mark.parametrize("then", ["hold", "close"])
async def test_status_outside_100_599_or_101_is_invalid_response(start_proxy, recorder, data, then):
    """Never passed on, never retried as a server error: 502 invalid_upstream_response at once (the
    proxy never asks for an upgrade, so a 101 is as wrong as a 600), not a timeout later."""
    async with EvilUpstream(_raw(data, then)) as up:
        proxy = await start_proxy(TIMEOUTS, upstream=up.url)
        async with asyncio.timeout(BOUND):
            reply = await exchange(proxy.url, f"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n{AUTH}"
                                   "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}".encode(),
                                   timeout=BOUND)
    assert (reply.status, reply.headers.get("x-proxy-error")) == (502, "invalid_upstream_response")
    assert b"hi" not in reply.body and b"Beyond" not in reply.body
    assert [a.category for a in recorder.attempts] == ["invalid_response"]  # one attempt: not retried
    assert len(up.conns) == 1


@pytest.mark.parametrize("first,drip", [
    (b"", b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"),
    (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"z"),  # a head trickled one byte at a time
], ids=["103 Early Hints", "a trickled head"])
async def test_interim_responses_do_not_hold_off_first_byte(start_proxy, recorder, first, drip):
    """A 103 every 100 ms and never a final response (or a head one byte every 100 ms): `first_byte`
    (300 ms) still ends the attempt, as 504 upstream_timeout; `total` is 10 min here, so only
    first_byte can end it within the test's bound."""
    async def serve(conn: Conn, n: int) -> None:
        await conn.request()
        conn.writer.write(first)
        closed = asyncio.ensure_future(conn.until_closed())
        while not closed.done():  # pacing, not synchronisation: the proxy's timer must fire meanwhile
            conn.writer.write(drip)
            await asyncio.wait({closed}, timeout=0.1)

    async with EvilUpstream(serve) as up:
        proxy = await start_proxy({**TIMEOUTS, "defaults": {**TIMEOUTS["defaults"], "retry": {"max_attempts": 1}}},
                                  upstream=up.url)
        status, body = await _get(proxy.url, "/v1/models")
    assert status == 504 and b"did not send response headers within 300ms" in body
    assert [a.category for a in recorder.attempts] == ["timeout"]


async def test_interim_responses_then_a_final_one_pass(start_proxy, recorder):
    """The rule does not break 1xx: interim responses before the final one are skipped, as before."""
    async with EvilUpstream(_raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as up:
        proxy = await start_proxy(TIMEOUTS, upstream=up.url)
        assert await _get(proxy.url, "/v1/models") == (200, b"ok")
