"""One upstream HTTP/1.1 connection on public APIs only (why our own client: README, "The upstream
client"): an asyncio Protocol feeding httptools' llhttp parser, with flow control both ways and the
sock_read timer, and the Response the proxy reads; proxy.upstream.Pool owns connections, slots and the
total timeout. Errors are aiohttp's public exception classes (and UnrelayableResponse for a status
no HTTP/1.1 response may have), their messages carry at most host:port: never the request target
(query strings hold secrets) nor header values. No 100-continue, pipelining or upgrades (not needed).
"""

from __future__ import annotations

import asyncio
import http
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .classify import UnrelayableResponse

Body = bytes | bytearray | memoryview
HIGH_WATER = 2**17  # body bytes held for a slow reader before the socket stops being read
_MAX_FIELD, _MAX_FIELDS, _MAX_HEAD = 8190, 128, 2**20  # aiohttp's limits on a response head
_OURS = frozenset({"host", "content-length", "transfer-encoding"})  # set by the client, not the caller
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # CR and LF are counted apart
EMPTY: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_CONNECT_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")


def tunnel_refusal(head: bytes) -> str | None:
    """Why a forward proxy's answer to CONNECT (read up to its blank line) opens no tunnel, or None.
    A fixed phrase with the status: never the proxy's own words, which may echo the request."""
    if (m := _CONNECT_STATUS.match(head)) is None:
        return "the forward proxy did not answer CONNECT with HTTP/1.x"
    if not 200 <= (status := int(m[1])) < 300:
        try:
            phrase = f" {http.HTTPStatus(status).phrase}"
        except ValueError:
            phrase = ""
        hint = ": check the credentials in upstream.proxy" if status == 407 else ""
        return f"the forward proxy refused the tunnel ({status}{phrase}){hint}"
    if not head.endswith(b"\r\n\r\n"):
        return "the forward proxy sent bytes before the TLS handshake"
    return None


def request_head(method: str, target: str, host_line: str, headers: list[tuple[str, str]],
                 data: Body | AsyncIterator[bytes] | None) -> tuple[bytes, int | None]:
    """The request head, and the length a streamed body is held to (None: chunked). A bytes body gets
    its Content-Length; a streamed one keeps the caller's, else goes chunked. Control characters are
    refused (no header injection)."""
    streamed = data is not None and not isinstance(data, Body)
    lines = [f"{method} {target} HTTP/1.1", host_line]
    length: int | None = None
    for name, value in headers:
        if len(name) in (4, 14, 17) and (low := name.lower()) in _OURS:
            if low != "content-length" or not streamed:
                continue  # ours replaces the caller's
            if (length := int(value)) < 0:
                raise ValueError("a negative Content-Length")
        lines.append(f"{name}: {value}")
    if streamed and length is None:
        lines.append("Transfer-Encoding: chunked")
    elif isinstance(data, Body):
        lines.append(f"Content-Length: {len(data)}")
    text = "\r\n".join(lines) + "\r\n\r\n"
    n = len(lines) + 1
    if text.count("\r") != n or text.count("\n") != n or _CONTROL.search(text):
        raise ValueError("a control character in the request head")
    return text.encode("utf-8", "surrogateescape"), length  # surrogates: the client's own obs-text bytes


class Owner(Protocol):
    """What connections and responses need from their pool (proxy.upstream.Pool)."""

    loop: asyncio.AbstractEventLoop
    info: aiohttp.RequestInfo  # the origin, for ClientResponseError
    free_slot: Callable[[], None]

    def put(self, conn: Connection) -> None: ...
    def drop(self, conn: Connection, *, graceful: bool = False) -> None: ...


class Response:
    """Status and headers, then the body as it arrives (`content.readany()`, as with aiohttp). Holds
    its connection and pool slot until the body has all arrived (the connection then goes back to
    the pool by itself) or until close()/release(), both idempotent."""

    status = 0  # 0 until the headers are in
    reason = ""
    headers = EMPTY
    content_length: int | None = None
    conn: Connection | None = None
    slot = expired = eof = False
    exc: BaseException | None = None
    waiter: asyncio.Future[None] | None = None
    total: asyncio.TimerHandle | None = None  # the total timeout (the pool's)
    task: asyncio.Task[Any] | None = None  # the pool's request(), until it returns the headers
    _body: bytes | None = None
    _size = 0  # bytes in `chunks`

    def __init__(self, owner: Owner, method: str) -> None:
        self._owner, self.method = owner, method
        self.chunks: list[bytes] = []

    content = property(lambda self: self)  # aiohttp's `resp.content.readany()`

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waits for some); b"" at the end; raises if it broke."""
        while True:
            if self.exc is not None:
                raise self.exc
            if chunks := self.chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                if self.conn is not None and self.conn.paused:
                    self.conn.resume()
                return data
            if self.eof:
                return b""
            await self.wait()

    async def read(self) -> bytes:
        """The whole body (read once; later calls return the same bytes)."""
        if self._body is None:
            parts = []
            try:
                while chunk := await self.readany():
                    parts.append(chunk)
            except BaseException:
                self.close()
                raise
            self._body = b"".join(parts)
        return self._body

    def set_read_timeout(self, seconds: float | None) -> None:
        """sock_read from now on (the relay's idle timeout once the headers are in)."""
        if self.conn is not None:
            self.conn.timeout = seconds
            if not self.conn.paused:
                self.conn.arm()

    def close(self) -> None:
        """Drop the connection unless the body has all arrived; later reads then fail."""
        if self.conn is not None:
            self.abort(aiohttp.ClientConnectionError("Connection closed"))
        else:
            self.end(self.exc)

    release = close  # a body that has all arrived left its connection in the pool already

    async def wait(self) -> None:
        """Until something happens: headers, body bytes, the end or a failure."""
        self.waiter = self._owner.loop.create_future()
        await self.waiter

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self, exc: BaseException | None = None) -> None:
        """The exchange is over, complete (no `exc`) or failed: frees the connection, slot and timer."""
        if exc is None:
            self.eof = True
        elif self.exc is None:
            self.exc = exc
        self.conn = None
        if self.total is not None:
            self.total.cancel()
            self.total = None
        if self.slot:
            self.slot = False
            self._owner.free_slot()
        self.wake()

    def abort(self, exc: BaseException) -> None:
        conn = self.conn
        self.end(exc)
        if conn is not None:
            conn.resp = None
            self._owner.drop(conn)

    def expire(self) -> None:
        """The total timeout: before the headers it cancels request(), which raises TimeoutError;
        after them it fails the body, as aiohttp's payload reads do."""
        self.total = None
        self.expired = True
        if self.task is not None:
            self.task.cancel()
        else:
            self.abort(asyncio.TimeoutError())


class Connection(asyncio.Protocol):
    """One connection: sends a request, and llhttp parses what arrives into its Response."""

    transport: asyncio.Transport | None = None
    resp: Response | None = None  # the exchange under way
    reason = b""
    head_bytes = 0  # of this response's head; 0 also means nothing arrived
    done = broken = sending = paused = reusable = until_eof = pooled = False
    idle_at = deadline = 0.0
    drain: asyncio.Future[None] | None = None  # while the transport's write buffer is full
    timeout: float | None = None  # sock_read: no byte for this long fails the exchange
    timer: asyncio.TimerHandle | None = None

    def __init__(self, owner: Owner) -> None:
        self.owner, self.loop = owner, owner.loop
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.stop_timer()
        self.resume_writing()  # an upload waiting for the buffer stops; the read reports
        resp, self.resp = self.resp, None
        if resp is not None and resp.status and self.until_eof and exc is None:
            resp.end()  # a body delimited by the connection's end: complete
        elif resp is not None:
            err = aiohttp.ClientPayloadError("Response payload is not completed") if resp.status else (
                aiohttp.ServerDisconnectedError())
            err.__cause__ = exc
            resp.end(err)
        self.owner.drop(self)

    def pause_writing(self) -> None:
        self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def send(self, resp: Response, head: bytes, data: Body | AsyncIterator[bytes] | None,
                   length: int | None, sock_read: float | None) -> None:
        """Start an exchange: the head, then the body, waiting while the socket's buffer is full; then
        the sock_read clock starts, as in aiohttp. A lost connection stops an upload: the caller then
        reads what the upstream answered, or the error."""
        self.resp, resp.conn, self.timeout, self.head_bytes = resp, self, sock_read, 0
        self.done = False
        self.sending = True  # a response before the body is all out leaves the connection unusable
        transport = self.transport
        assert transport is not None
        transport.write(head)
        if data is not None and not isinstance(data, Body):
            await self._upload(transport, data, length)
        elif data:
            transport.write(data)
        if self.drain is not None:
            await self.drain
        self.sending = False  # a failed upload leaves it set: the connection is dropped anyway
        if resp.conn is self:
            self.arm()

    async def _upload(self, transport: asyncio.Transport, data: AsyncIterator[bytes], length: int | None) -> None:
        sent = 0
        iterator = data.__aiter__()
        while length is None or sent < length:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                raise aiohttp.ClientConnectionError("the request body could not be read") from exc
            if transport.is_closing():
                return
            if length is not None:
                transport.write(chunk := chunk[:length - sent])
            elif chunk:  # an empty chunk would end a chunked body
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            sent += len(chunk)
            if self.drain is not None:
                await self.drain
        if length is None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
        elif length is not None and sent < length:
            raise aiohttp.ClientConnectionError("the request body ended before its Content-Length")

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            if self.resp is not None:
                self.arm()

    def arm(self) -> None:
        """(Re)start sock_read from now. Bytes only move the deadline: no new timer per chunk."""
        if not self.timeout:
            return self.stop_timer()
        self.deadline = self.loop.time() + self.timeout
        if self.timer is not None and self.timer.when() > self.deadline:
            self.stop_timer()  # a shorter timeout than the armed one
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self.on_timer)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_timer(self) -> None:
        self.timer = None
        if self.paused or self.resp is None:
            return  # our reader is the slow one: resume() restarts the clock
        if self.deadline - self.loop.time() > 0.001:
            self.timer = self.loop.call_at(self.deadline, self.on_timer)
        else:
            self.resp.abort(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for: the connection cannot be trusted again
            return self.owner.drop(self)
        try:
            if not resp.status:
                self.head_bytes += len(data)
                if self.head_bytes > _MAX_HEAD:
                    raise httptools.HttpParserError("response head too large")
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.broken = True  # after a complete response, extra bytes only spoil the connection
            if not self.done:
                why = f"invalid HTTP response ({type(exc).__name__})"
                bad = exc.__context__  # what a callback raised
                return resp.abort(bad if isinstance(bad, UnrelayableResponse) else
                                  aiohttp.ClientResponseError(self.owner.info, (), message=why)
                                  if resp.task is not None else aiohttp.ClientPayloadError(why))
        if self.timer is not None and resp.status:  # sock_read from the final head on; before it, first_byte
            self.deadline = self.loop.time() + self.timeout  # type: ignore[operator]  # is a deadline (1xx: no reset)
        if self.done:
            self.resp = None
            self.stop_timer()
            if self.paused:
                self.resume()
            if resp.method == "HEAD":
                self.parser = httptools.HttpResponseParser(self)  # llhttp would wait for a body
            self.owner.put(self)

    def on_message_begin(self) -> None:
        if self.done:
            raise httptools.HttpParserError("a response nobody asked for")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.fields) >= _MAX_FIELDS or len(name) > _MAX_FIELD or len(value) > _MAX_FIELD:
            raise httptools.HttpParserError("too many or too large headers")
        # as aiohttp decodes them; obs-text survives as surrogates (.encode("utf-8", "surrogateescape"))
        self.fields.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser, resp = self.parser, self.resp
        status = parser.get_status_code()
        fields, reason, self.fields, self.reason = self.fields, self.reason, [], b""
        if status == 101 or not 100 <= status <= 599:  # a 0 would read as "no head yet"
            why = "it switched protocols unasked" if status == 101 else "its status is outside 100-599"
            raise UnrelayableResponse(why)
        if status < 200 or resp is None:  # an interim response (103 Early Hints): skipped
            return
        resp.status, resp.reason = status, reason.decode("utf-8", "surrogateescape")
        resp.headers = headers = CIMultiDictProxy(CIMultiDict(fields))
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():  # llhttp frames the body; this is informative
            resp.content_length = int(length)
        resp.wake()  # request() waits for the headers
        self.reusable = parser.should_keep_alive() and parser.get_http_version() == "1.1" and not self.sending
        self.until_eof = length is None and status not in (204, 304) and "Transfer-Encoding" not in headers
        if resp.method == "HEAD":
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if self.done or resp is None:
            self.broken = True  # a body after a HEAD response
            return
        resp.chunks.append(body)
        resp._size += len(body)
        resp.wake()
        if resp._size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True  # the reader is behind: stop reading, and the sock_read clock with it
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.resp is not None and self.resp.status and not self.done:  # status 0: an interim response
            self.done = True
            self.resp.end()
