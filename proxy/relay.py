"""The downstream side of one exchange: the commit point and the body copy.

Before the commit (status line sent) a failure is still the handler's to turn into a proxy error
(`UpstreamFailure`). After it, an upstream failure aborts the client connection: the client sees
an incomplete chunked body or a short Content-Length, never a clean end that looks complete.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from .headers import is_event_stream, response_headers
from .upstream import switch_to_idle_timeout

# A known-length body up to this size is read whole before the commit: one write instead of a
# chunk loop, and a failure while reading it can still become a proper error response.
SMALL_BODY = 64 * 1024

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class UpstreamFailure(Exception):
    """The upstream failed before anything was committed to the client."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause.__class__.__name__)
        self.cause = cause


async def relay(request: web.Request, up: aiohttp.ClientResponse, idle: float) -> web.StreamResponse:
    """Send `up` to the client. Owns `up`: it is released or closed on every path out."""
    complete = False
    try:
        headers = response_headers(up.headers)
        length = up.content_length
        if length is not None and length <= SMALL_BODY and request.method != "HEAD":
            try:
                body = await up.read()
            except UPSTREAM_ERRORS as exc:
                raise UpstreamFailure(exc) from None
            complete = True
            return web.Response(status=up.status, reason=up.reason, body=body, headers=headers)

        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if length is not None:
            resp.content_length = length
        if is_event_stream(headers):
            resp.headers["X-Accel-Buffering"] = "no"  # ingress controllers must not batch events
        switch_to_idle_timeout(up, idle)
        try:
            await resp.prepare(request)  # the commit point
        except ConnectionError:
            return resp  # the client is gone
        content = up.content
        while True:
            try:
                chunk = await content.readany()
            except UPSTREAM_ERRORS:
                abort(request, resp)
                return resp
            if not chunk:
                break
            try:
                await resp.write(chunk)
            except ConnectionError:
                return resp  # the client went away: normal traffic, not an error
        complete = True
        try:
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp
    finally:
        if complete:
            up.release()
        else:
            up.close()  # drop the upstream connection: the exchange did not finish


def abort(request: web.Request, resp: web.StreamResponse) -> None:
    """End the client connection without the final chunk, so no client mistakes it for complete."""
    resp.force_close()
    transport = request.transport
    if transport is not None:
        transport.abort()
