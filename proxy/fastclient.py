"""A minimal keep-alive HTTP/1.1 client for one upstream, built from aiohttp's own parts.

Why it exists: ``ClientSession.request`` costs ~47 µs of CPU per request in this proxy (request
and response objects, header multidicts, a body-writer task per request, tracing, cookie and
redirect machinery), most of which the proxy never uses. This client keeps the parts that matter
and are hard to get right, and drops the rest:

* the protocol is aiohttp's ``ResponseHandler`` (client_proto.py): the C ``HttpResponseParser``,
  ``StreamReader`` payloads with flow control (reading pauses at the high-water mark), the
  ``sock_read`` timer (``read_timeout``/``start_timeout``, reset on every byte received, stopped
  while we are the ones not reading) and aiohttp's exception types (``ServerDisconnectedError``,
  ``ClientOSError``, ``ClientPayloadError``, ``SocketTimeoutError``);
* the total timeout is aiohttp's ``TimerContext``: one ``call_at`` per request; the payload's
  reads check it, exactly as with a ``ClientSession``;
* the request head is serialised by aiohttp's C ``_serialize_headers`` (it rejects control
  characters: no header injection) into one bytes object, written with a bytes body in one
  ``transport.write``; no task is created per request;
* connecting uses aiohappyeyeballs like aiohttp's ``TCPConnector``, and maps failures to the same
  exception classes (``ClientConnectorError``, ``ClientConnectorDNSError``,
  ``ClientConnectorCertificateError``, ``ClientConnectorSSLError``, ``ConnectionTimeoutError``).

Not supported (the proxy needs none of it): proxies/``trust_env``, cookies, redirects,
decompression, ``Expect: 100-continue`` (a 1xx interim response is skipped), HTTP/1.0 requests,
pipelining, upgrades. Exception messages carry at most ``host:port``: never the request target
(query strings hold secrets) nor header values.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterator
from math import ceil
from typing import Any

import aiohappyeyeballs
import aiohttp
from aiohttp.client_exceptions import (
    ClientConnectionError,
    ClientConnectorCertificateError,
    ClientConnectorDNSError,
    ClientConnectorError,
    ClientConnectorSSLError,
    ClientError,
    ClientOSError,
    ClientPayloadError,
    ClientResponseError,
    ConnectionTimeoutError,
    ServerDisconnectedError,
)
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from aiohttp.helpers import TimerContext, TimerNoop, set_exception
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD, EofStream, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .headers import HeaderList

__all__ = ["FastClient", "FastResponse"]

_READ_BUFSIZE = 2**16  # aiohttp's default: StreamReader pauses the socket above twice this
_SMALL_WRITE = 2**16  # a bytes body up to this is copied into the head's write; larger goes separately
_DNS_TTL = 10.0  # seconds, as aiohttp's TCPConnector
_HAPPY_EYEBALLS_DELAY = 0.25
_NO_TIMER = TimerNoop()
_EMPTY_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class _Conn(ResponseHandler):
    """aiohttp's ResponseHandler plus the pool's bookkeeping for one connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: FastClient) -> None:
        super().__init__(loop)
        self._client = client
        self._counted = True  # holds one of the client's max_connections slots
        self._in_pool = False  # idle in client._idle
        self._idle_at = 0.0
        self._got_data = False  # any byte of the current response has arrived
        self._read_deadline = 0.0  # sock_read: when the current wait for bytes runs out
        self._read_armed = 0.0  # when the armed timer (_read_timeout_handle) fires

    def data_received(self, data: bytes) -> None:
        if data:
            self._got_data = True
        ResponseHandler.data_received(self, data)

    def _reschedule_timeout(self) -> None:
        # aiohttp cancels and re-creates the sock_read timer on every data_received (each SSE
        # chunk, each TLS record). Here bytes only move the deadline; the armed timer, when it
        # fires, re-arms itself for the later deadline, or raises the timeout.
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        loop = self._loop
        deadline = loop.time() + timeout
        self._read_deadline = deadline
        handle = self._read_timeout_handle
        if handle is not None:
            if self._read_armed <= deadline:
                return
            handle.cancel()  # a shorter timeout (set_read_timeout): arm for the earlier time
        self._read_armed = deadline
        self._read_timeout_handle = loop.call_at(deadline, self._read_timer)

    def _read_timer(self) -> None:
        self._read_timeout_handle = None
        deadline = self._read_deadline
        if deadline - self._loop.time() > 0.001:  # bytes arrived since it was armed
            self._read_armed = deadline
            self._read_timeout_handle = self._loop.call_at(deadline, self._read_timer)
        else:
            self._on_read_timeout()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # StreamReader calls this after every read that leaves its buffer under the low-water mark,
        # paused or not; unpaused, aiohttp's version only re-feeds the parser an empty chunk (its
        # own pause is what leaves data to resume), so skip that work.
        if self._reading_paused:
            ResponseHandler.resume_reading(self, resume_parser)

    def connection_lost(self, exc: BaseException | None) -> None:
        payload = self._payload
        ResponseHandler.connection_lost(self, exc)
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            # aiohttp 3.14 leaves the body's reader waiting (until the total timeout) when the parser
            # fails mid-body, e.g. on a malformed chunk size: it closes the transport but only fails
            # the message queue. Fail the body too, as a cut body would.
            cause = self.exception()
            what = type(cause).__name__ if cause is not None else "connection lost"
            set_exception(payload, ClientPayloadError(f"Response payload is not completed: {what}"))
        if self._in_pool:
            self._client._idle_lost(self)


class FastResponse:
    """The response head plus its body stream (`content`); owns the connection until
    `release()`/`close()`, or until the body's end has arrived (then the connection goes back
    to the pool by itself, as aiohttp's ClientResponse does)."""

    __slots__ = ("status", "reason", "headers", "content_length", "content", "version",
                 "_client", "_proto", "_handle", "_done", "_body")

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content_length: int | None
    content: StreamReader

    def __init__(self, client: FastClient, proto: _Conn, handle: asyncio.TimerHandle | None,
                 message: Any, payload: StreamReader) -> None:
        self.status = message.code
        self.reason = message.reason
        self.headers = headers = message.headers
        self.version = message.version
        length = headers.get("Content-Length")
        if length is None:
            self.content_length = None
        else:
            try:
                self.content_length = int(length)
            except ValueError:  # the parser framed the body; this is only informative
                self.content_length = None
        self.content = payload
        self._client = client
        self._proto: _Conn | None = proto
        self._handle = handle
        self._done = False
        self._body: bytes | None = None

    async def read(self) -> bytes:
        """The whole body (read once; later calls return the same bytes)."""
        if self._body is None:
            try:
                self._body = await self.content.read()
            except BaseException:
                self.close()
                raise
        return self._body

    def set_read_timeout(self, seconds: float | None) -> None:
        """Replace sock_read from now on (e.g. the idle timeout while streaming), rescheduled now."""
        proto = self._proto
        if self._done or proto is None:
            return  # the body has all arrived: no read left to time
        proto.read_timeout = seconds
        if not proto._reading_paused and not self.content.is_eof():
            proto.start_timeout()  # while paused (a slow reader) the timer stays off; resume restarts it

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if the body was read
        whole and keep-alive allows; otherwise it is closed."""
        if self._done:
            return
        content = self.content
        if content.is_eof() and content.exception() is None:
            self._finish(True)
        else:
            self.close()

    def close(self) -> None:
        """Drop the connection (body not read whole, an error, a cancellation)."""
        if self._done:
            return
        content = self.content
        if content is not EMPTY_PAYLOAD and content.exception() is None:
            set_exception(content, ClientConnectionError("Connection closed"))
        self._finish(False)

    def _on_eof(self) -> None:
        self._finish(True)

    def _finish(self, reuse: bool) -> None:
        if self._done:
            return
        self._done = True
        handle = self._handle
        if handle is not None:
            handle.cancel()
            self._handle = None
        proto = self._proto
        self._proto = None
        if proto is not None:
            if reuse:
                self._client._release(proto)
            else:
                self._client._drop(proto)

    def __del__(self) -> None:
        # A response dropped without release()/close(): free its connection and pool slot. Only
        # reachable once nothing references it (e.g. its connection was lost); the proxy always
        # closes explicitly.
        if not self._done and self._proto is not None:
            proto, self._proto = self._proto, None
            self._done = True
            if self._handle is not None:
                self._handle.cancel()
            try:
                proto._loop.call_soon(self._client._drop, proto)
            except RuntimeError:  # the loop is closed: nothing left to free
                pass

    def __repr__(self) -> str:
        return f"<FastResponse {self.status} {self.reason}>"


class FastClient:
    """Pooled keep-alive HTTP/1.1 connections to one upstream (`base_url`)."""

    def __init__(self, base_url: str, *, max_connections: int, keepalive_timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError("base_url must be http://host[:port] or https://host[:port]")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._loop = asyncio.get_running_loop()
        self._is_ssl = url.scheme == "https"
        host = url.raw_host
        port = url.port
        assert port is not None
        self._hostname = host.rstrip(".") if host.endswith(".") else host
        self._port = port
        self._hostport = f"{url.host_subcomponent}:{port}"  # for exception messages; no path
        self._host_item = ("Host", url.host_port_subcomponent or host)  # default port omitted
        self._origin = URL.build(scheme=url.scheme, host=url.raw_host, port=url.explicit_port, encoded=True)
        self._key = ConnectionKey(host, port, self._is_ssl, True, None, None, None)
        self._ssl: ssl.SSLContext | None = None
        if self._is_ssl:
            if ssl_context is None:
                ssl_context = ssl.create_default_context()
                ssl_context.set_alpn_protocols(["http/1.1"])
            self._ssl = ssl_context
        self._max = max_connections
        self._keepalive = keepalive_timeout
        self._idle: collections.deque[_Conn] = collections.deque()  # right end = most recently used
        self._active: set[_Conn] = set()  # checked out by a request or a response
        self._open = 0  # connections holding a slot: idle + active + connecting
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._cleanup_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self._static_addrs: list[Any] | None = None
        try:
            self._static_addrs = socket.getaddrinfo(self._hostname, port, type=socket.SOCK_STREAM,
                                                    flags=socket.AI_NUMERICHOST)
        except OSError:
            pass  # a name: resolved on connect, cached for _DNS_TTL
        self._dns: list[Any] | None = None
        self._dns_expires = 0.0
        self._dns_task: asyncio.Task[list[Any]] | None = None
        self._rr = 0
        self.connections_made = 0  # total connects, for tests and metrics

    # ----------------------------------------------------------------- introspection

    @property
    def open_connections(self) -> int:
        """Connections holding a slot: idle, in use, or being connected."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return len(self._active)

    # ----------------------------------------------------------------- requests

    async def request(self, method: str, url: URL, headers: list[tuple[str, str]],
                      data: bytes | AsyncIterator[bytes] | None,
                      timeout: aiohttp.ClientTimeout) -> FastResponse:
        """Send one request; return once the status line and headers are parsed."""
        if self._closed:
            raise RuntimeError("FastClient is closed")
        total = timeout.total
        handle: asyncio.TimerHandle | None = None
        timer: Any
        if total is not None and total > 0:
            loop = self._loop
            timer = TimerContext(loop)
            when = loop.time() + total
            if total >= timeout.ceil_threshold:
                when = ceil(when)
            handle = loop.call_at(when, timer.timeout)
        else:
            timer = _NO_TIMER
        try:
            with timer:
                return await self._exchange(method, url.raw_path_qs, headers, data, timeout, timer, handle)
        except BaseException:
            if handle is not None:
                handle.cancel()
            raise

    def _head(self, method: str, target: str, headers: list[tuple[str, str]],
              data: Any, streamed: bool) -> tuple[bytes, int | None]:
        has_host = has_length = has_te = False
        for name, _ in headers:
            n = len(name)
            if n == 4:
                has_host = has_host or name.lower() == "host"
            elif n == 14:
                has_length = has_length or name.lower() == "content-length"
            elif n == 17:
                has_te = has_te or name.lower() == "transfer-encoding"
        out = HeaderList(headers) if has_host else HeaderList((self._host_item, *headers))
        length: int | None = None
        if data is None:
            pass  # sent as given
        elif not streamed:
            if has_length or has_te:  # ours replaces the caller's: the body is right here
                out = HeaderList(h for h in out if h[0].lower() not in ("content-length", "transfer-encoding"))
            out.append(("Content-Length", str(len(data))))
        else:
            if has_te:
                out = HeaderList(h for h in out if h[0].lower() != "transfer-encoding")
            if has_length:
                for name, value in out:
                    if name.lower() == "content-length":
                        length = int(value)
                        if length < 0:
                            raise ValueError("negative Content-Length")
                        break
            else:
                out.append(("Transfer-Encoding", "chunked"))
        return _serialize_headers(f"{method} {target} HTTP/1.1", out), length

    async def _exchange(self, method: str, target: str, headers: list[tuple[str, str]], data: Any,
                        timeout: aiohttp.ClientTimeout, timer: Any,
                        handle: asyncio.TimerHandle | None) -> FastResponse:
        streamed = data is not None and not isinstance(data, (bytes, bytearray, memoryview))
        head, length = self._head(method, target, headers, data, streamed)
        if data is not None and not streamed:
            if not data:
                data = None
            elif len(data) <= _SMALL_WRITE:
                head, data = head + data, None
        skip_payload = method == "HEAD"
        sock_read = timeout.sock_read
        retried = False
        while True:
            proto, reused = await self._acquire(retried, timeout)
            try:
                proto.set_response_params(timer=timer, skip_payload=skip_payload, read_until_eof=True,
                                          auto_decompress=False, read_timeout=sock_read,
                                          read_bufsize=_READ_BUFSIZE,
                                          timeout_ceil_threshold=timeout.ceil_threshold)
                proto._got_data = False
                transport = proto.transport
                if transport is None or transport.is_closing():
                    raise ServerDisconnectedError()
                if streamed:
                    await self._send_stream(proto, transport, head, data, length)
                else:
                    transport.write(head)
                    if data is not None:
                        transport.write(data)
                        if proto._paused:  # a large body: sock_read starts once it is sent, as in aiohttp
                            try:
                                await proto._drain_helper()
                            except ConnectionError:
                                pass  # the read below raises the protocol's error
                    proto.start_timeout()
                message, payload = await proto.read()
                code = message.code
                while 100 <= code < 200 and code != 101:  # interim responses (103 Early Hints)
                    message, payload = await proto.read()
                    code = message.code
            except (ServerDisconnectedError, ClientOSError, EofStream) as exc:
                self._drop(proto)
                if reused and not proto._got_data:
                    # A pooled connection the upstream had closed while idle: nothing was answered.
                    # Resent once only for idempotent methods: a POST that reached the upstream could
                    # run twice, so it surfaces as a network failure and the route's policy decides.
                    if not streamed and not retried and method in _IDEMPOTENT:
                        retried = True
                        continue  # the body is still here: resend once on a fresh connection
                    raise ServerDisconnectedError() from exc
                if isinstance(exc, EofStream) or (isinstance(exc, ServerDisconnectedError)
                                                  and not isinstance(exc.message, str)):
                    raise ServerDisconnectedError() from None  # the partial message holds header values
                raise
            except HttpProcessingError as exc:
                self._drop(proto)
                info = RequestInfo(self._origin, method, _EMPTY_HEADERS, self._origin)
                raise ClientResponseError(info, (), status=exc.code,
                                          message=f"invalid HTTP response ({type(exc).__name__})") from None
            except BaseException:
                self._drop(proto)
                raise
            break
        if message.should_close or message.version != HttpVersion11:
            proto.force_close()  # Connection: close, or HTTP/1.0: never reused
        try:
            resp = FastResponse(self, proto, handle, message, payload)
        except BaseException:
            self._drop(proto)
            raise
        payload.on_eof(resp._on_eof)  # the whole body arrived: back to the pool at once
        return resp

    async def _send_stream(self, proto: _Conn, transport: asyncio.Transport, head: bytes,
                           data: AsyncIterator[bytes], length: int | None) -> None:
        """Write the head, then the body chunk by chunk as the caller's iterator yields it, waiting
        for the socket to drain. A lost connection stops the upload: the caller then reads whatever
        the upstream answered (an early error response) or the protocol's error."""
        transport.write(head)
        sent = 0
        iterator = data.__aiter__()
        while length is None or sent < length:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                raise ClientConnectionError("the request body could not be read") from exc
            if not chunk:
                continue  # an empty chunk would end a chunked body
            if transport.is_closing():
                return
            n = len(chunk)
            if length is None:
                transport.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
            else:
                if sent + n > length:
                    chunk = chunk[:length - sent]
                    n = len(chunk)
                transport.write(chunk)
            sent += n
            if proto._paused:
                try:
                    await proto._drain_helper()
                except ConnectionError:
                    return
        if length is None:
            if transport.is_closing():
                return
            transport.write(b"0\r\n\r\n")
        elif sent < length:
            raise ClientConnectionError("the request body ended before its Content-Length")
        proto.start_timeout()

    # ----------------------------------------------------------------- the pool

    async def _acquire(self, fresh: bool, timeout: aiohttp.ClientTimeout) -> tuple[_Conn, bool]:
        """A connection for one request, and whether it was reused from the pool."""
        while True:
            if self._closed:
                raise ClientConnectionError("the client is closed")
            if not fresh:
                proto = self._pop_idle()
                if proto is not None:
                    return proto, True
            elif self._open >= self._max and self._idle:
                oldest = self._idle.popleft()  # a fresh connection is wanted: make room for it
                oldest._in_pool = False
                oldest._counted = False
                self._open -= 1
                oldest.close()
            if self._open < self._max:
                self._open += 1
                return await self._connect_slot(timeout), False
            fut: asyncio.Future[_Conn | None] = self._loop.create_future()
            self._waiters.append(fut)
            try:
                if timeout.connect:
                    async with asyncio.timeout(timeout.connect) as cm:
                        got = await fut
                else:
                    got = await fut
            except BaseException as exc:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    got = fut.result()  # handed over just as we were cancelled: pass it on
                    if got is None:
                        self._open -= 1
                        self._grant_slot()
                    else:
                        self._release(got)
                else:
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass
                if timeout.connect and isinstance(exc, TimeoutError) and cm.expired():
                    raise ConnectionTimeoutError(f"Connection timeout to host {self._hostport}") from None
                raise
            if got is None:  # a slot was granted to us (already counted)
                return await self._connect_slot(timeout), False
            transport = got.transport
            if transport is not None and not transport.is_closing() and not got.should_close:
                return got, True
            self._drop(got)

    async def _connect_slot(self, timeout: aiohttp.ClientTimeout) -> _Conn:
        try:
            proto = await self._connect(timeout)
        except BaseException:
            self._open -= 1
            self._grant_slot()
            raise
        if self._closed:
            self._open -= 1
            proto.abort()
            raise ClientConnectionError("the client is closed")
        self._active.add(proto)
        self.connections_made += 1
        return proto

    def _pop_idle(self) -> _Conn | None:
        idle = self._idle
        if not idle:
            return None
        now = self._loop.time()
        keepalive = self._keepalive
        while idle:
            proto = idle.pop()
            proto._in_pool = False
            transport = proto.transport
            if (transport is not None and not transport.is_closing() and not proto.should_close
                    and now - proto._idle_at < keepalive):
                self._active.add(proto)
                return proto
            proto._counted = False
            self._open -= 1
            proto.close()
        return None

    def _release(self, proto: _Conn) -> None:
        """A request is done with `proto` and its response was complete."""
        if not proto._counted:
            return
        transport = proto.transport
        if self._closed or transport is None or transport.is_closing() or proto.should_close:
            self._drop(proto, graceful=proto.exception() is None and not proto._buffer)
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(proto)  # stays in _active: straight to the next request
                return
        self._active.discard(proto)
        proto._in_pool = True
        proto._idle_at = self._loop.time()
        self._idle.append(proto)
        if self._cleanup_handle is None:
            self._cleanup_handle = self._loop.call_at(proto._idle_at + self._keepalive, self._cleanup)

    def _drop(self, proto: _Conn, graceful: bool = False) -> None:
        """Close `proto` and free its slot (idempotent). `graceful` after a complete exchange
        (Connection: close): a TLS connection then says goodbye; otherwise it is aborted."""
        if not proto._counted:
            return
        proto._counted = False
        self._active.discard(proto)
        if proto._in_pool:
            proto._in_pool = False
            self._idle.remove(proto)
        self._open -= 1
        if proto.transport is not None:
            if graceful:
                proto.close()
            else:
                proto.abort()
        self._grant_slot()

    def _idle_lost(self, proto: _Conn) -> None:
        """The upstream closed an idle connection."""
        proto._in_pool = False
        try:
            self._idle.remove(proto)
        except ValueError:
            return
        if proto._counted:
            proto._counted = False
            self._open -= 1
            self._grant_slot()

    def _grant_slot(self) -> None:
        if self._closed:
            return
        waiters = self._waiters
        while waiters and self._open < self._max:
            fut = waiters.popleft()
            if not fut.done():
                self._open += 1
                fut.set_result(None)
                return

    def _cleanup(self) -> None:
        self._cleanup_handle = None
        idle = self._idle
        deadline = self._loop.time() - self._keepalive + 0.01  # timers may fire a hair early
        while idle and idle[0]._idle_at <= deadline:
            proto = idle.popleft()
            proto._in_pool = False
            proto._counted = False
            self._open -= 1
            proto.close()
        if idle:
            self._cleanup_handle = self._loop.call_at(idle[0]._idle_at + self._keepalive, self._cleanup)

    # ----------------------------------------------------------------- connecting

    def _factory(self) -> _Conn:
        return _Conn(self._loop, self)

    async def _connect(self, timeout: aiohttp.ClientTimeout) -> _Conn:
        """TCP (+TLS) connect bounded by sock_connect, failures mapped as aiohttp's connector does."""
        loop = self._loop
        key = self._key
        cm = asyncio.timeout(timeout.sock_connect or None)
        try:
            async with cm:
                addrs = await self._resolve()
                sock = await aiohappyeyeballs.start_connection(
                    addrs, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY, loop=loop)
                if self._ssl is None:
                    _, proto = await loop.create_connection(self._factory, sock=sock)
                else:
                    _, proto = await loop.create_connection(self._factory, sock=sock, ssl=self._ssl,
                                                            server_hostname=self._hostname)
        except ClientError:
            raise
        except ssl.CertificateError as exc:
            raise ClientConnectorCertificateError(key, exc) from exc
        except ssl.SSLError as exc:
            raise ClientConnectorSSLError(key, exc) from exc
        except OSError as exc:
            if isinstance(exc, TimeoutError) and cm.expired():
                raise ConnectionTimeoutError(f"Connection timeout to host {self._hostport}") from exc
            raise ClientConnectorError(key, exc) from exc
        return proto  # type: ignore[return-value]

    async def _resolve(self) -> list[Any]:
        addrs = self._static_addrs
        if addrs is None:
            addrs = self._dns
            if addrs is None or self._loop.time() >= self._dns_expires:
                task = self._dns_task
                if task is None:  # one lookup at a time, shared by every connect waiting on it
                    task = self._dns_task = self._loop.create_task(self._lookup())
                    task.add_done_callback(self._lookup_done)
                try:
                    addrs = await asyncio.shield(task)
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if self._closed and current is not None and not current.cancelling():
                        raise ClientConnectionError("the client is closed") from None  # close() ended it
                    raise
        if len(addrs) > 1:  # spread new connections over the upstream's addresses
            self._rr = i = (self._rr + 1) % len(addrs)
            addrs = addrs[i:] + addrs[:i]
        return list(addrs)

    async def _lookup(self) -> list[Any]:
        try:
            addrs = await self._loop.getaddrinfo(self._hostname, self._port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ClientConnectorDNSError(self._key, exc) from exc
        if not addrs:
            raise ClientConnectorDNSError(self._key, OSError("no addresses"))
        self._dns = addrs
        self._dns_expires = self._loop.time() + _DNS_TTL
        return addrs

    def _lookup_done(self, task: asyncio.Task[list[Any]]) -> None:
        self._dns_task = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    # ----------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Close every connection, idle or in use; responses being read fail."""
        if self._closed:
            return
        self._closed = True
        if self._cleanup_handle is not None:
            self._cleanup_handle.cancel()
            self._cleanup_handle = None
        if self._dns_task is not None:
            self._dns_task.cancel()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ClientConnectionError("the client is closed"))
        protos = [*self._idle, *self._active]
        self._idle.clear()
        self._active.clear()
        self._open = 0
        closing: list[asyncio.Future[None]] = []
        for proto in protos:
            proto._in_pool = False
            proto._counted = False
            transport = proto.transport
            if transport is None:
                continue
            closed = proto.closed
            if closed is not None:
                closing.append(closed)
            # Not proto.abort(): connection_lost must still fail whoever reads the response.
            transport.abort()
        if closing:
            try:
                async with asyncio.timeout(5):
                    await asyncio.gather(*closing, return_exceptions=True)
            except TimeoutError:
                pass
