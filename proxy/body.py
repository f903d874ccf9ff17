"""Request bodies: retries need the body again, so one up to `replay_limit` (JSON requests) is read
whole; a larger one (a 512 MiB upload) is forwarded once as it arrives, never held whole, and the
request cannot be retried, which `RequestBody.replayable` says up front."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

from aiohttp import HttpVersion11, StreamReader, web


class RequestBody(NamedTuple):
    data: bytes | AsyncIterator[bytes] | None  # None: no body at all
    replayable: bool
    size: int | None  # bytes, when known before sending

    @property
    def streamed(self) -> bool:
        return self.data is not None and not isinstance(self.data, bytes)


EMPTY = RequestBody(None, True, 0)
ZERO = RequestBody(b"", True, 0)


BodyFailure = Literal["incomplete", "idle", "total"]


class BodyError(Exception):
    """The client's request body failed: it ended short of its Content-Length ("incomplete"), went silent
    for longer than the route's idle timeout ("idle": a stalled client, or a malformed chunk after which
    aiohttp's server parser stops feeding the body without raising), or was still arriving when the
    route's total timeout ran out ("total": a client that sends a byte just inside each idle period)."""

    def __init__(self, why: BodyFailure) -> None:
        super().__init__(why)
        self.why = why


async def _read(content: StreamReader, idle: float, deadline: float) -> bytes:
    """Some body bytes, within `idle` and before `deadline` (the loop's clock): one timer, as before."""
    when = asyncio.get_running_loop().time() + idle
    try:
        async with asyncio.timeout_at(when if when < deadline else deadline):
            return await content.readany()
    except TimeoutError:
        raise BodyError("idle" if when < deadline else "total") from None


async def _continue(request: web.BaseRequest) -> None:
    """RFC 9110 10.1.1: a client that sent `Expect: 100-continue` waits for this before its body (curl does
    above 1 MiB). Sent only when the body is about to be waited for (a body already here needs none) and
    never to an HTTP/1.0 client. The Expect header itself is not forwarded (the handler drops it)."""
    if request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


@dataclass(slots=True)
class Upload:
    """The rest of a large body, forwarded as it arrives. Remembers its own failure, so the handler
    blames the client (400/408), not the upstream, when the upload breaks on the client's side."""

    prefix: list[bytes]  # what was read before the body turned out too large to hold
    content: StreamReader
    idle: float
    deadline: float  # the loop's clock: when the route's total timeout ends the body phase
    error: BodyError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.prefix:
            yield chunk
        self.prefix = []  # not held for the rest of the upload
        try:
            while chunk := await _read(self.content, self.idle, self.deadline):
                yield chunk
        except BodyError as exc:
            self.error = exc
            raise
        except asyncio.CancelledError:  # the attempt's own total timer, due at the same moment, came first:
            if asyncio.get_running_loop().time() >= self.deadline:  # still the client's body that was late
                self.error = BodyError("total")
            raise


async def read_body(request: web.BaseRequest, replay_limit: int, idle: float, total: float) -> RequestBody:
    """Decide replayability from Content-Length when sent; for chunked bodies, by reading up to the limit.
    A body already in the buffer (the common small JSON request) is taken without a wait or a timer.
    Each wait is bounded by `idle`, and the whole body phase by `total` (the route's, from now)."""
    if not request.body_exists:  # a client's `Content-Length: 0` is kept, whatever the method
        return ZERO if request.content_length == 0 else EMPTY
    content = request.content
    length = request.content_length
    if length is not None and length > replay_limit:
        await _continue(request)
        return RequestBody(Upload([], content, idle, asyncio.get_running_loop().time() + total), False, length)
    data = b"" if length is None else content.read_nowait(length)
    if len(data) == length:
        return RequestBody(data, True, length)
    deadline = asyncio.get_running_loop().time() + total
    await _continue(request)
    chunks = [data] if data else []
    held = len(data)
    while held != length:
        chunk = await _read(content, idle, deadline)
        if not chunk:
            if length is not None:
                raise BodyError("incomplete")
            break
        chunks.append(chunk)
        held += len(chunk)
        if held > replay_limit:  # chunked only: a known length was checked above
            return RequestBody(Upload(chunks, content, idle, deadline), False, None)
    data = b"".join(chunks)
    return RequestBody(data, True, len(data))
