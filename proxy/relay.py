"""The commit point and the body copy. After the status line is sent no retry is possible: an
upstream failure, or an event stream without its end marker, aborts the client connection, so the
client sees an incomplete chunked body or a short Content-Length, never a clean end. The one
exception is a background Responses stream (`Resuming`): a break is reopened after the last event
relayed, through a `reopen` the handler supplies, and aborts only if that gives up."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter

from .classify import UPSTREAM_ERRORS, Category, classify_exception
from .errors import ProxyError
from .headers import Headers, is_event_stream, readable_stream, response_headers, serialize_head
from .sse import Dialect, EventCursor, ResumePoint, StreamEnd, StreamWatcher, end_markers
from .upstream import UpstreamResponse, switch_to_idle_timeout

REQUEST_ID_HEADER = "x-proxy-request-id"  # the proxy's id of the client request (handler.request_id)
_SMALL_WRITE = 16 * 1024  # below this, head + body are joined into one buffer; above, written as two
_REASONS = {s.value: s.phrase for s in HTTPStatus}
# (response id, last sequence number relayed, what broke the stream) -> the stream after it, or None
Reopen = Callable[[str, int, Category], Awaitable[UpstreamResponse | None]]


@dataclass(slots=True)
class Delivery:
    """How the response went to the client: made before anything is sent and read whatever happens,
    so a handler cancelled mid-write (a client gone once it read `data: [DONE]`) logs what was sent."""

    status: int | None = None  # None until the status line was sent (the commit)
    category: Category = Category.OK  # after the commit: ok, or what broke the stream
    aborted: bool = False  # the proxy cut the client connection (the client can tell)
    client_gone: bool = False  # the client went away first
    complete: bool = False  # the whole body was handed to the connection (or the stream's end marker)
    bytes_out: int = 0
    upstream_request_id: str | None = None
    resumes: int = 0  # cut streams picked up again after the commit


@dataclass(slots=True)
class Resuming:
    """A background Responses stream the handler may reopen after a cut: where it starts, how to
    reopen it, and the upstream response being relayed now (deliver releases whichever it is)."""

    point: ResumePoint
    reopen: Reopen
    up: UpstreamResponse | None = None


async def send_whole(request: web.BaseRequest, d: Delivery, resp: web.Response) -> web.Response:
    """Write a response whose body is in memory through aiohttp (the bodiless answers)."""
    try:
        await resp.prepare(request)
        d.status = resp.status
        await resp.write_eof()
        d.complete = True
    except ConnectionError:
        d.client_gone = True
    d.bytes_out = len(resp.body) if isinstance(resp.body, bytes) else 0  # the body, as on every path
    return resp


class _Sent(web.StreamResponse):
    """A response the proxy wrote itself (`send_complete`, `_stream`): aiohttp's finish step (prepare,
    write_eof) has nothing left to do, and reads only whether to keep the connection."""

    def __init__(self, status: int, keep_alive: bool) -> None:
        super().__init__(status=status)
        self._sent_keep_alive = keep_alive

    @property
    def keep_alive(self) -> bool:
        return self._sent_keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


async def send_complete(request: web.BaseRequest, d: Delivery, status: int, reason: str, headers: Headers,
                        body: bytes, has_date: bool) -> web.StreamResponse:
    """Status line, headers and an in-memory body in one transport write: cheaper than aiohttp's
    Response (docs/benchmarks.md), which it matches in Content-Length, Date, Connection and flow
    control (a client that does not read makes this wait). Not for bodiless answers."""
    keep_alive = request.keep_alive
    head = _head(request, status, reason, [*headers, ("Content-Length", str(len(body)))], has_date, keep_alive)
    transport = request.transport
    if transport is None or transport.is_closing():
        d.client_gone = True
        return _Sent(status, False)
    if len(body) < _SMALL_WRITE:
        transport.write(head + body)
    else:
        transport.writelines((head, body))
    d.status = status
    d.bytes_out = len(body)
    try:
        await request.writer.drain()  # returns at once unless the client's buffer is full
        d.complete = True
    except ConnectionError:
        d.client_gone = True
    return _Sent(status, keep_alive and not d.client_gone)


def _head(request: web.BaseRequest, status: int, reason: str, out: Headers, has_date: bool, keep_alive: bool) -> bytes:
    """The response head as bytes, written by the proxy and not by aiohttp, whose serializer drops
    any header byte that is not UTF-8: the upstream's bytes reach the client as they came. Date and
    Connection as aiohttp would add them."""
    version = request.version
    if not has_date:
        out.append(("Date", _http_date(int(time.time()))))
    if not keep_alive:
        if version == HttpVersion11:
            out.append(("Connection", "close"))
    elif version == HttpVersion10:
        out.append(("Connection", "keep-alive"))
    return serialize_head(f"HTTP/{version.major}.{version.minor} {status} {reason}", out)


@functools.lru_cache(maxsize=1)
def _http_date(now: int) -> str:
    """The Date header's value (RFC 9110 IMF-fixdate), formatted once per second."""
    return formatdate(now, usegmt=True)


def _bodiless(method: str, status: int) -> bool:
    return method == "HEAD" or status < 200 or status == 204 or status == 304


async def send_error(request: web.BaseRequest, d: Delivery, err: ProxyError, category: Category,
                     extra: Mapping[str, str] | None = None) -> web.StreamResponse:
    """A proxy-made answer (errors.py), written like a prefetched body."""
    d.category = category
    if _bodiless(request.method, err.status):
        return await send_whole(request, d, err.response(extra))
    headers, body = err.parts(extra)
    return await send_complete(request, d, err.status, _REASONS.get(err.status, ""), headers, body, False)


async def deliver(request: web.BaseRequest, d: Delivery, up: UpstreamResponse, prefetched: bytes | None,
                  complete: bool, extra: Mapping[str, str], idle: float, category: Category,
                  remaining: float, path: str, resuming: Resuming | None = None) -> web.StreamResponse:
    """Send `up` to the client, with the proxy's coordination headers `extra` in place of any the
    upstream sent. Owns `up`, and any stream `resuming` reopens: released or closed on every path out."""
    reusable = complete  # a body read whole leaves the upstream connection between responses
    if resuming is not None:
        resuming.up = up
    d.upstream_request_id = up.headers.get("x-request-id")
    d.category = category
    try:
        headers = response_headers(up.headers)
        if "x-should-retry" in extra or REQUEST_ID_HEADER in up.headers:  # another proxy's id, in a chain
            headers = [h for h in headers if h[0].lower() not in extra]
        headers.extend(extra.items())
        if complete and prefetched is not None and not _bodiless(request.method, up.status):
            return await send_complete(request, d, up.status, up.reason or "", headers, prefetched,
                                       "Date" in up.headers)
        resp = await _stream(request, d, up, prefetched, headers, idle, remaining, path, resuming)
        reusable = d.complete and not d.aborted and not d.client_gone
        return resp
    finally:
        if resuming is not None and resuming.up is not None:
            up = resuming.up  # the stream relayed last
        if reusable:
            up.release()
        else:
            up.close()  # drop the upstream connection: the exchange did not finish


async def _stream(request: web.BaseRequest, d: Delivery, up: UpstreamResponse, prefix: bytes | None,
                  headers: Headers, idle: float, remaining: float, path: str,
                  resuming: Resuming | None) -> web.StreamResponse:
    """Copy the body after the commit. `remaining` (of timeouts.total) bounds the whole copy: else
    a client that stops reading would hold this handler and the upstream connection forever."""
    watcher = None
    if is_event_stream(up.headers):
        headers.append(("X-Accel-Buffering", "no"))  # ingress controllers must not batch events
        markers = end_markers(request.method, path)  # the matched path, as routing and the upstream saw it
        if markers is not None and up.status == 200 and readable_stream(up.headers):  # else relayed unjudged
            watcher = StreamWatcher(*markers)
    if watcher is None or markers != (Dialect.RESPONSES,):
        resuming = None
    writer = request.writer
    keep_alive, chunked = _framing(request, up.status, up.content_length, headers)
    if chunked:
        writer.enable_chunking()  # aiohttp's writer frames the chunks
    head = _head(request, up.status, up.reason or "", headers, "Date" in up.headers, keep_alive)
    switch_to_idle_timeout(up, idle)
    transport = request.transport
    try:
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client has gone")
        transport.write(head)  # the commit point
        d.status = up.status
        async with asyncio.timeout(max(remaining, 0.001)):
            if resuming is None:
                broken = await _copy(writer, d, up, prefix, watcher)
            else:
                assert watcher is not None
                broken = await _resumable_copy(writer, d, resuming, prefix, watcher, idle)
    except ConnectionError:
        d.client_gone = True  # normal traffic, not an error
        return _Sent(up.status, False)
    except TimeoutError:
        broken = Category.TIMEOUT  # the total ran out while the client was not reading
    except asyncio.CancelledError:
        # The client closed while the copy waited. The SDKs close as soon as they have read a
        # stream's end marker, before the upstream's own end: then everything was delivered.
        d.complete = d.complete or (watcher is not None and watcher.result() is StreamEnd.COMPLETE) or (
            up.content_length is not None and d.bytes_out >= up.content_length)
        raise
    if broken is not None:  # end the connection without the final chunk: no client takes it for complete
        d.category = broken
        d.aborted = True
        keep_alive = False
        transport.abort()
    return _Sent(up.status, keep_alive)


def _framing(request: web.BaseRequest, status: int, length: int | None, headers: Headers) -> tuple[bool, bool]:
    """(keep-alive, chunked): how the client finds the body's end, as aiohttp frames it. The upstream's
    length (a HEAD answer keeps it, 204 and 304 carry none), else chunks, else the connection's end."""
    if length is not None and status not in (204, 304):
        headers.append(("Content-Length", str(length)))
    elif not _bodiless(request.method, status):
        if request.version < HttpVersion11:
            return False, False  # HTTP/1.0: the body ends with the connection
        headers.append(("Transfer-Encoding", "chunked"))
        return request.keep_alive, True
    return request.keep_alive, False


async def _copy(writer: AbstractStreamWriter, d: Delivery, up: UpstreamResponse, chunk: bytes | None,
                watcher: StreamWatcher | None) -> Category | None:
    """Chunks as they arrive, from the prefetched `chunk` on. Returns why the client connection must
    be aborted (an upstream failure, a stream without its end marker), or None."""
    content = up.content
    while True:
        if chunk:
            if watcher is not None:
                watcher.feed(chunk)
            d.bytes_out += len(chunk)
            await writer.write(chunk)
        try:
            chunk = await content.readany()
        except UPSTREAM_ERRORS as exc:
            category = classify_exception(exc)  # connect cannot happen mid-body: keep the categories honest
            return Category.NETWORK if category is Category.CONNECT else category
        if not chunk:
            break
    if watcher is not None:
        end = watcher.result()
        if end is StreamEnd.TRUNCATED:
            return Category.INVALID_RESPONSE
        if end is StreamEnd.ERROR_EVENT:
            d.category = Category.SERVER  # the client has the error event; the stream ends as sent
    d.complete = True  # the last byte is with the connection; write_eof adds the end of the framing
    await writer.write_eof()
    return None


async def _resumable_copy(writer: AbstractStreamWriter, d: Delivery, resuming: Resuming, chunk: bytes | None,
                          watcher: StreamWatcher, idle: float) -> Category | None:
    """`_copy` for a background Responses stream: whole events only, each once, and a break before
    the terminal event (a cut, a reset, the idle timeout, a clean close) reconnects after the last
    event relayed instead of aborting. Returns why the client connection must be aborted, or None."""
    cursor = EventCursor(resuming.point)
    while True:
        up = resuming.up
        assert up is not None
        broken = await _relay_events(writer, d, up, chunk, watcher, cursor)
        if broken is None:  # a clean end: complete, or cut short of its terminal event
            end = watcher.result()
            if end is not StreamEnd.TRUNCATED:
                if end is StreamEnd.ERROR_EVENT:
                    d.category = Category.SERVER  # the client has the error event; the stream ends as sent
                d.complete = True
                await writer.write_eof()
                return None
            broken = Category.INVALID_RESPONSE
        if watcher.ended or not cursor.resumable:  # nothing left to resume, or not started yet
            return broken
        assert cursor.response_id is not None and cursor.last is not None
        resuming.up = None
        up.close()  # the cut connection
        new = await resuming.reopen(cursor.response_id, cursor.last, broken)
        if new is None:
            return broken
        resuming.up = new
        switch_to_idle_timeout(new, idle)
        cursor.restart()
        d.resumes += 1
        chunk = None


async def _relay_events(writer: AbstractStreamWriter, d: Delivery, up: UpstreamResponse, chunk: bytes | None,
                        watcher: StreamWatcher, cursor: EventCursor) -> Category | None:
    """One upstream stream through the cursor, to its end: None when it ended cleanly, else why not."""
    content = up.content
    while True:
        if chunk:
            out = cursor.feed(chunk)
            if out:
                watcher.feed(out)
                d.bytes_out += len(out)
                await writer.write(out)
        try:
            chunk = await content.readany()
        except UPSTREAM_ERRORS as exc:
            category = classify_exception(exc)
            return Category.NETWORK if category is Category.CONNECT else category
        if not chunk:
            break
    out = cursor.finish()
    if out:
        watcher.feed(out)
        d.bytes_out += len(out)
        await writer.write(out)
    return None
