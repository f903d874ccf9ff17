"""The upstream side: one pool of keep-alive HTTP/1.1 connections (proxy.client) per upstream, one
attempt at a time. No retry logic lives here. Bodies pass byte-identical (nothing is decompressed),
and nothing is added: no cookies, redirects, User-Agent, Accept or Content-Type.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from math import ceil
from typing import Any

import aiohappyeyeballs
import aiohttp
from yarl import URL

from .body import RequestBody
from .classify import UpstreamUnreachable
from .client import EMPTY, Body, Connection, Response, request_head, tunnel_refusal
from .config import ProxyConfig, forward_proxy
from .headers import Headers
from .upstreams import CLIENT_CREDENTIALS, BaseUrl, Credential

_SMALL_WRITE = 2**16  # a bytes body up to this goes out in the head's write
_DNS_TTL = 10.0  # seconds, as aiohttp's TCPConnector
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "QUERY"})  # an empty body is sent as Content-Length: 0
_UNREACHABLE = ((ssl.SSLCertVerificationError, "its TLS certificate could not be verified"),
                (ssl.SSLError, "the TLS handshake failed"), (socket.gaierror, "its host name could not be resolved"),
                (ConnectionRefusedError, "the connection was refused"), (OSError, "the connection could not be established"))
_TUNNEL_HEAD = 2**16  # a forward proxy's answer to CONNECT, at most
_PROXY_407 = "the forward proxy refused the request (407 Proxy Authentication Required): " \
             "check the credentials in upstream.proxy"


class Pool:
    """Keep-alive HTTP/1.1 connections to one upstream. A request holds one of `max_connections`
    slots until its response ends, so there are never more connections than that. Through a forward
    `proxy`: an http upstream gets absolute-form requests, an https one a CONNECT tunnel per connection."""

    _absolute = ""  # proxied http upstream: "http://host:port", the absolute-form prefix
    _proxy_headers: tuple[tuple[str, str], ...] = ()  # with it: the proxy's credentials, on every request
    _connect: bytes | None = None  # proxied https upstream: the CONNECT request opening each connection

    def __init__(self, base_url: str, *, max_connections: int, keepalive_timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None, proxy: URL | None = None) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host or max_connections < 1:
            raise ValueError("base_url must be http(s)://host[:port] and max_connections at least 1")
        self.loop = asyncio.get_running_loop()
        self._host, self._port = url.raw_host, url.port or 0
        self._hostport = f"{url.host_subcomponent}:{self._port}"  # for messages: no path
        self._host_line = f"Host: {url.host_port_subcomponent}"
        self.info = aiohttp.RequestInfo(url.origin(), "GET", EMPTY, url.origin())  # for ClientResponseError
        self._ssl = ssl_context
        if url.scheme == "https" and ssl_context is None:
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        self._max, self._keepalive = max_connections, keepalive_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self.free_slot = self._slots.release  # a response's, when it ends
        self._queued = 0  # requests waiting for a slot
        self._idle: collections.deque[Connection] = collections.deque()  # right end: most recently used
        self._conns: set[Connection] = set()  # every open connection, idle or not
        self._cleanup_handle: asyncio.TimerHandle | None = None
        self._addrs: list[Any] = []
        self._proxied = proxy is not None
        self._dial = (self._host, self._port) if proxy is None else (proxy.raw_host or "", proxy.port or 80)
        if proxy is not None:
            self._via(proxy, url)
        self._addrs_until = 0.0
        self._closed = self._retired = False
        self.connections_made = 0

    def _via(self, proxy: URL, url: URL) -> None:
        auth = (("Proxy-Authorization", "Basic " + base64.b64encode(
            f"{proxy.user or ''}:{proxy.password or ''}".encode()).decode()),) if proxy.user is not None else ()
        if url.scheme == "http":
            self._absolute, self._proxy_headers = f"http://{url.host_port_subcomponent}", auth
        else:
            lines = [f"CONNECT {self._hostport} HTTP/1.1", f"Host: {self._hostport}", *map(": ".join, auth), "", ""]
            self._connect = "\r\n".join(lines).encode()

    open_connections = property(lambda self: len(self._conns))
    idle_connections = property(lambda self: len(self._idle))
    in_use = property(lambda self: len(self._conns) - len(self._idle))

    async def request(self, method: str, url: URL, headers: Headers, data: Body | AsyncIterator[bytes] | None,
                      timeout: aiohttp.ClientTimeout) -> Response:
        """Send one request; return once the status line and headers are in. A pooled connection the
        upstream had closed unanswered is retried once on a fresh one, only for an idempotent method
        with a bytes body: a POST that reached the upstream could run twice, so it fails as `network`."""
        if self._closed:
            raise RuntimeError("the client is closed")
        target = url.raw_path_qs
        if self._absolute:  # through a forward proxy
            target, headers = self._absolute + target, [*headers, *self._proxy_headers]
        head, length = request_head(method, target, self._host_line, headers, data)
        resendable = method in _IDEMPOTENT and (data is None or isinstance(data, Body))
        if isinstance(data, Body) and len(data) <= _SMALL_WRITE:
            head, data = head + data, None
        resp = Response(self, method)
        resp.task = task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        at = None
        if total := timeout.total:
            at = self.loop.time() + total
            at = ceil(at) if total >= timeout.ceil_threshold else at
            resp.total = self.loop.call_at(at, resp.expire)
        fresh = False
        try:
            while True:
                await self._take_slot(resp, timeout)
                conn, reused = await self._connection(fresh, timeout)
                await conn.send(resp, head, data, length, timeout.sock_read)
                while not resp.status and resp.exc is None:
                    await resp.wait()
                if resp.exc is None:
                    if resp.status == 407 and self._absolute:  # the forward proxy's answer, not the upstream's
                        raise UpstreamUnreachable(self._hostport, _PROXY_407, ConnectionRefusedError(_PROXY_407))
                    resp.task = None
                    return resp
                if not (isinstance(resp.exc, aiohttp.ServerDisconnectedError) and reused and resendable
                        and not conn.head_bytes):  # closed unanswered; `reused` is False once `fresh`
                    raise resp.exc
                fresh, resp.exc = True, None
                if at is not None:  # the failure ended the exchange and its timer: the resend keeps the deadline
                    resp.total = self.loop.call_at(at, resp.expire)
        except BaseException as exc:
            resp.close()
            if isinstance(exc, asyncio.CancelledError) and resp.expired and task.uncancel() <= cancelling:
                raise asyncio.TimeoutError() from None  # total ran out before the headers
            raise

    async def _take_slot(self, resp: Response, timeout: aiohttp.ClientTimeout) -> None:
        """One of max_connections for this request; waiting is bounded by `connect`, as in aiohttp."""
        if self._slots.locked():
            self._queued += 1
            try:
                async with asyncio.timeout(timeout.connect or None):
                    await self._slots.acquire()
            except TimeoutError:
                raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {self._hostport}") from None
            finally:
                self._queued -= 1
        else:
            await self._slots.acquire()  # free: returns at once
        resp.slot = True
        if self._closed:
            raise aiohttp.ClientConnectionError("the client is closed")

    async def _connection(self, fresh: bool, timeout: aiohttp.ClientTimeout) -> tuple[Connection, bool]:
        """The most recently used live idle connection (unless `fresh`), else a new one (happy
        eyeballs, as aiohttp, then TLS, within sock_connect); and whether it was pooled."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            conn.pooled = False
            if not conn.transport.is_closing() and self.loop.time() - conn.idle_at < self._keepalive:  # type: ignore[union-attr]
                return conn, True
            self.drop(conn)
        if fresh and len(self._conns) >= self._max and self._idle:
            self.drop(self._idle[0])  # make room for the fresh connection
        loop, sock = self.loop, None
        try:
            async with asyncio.timeout(timeout.sock_connect or None) as cm:
                if loop.time() >= self._addrs_until:
                    self._addrs = await loop.getaddrinfo(*self._dial, type=socket.SOCK_STREAM)
                    self._addrs_until = loop.time() + _DNS_TTL
                sock = await aiohappyeyeballs.start_connection(self._addrs, happy_eyeballs_delay=0.25)
                if self._connect is not None:
                    await self._tunnel(sock, self._connect)
                _, conn = await loop.create_connection(lambda: Connection(self), sock=sock, ssl=self._ssl,
                                                       server_hostname=self._host.rstrip(".") if self._ssl else None)
        except OSError as exc:
            if isinstance(exc, TimeoutError) and cm.expired():
                raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {self._hostport}") from None
            why = next(why for kind, why in _UNREACHABLE if isinstance(exc, kind))
            if sock is None and self._proxied:
                why = f"the forward proxy could not be reached: {why}"
            raise UpstreamUnreachable(self._hostport, why, exc) from exc
        self._conns.add(conn)
        self.connections_made += 1
        if self._closed:
            self.drop(conn)
            raise aiohttp.ClientConnectionError("the client is closed")
        return conn, False

    async def _tunnel(self, sock: socket.socket, request: bytes) -> None:
        """CONNECT through the forward proxy on `sock`; closes it unless the proxy answered 2xx."""
        head = b""
        try:
            await self.loop.sock_sendall(sock, request)
            while b"\r\n\r\n" not in head and len(head) < _TUNNEL_HEAD:
                if not (chunk := await self.loop.sock_recv(sock, _TUNNEL_HEAD)):
                    raise ConnectionResetError("the forward proxy closed the connection during CONNECT")
                head += chunk
            if why := tunnel_refusal(head):
                raise UpstreamUnreachable(self._hostport, why, ConnectionRefusedError(why))
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                why = "the forward proxy closed the connection during CONNECT"
                raise UpstreamUnreachable(self._hostport, why, exc) from exc
            raise

    def put(self, conn: Connection) -> None:
        """The exchange on `conn` is complete: back to the pool, or closed if it cannot be reused."""
        if self._closed or conn.transport is None or conn.transport.is_closing() or not conn.reusable or conn.broken \
                or self._retired:
            return self.drop(conn, graceful=not conn.broken)
        conn.pooled, conn.idle_at = True, self.loop.time()
        self._idle.append(conn)
        if self._cleanup_handle is None:
            self._cleanup_handle = self.loop.call_at(conn.idle_at + self._keepalive, self._cleanup)

    def drop(self, conn: Connection, *, graceful: bool = False) -> None:
        """Close `conn` (idempotent): `graceful` after a complete exchange (a TLS goodbye), else abort."""
        if conn.transport is not None:
            conn.transport.close() if graceful else conn.transport.abort()
        self._conns.discard(conn)
        if conn.pooled:
            conn.pooled = False
            self._idle.remove(conn)

    def _cleanup(self) -> None:
        """Close connections idle for longer than the keep-alive timeout."""
        self._cleanup_handle = None
        limit = self.loop.time() - self._keepalive + 0.01  # timers may fire a hair early
        while self._idle and self._idle[0].idle_at <= limit:
            self.drop(self._idle[0], graceful=True)
        if self._idle:
            self._cleanup_handle = self.loop.call_at(self._idle[0].idle_at + self._keepalive, self._cleanup)

    def retire(self) -> None:
        """A reload replaced this pool: requests still using it finish, but no connection goes back to
        it, so it holds none once they have (nothing waits to close it; the last user lets it go)."""
        self._retired = True
        while self._idle:
            self.drop(self._idle[0], graceful=True)

    async def close(self) -> None:
        """Close every connection, idle or in use; responses being read and waiting requests fail."""
        if self._closed:
            return
        self._closed = True
        if self._cleanup_handle is not None:
            self._cleanup_handle.cancel()
        for _ in range(self._queued):
            self._slots.release()  # each waiter wakes to a closed client
        for conn in list(self._conns):
            if conn.resp is not None:
                conn.resp.abort(aiohttp.ClientConnectionError("the client is closed"))
            self.drop(conn)
        await asyncio.sleep(0)  # let the transports report connection_lost


UpstreamClient = Pool
UpstreamResponse = Response
switch_to_idle_timeout = Response.set_read_timeout  # (resp, idle): after the headers, idle replaces first_byte


def create_client(config: ProxyConfig, url: str | None = None, max_connections: int | None = None) -> Pool:
    """The pool for `url` (default upstream.url), through upstream.proxy and trusting upstream.ca_file,
    as every upstream is. Inside the running loop (the app's cleanup_ctx): the pool binds to it."""
    up, context = config.upstream, None
    url = url or up.url
    if up.ca_file is not None and URL(url).scheme == "https":
        context = ssl.create_default_context(cafile=up.ca_file)  # instead of the system store, as curl --cacert
        context.set_alpn_protocols(["http/1.1"])
    return Pool(url, max_connections=max_connections or up.max_connections, ssl_context=context,
                proxy=forward_proxy(up, url))


class Endpoint:
    """One upstream as attempts use it: its pool, how a client path joins its URL, and the credential
    header it gets instead of the client's (built once; its repr never shows the value)."""

    __slots__ = ("name", "pool", "base", "host", "injects", "_credential", "_drop")

    def __init__(self, name: str, pool: Pool, url: str, credential: Credential | None) -> None:
        self.name, self.pool, self.base = name, pool, BaseUrl.of(url)
        self.host = URL(url).host or url  # for error messages
        self._credential = (credential.header, credential.value.reveal()) if credential is not None else None
        self.injects = credential is not None  # else headers() would hand the client's back: skip the call
        self._drop = CLIENT_CREDENTIALS | {credential.header.lower()} if credential is not None else frozenset()

    def headers(self, client: Headers) -> Headers:
        """The client's headers as this upstream gets them: as they are, or with its own credential
        in place of the client's."""
        if self._credential is None:
            return client
        drop = self._drop
        return [h for h in client if h[0].lower() not in drop] + [self._credential]

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.base.base!r}, credential={'***' if self._credential else None})"


def send(client: UpstreamClient, method: str, url: URL, headers: Headers, body: RequestBody,
         timeout: aiohttp.ClientTimeout) -> Awaitable[UpstreamResponse]:
    """One attempt; awaited, it returns once response headers have arrived (the body is still unread).
    A body method without a body gets `Content-Length: 0` (RFC 9110 8.6, as httpx sends it): a server
    may answer 411 to a POST without a length, and the client's own `Content-Length: 0` arrives as no body."""
    data = body.data
    if data is None:
        if method in _BODY_METHODS:
            data = b""
    elif body.streamed and body.size is not None:
        headers = [*headers, ("Content-Length", str(body.size))]  # a known length stays known: no chunking
    return client.request(method, url, headers, data, timeout)
