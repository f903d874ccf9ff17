"""The downstream side of one exchange: the commit point and the body copy.

After the commit (status line sent) no retry is possible: an upstream failure, or an event
stream that ends without its end marker, aborts the client connection. The client then sees an
incomplete chunked body or a short Content-Length, never a clean end that looks complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .classify import Category, classify_exception
from .headers import Headers, is_event_stream, response_headers
from .sse import StreamEnd, StreamWatcher, end_markers
from .upstream import UpstreamResponse, switch_to_idle_timeout

# A known-length body up to this size is read whole before the commit (attempt.py): one write
# instead of a chunk loop, and a failure while reading it can still be retried or answered.
SMALL_BODY = 64 * 1024

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(slots=True)
class Delivery:
    """How the response went to the client."""

    status: int
    category: Category  # after the commit: ok, or what broke the stream
    aborted: bool = False  # the proxy cut the client connection (the client can tell)
    client_gone: bool = False  # the client went away first
    bytes_out: int = 0
    upstream_request_id: str | None = None


async def send_whole(request: web.BaseRequest, resp: web.Response, category: Category) -> Delivery:
    """Write a response whose body is in memory (prefetched, or proxy-made)."""
    d = Delivery(resp.status, category)
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        d.client_gone = True
    d.bytes_out = resp.body_length
    return d


async def deliver(request: web.BaseRequest, up: UpstreamResponse, prefetched: bytes | None, complete: bool,
                  extra: Mapping[str, str], idle: float, category: Category,
                  remaining: float) -> tuple[web.StreamResponse, Delivery]:
    """Send `up` to the client. Owns `up`: it is released or closed on every path out."""
    finished = False
    try:
        headers = response_headers(up.headers)
        headers.extend(extra.items())
        if complete:
            finished = True
            resp: web.StreamResponse = web.Response(status=up.status, reason=up.reason, body=prefetched,
                                                    headers=headers)
            d = await send_whole(request, resp, category)  # type: ignore[arg-type]
        else:
            resp, d = await _stream(request, up, prefetched, headers, idle, category, remaining)
            finished = not d.aborted and not d.client_gone
        d.upstream_request_id = up.headers.get("x-request-id")
        return resp, d
    finally:
        if finished:
            up.release()
        else:
            up.close()  # drop the upstream connection: the exchange did not finish


async def _stream(request: web.BaseRequest, up: UpstreamResponse, prefix: bytes | None,
                  headers: Headers, idle: float, category: Category,
                  remaining: float) -> tuple[web.StreamResponse, Delivery]:
    """Copy the body after the commit. `remaining` is what is left of timeouts.total: the upstream
    client bounds its own reads by it, but a client that stops reading would hold this handler
    (blocked writing) and the upstream connection forever; one timer for the whole copy ends that."""
    resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
    d = Delivery(up.status, category)
    if up.content_length is not None:
        resp.content_length = up.content_length
    watcher = None
    if is_event_stream(up.headers):
        resp.headers["X-Accel-Buffering"] = "no"  # ingress controllers must not batch events
        markers = end_markers(request.method, request.path)
        if markers is not None and up.status == 200:
            watcher = StreamWatcher(*markers)
    switch_to_idle_timeout(up, idle)
    try:
        await resp.prepare(request)  # the commit point
        async with asyncio.timeout(max(remaining, 0.001)):
            await _copy(request, resp, d, up, prefix, watcher)
    except ConnectionError:
        d.client_gone = True  # normal traffic, not an error
    except TimeoutError:
        d.category = Category.TIMEOUT  # the total ran out while the client was not reading
        _abort(request, resp, d)
    return resp, d


async def _copy(request: web.BaseRequest, resp: web.StreamResponse, d: Delivery, up: UpstreamResponse,
                prefix: bytes | None, watcher: StreamWatcher | None) -> None:
    """Chunks as they arrive; an upstream failure or a stream without its end marker aborts."""
    if prefix:
        if watcher is not None:
            watcher.feed(prefix)
        d.bytes_out += len(prefix)
        await resp.write(prefix)
    content = up.content
    while True:
        try:
            chunk = await content.readany()
        except UPSTREAM_ERRORS as exc:
            d.category = classify_exception(exc)
            if d.category is Category.CONNECT:  # cannot happen mid-body; keep the categories honest
                d.category = Category.NETWORK
            _abort(request, resp, d)
            return
        if not chunk:
            break
        if watcher is not None:
            watcher.feed(chunk)
        d.bytes_out += len(chunk)
        await resp.write(chunk)
    if watcher is not None:
        end = watcher.result()
        if end is StreamEnd.TRUNCATED:
            d.category = Category.INVALID_RESPONSE
            _abort(request, resp, d)
            return
        if end is StreamEnd.ERROR_EVENT:
            d.category = Category.SERVER  # the client has the error event; the stream ends as sent
    await resp.write_eof()


def _abort(request: web.BaseRequest, resp: web.StreamResponse, d: Delivery) -> None:
    """End the client connection without the final chunk, so no client mistakes it for complete."""
    d.aborted = True
    resp.force_close()
    transport = request.transport
    if transport is not None:
        transport.abort()
