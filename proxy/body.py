"""Request bodies: held in memory when small enough to replay, otherwise streamed through once.

Retries need the body again, so bodies up to `replay_limit` are read whole (they are small: JSON
requests). A larger one (a 512 MiB file upload) is forwarded as it arrives and never held whole;
such a request cannot be retried, which `RequestBody.replayable` says up front.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NamedTuple

from aiohttp import web


class RequestBody(NamedTuple):
    data: bytes | AsyncIterator[bytes] | None  # None: no body at all
    replayable: bool
    size: int | None  # bytes, when known before sending

    @property
    def streamed(self) -> bool:
        return self.data is not None and not isinstance(self.data, bytes)


EMPTY = RequestBody(None, True, 0)


async def _rest(prefix: list[bytes], request: web.BaseRequest) -> AsyncIterator[bytes]:
    for chunk in prefix:
        yield chunk
    async for chunk in request.content.iter_any():
        yield chunk


class IncompleteBody(Exception):
    """The client sent fewer bytes than its Content-Length said, then stopped."""


async def read_body(request: web.BaseRequest, replay_limit: int) -> RequestBody:
    """Decide replayability from Content-Length when sent; for chunked bodies, by reading up to the limit."""
    if not request.body_exists:
        return EMPTY
    length = request.content_length
    if length is not None:
        if length <= replay_limit:
            try:
                data = await request.content.readexactly(length)
            except asyncio.IncompleteReadError:
                raise IncompleteBody from None
            return RequestBody(data, True, length)
        return RequestBody(_rest([], request), False, length)
    # chunked upload: buffer until the limit, then stream the rest through
    chunks: list[bytes] = []
    held = 0
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            data = b"".join(chunks)
            return RequestBody(data, True, len(data))
        chunks.append(chunk)
        held += len(chunk)
        if held > replay_limit:
            return RequestBody(_rest(chunks, request), False, None)
