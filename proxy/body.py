"""Request bodies: retries need the body again, so one up to `replay_limit` (JSON requests) is read
whole; a larger one (a 512 MiB upload) is forwarded once as it arrives, never held whole, and the
request cannot be retried, which `RequestBody.replayable` says up front."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple

from aiohttp import StreamReader, web


class RequestBody(NamedTuple):
    data: bytes | AsyncIterator[bytes] | None  # None: no body at all
    replayable: bool
    size: int | None  # bytes, when known before sending

    @property
    def streamed(self) -> bool:
        return self.data is not None and not isinstance(self.data, bytes)


EMPTY = RequestBody(None, True, 0)


class BodyError(Exception):
    """The client's request body failed: it ended short of its Content-Length, or went silent for
    longer than the route's idle timeout (a slow-body client, or a malformed chunk after which
    aiohttp's server parser stops feeding the body without raising)."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("timed out" if timed_out else "incomplete")
        self.timed_out = timed_out


async def _read(content: StreamReader, idle: float) -> bytes:
    try:
        async with asyncio.timeout(idle):
            return await content.readany()
    except TimeoutError:
        raise BodyError(timed_out=True) from None


@dataclass(slots=True)
class Upload:
    """The rest of a large body, forwarded as it arrives. Remembers its own failure, so the handler
    blames the client (400/408), not the upstream, when the upload breaks on the client's side."""

    prefix: list[bytes]  # what was read before the body turned out too large to hold
    content: StreamReader
    idle: float
    error: BodyError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.prefix:
            yield chunk
        self.prefix = []  # not held for the rest of the upload
        try:
            while chunk := await _read(self.content, self.idle):
                yield chunk
        except BodyError as exc:
            self.error = exc
            raise


async def read_body(request: web.BaseRequest, replay_limit: int, idle: float) -> RequestBody:
    """Decide replayability from Content-Length when sent; for chunked bodies, by reading up to the limit.
    A body already in the buffer (the common small JSON request) is taken without a wait or a timer."""
    if not request.body_exists:
        return EMPTY
    content = request.content
    length = request.content_length
    if length is not None and length > replay_limit:
        return RequestBody(Upload([], content, idle), False, length)
    data = b"" if length is None else content.read_nowait(length)
    if len(data) == length:
        return RequestBody(data, True, length)
    chunks = [data] if data else []
    held = len(data)
    while held != length:
        chunk = await _read(content, idle)
        if not chunk:
            if length is not None:
                raise BodyError(timed_out=False)
            break
        chunks.append(chunk)
        held += len(chunk)
        if held > replay_limit:  # chunked only: a known length was checked above
            return RequestBody(Upload(chunks, content, idle), False, None)
    data = b"".join(chunks)
    return RequestBody(data, True, len(data))
