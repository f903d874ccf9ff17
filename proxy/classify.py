"""Failure categories: one value per attempt outcome, computed once, read by everyone else.

The string values are a contract (metric label values, log field values; design.md).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import aiohttp
import orjson


class Category(enum.StrEnum):
    OK = "ok"
    CONNECT = "connect"
    NETWORK = "network"
    TIMEOUT = "timeout"
    SERVER = "server"
    RATE_LIMIT = "rate_limit"
    QUOTA_EXCEEDED = "quota_exceeded"
    AUTHENTICATION = "authentication"
    CLIENT = "client"
    INVALID_RESPONSE = "invalid_response"
    CIRCUIT_OPEN = "circuit_open"


# What an upstream call may raise: each is classified by classify_exception.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)

# How much of an error body classification may read before deciding (OpenAI errors are < 1 KiB).
ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Verdict:
    """An attempt's category, and whether waiting could ever change the answer."""

    category: Category
    permanent: bool = False  # e.g. a 429 "Request too large": no retry can succeed


OK = Verdict(Category.OK)


def classify_status(status: int, body: bytes | None) -> Verdict:
    """Status plus a bounded prefix of the error body -> Verdict. Pure; table-tested.

    429 is read by body: `insufficient_quota` (error.type or error.code) can not be fixed by
    waiting, nor can "Request too large ... Requested > Limit" (it has no "Used").
    """
    if status < 400:
        return OK
    if status >= 500:
        return Verdict(Category.SERVER)
    if status in (401, 403):
        return Verdict(Category.AUTHENTICATION, permanent=True)
    if status != 429:
        return Verdict(Category.CLIENT, permanent=True)
    err = _error_object(body)
    if "insufficient_quota" in (err.get("type"), err.get("code")):
        return Verdict(Category.QUOTA_EXCEEDED, permanent=True)
    message = err.get("message")
    # "Request too large for o3 ... Limit 30000, Requested 31756." (a "Used N" means: wait and retry)
    too_large = (isinstance(message, str) and "Requested" in message and "Used" not in message
                 and "too large" in message.lower())
    return Verdict(Category.RATE_LIMIT, permanent=too_large)


def _error_object(body: bytes | None) -> dict[str, object]:
    """The body's `error` object (or the body itself when it is a bare one), else {}."""
    try:
        doc = orjson.loads(body or b"null")
    except orjson.JSONDecodeError:
        return {}
    err = doc.get("error", doc) if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else {}


class UnrelayableResponse(Exception):
    """An upstream response that parsed but cannot be passed on (a control character in a header,
    a status outside 100-599): `invalid_response`, like one that did not parse."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why  # a fixed phrase (headers.unrelayable), never the response's own bytes


class UpstreamUnreachable(aiohttp.ClientConnectionError):
    """No connection to the upstream (refused, DNS, TLS): `connect`, the request never left. Raised
    by proxy.upstream.Pool, which cannot build aiohttp's ClientConnectorError (its key type is private)."""

    def __init__(self, hostport: str, why: str, os_error: BaseException) -> None:
        super().__init__(f"Cannot connect to {hostport}: {why}")
        self.why = why  # a fixed phrase for failure_detail
        self.os_error = os_error


def classify_exception(exc: BaseException) -> Category:
    """Map an aiohttp client exception to a category, most specific class first: aiohttp's
    ConnectionTimeoutError is a ServerTimeoutError (an asyncio.TimeoutError), yet a connect failure."""
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, UpstreamUnreachable)):
        return Category.CONNECT
    if isinstance(exc, asyncio.TimeoutError):  # SocketTimeoutError (first byte / idle) and total
        return Category.TIMEOUT
    if isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
        return Category.NETWORK
    return Category.INVALID_RESPONSE  # ClientPayloadError, ClientResponseError (unparsable head), ...


_DETAILS: tuple[tuple[type[BaseException], str], ...] = (  # most specific class first
    (aiohttp.ConnectionTimeoutError, "no connection was established within the connect timeout"),
    (aiohttp.SocketTimeoutError, "no data arrived within the read timeout"),
    (asyncio.TimeoutError, "the total timeout ran out"),
    (aiohttp.ServerDisconnectedError, "the server closed the connection before responding"),
    (aiohttp.ClientPayloadError, "the response body ended early or was malformed"),
    (aiohttp.ClientResponseError, "the response could not be parsed"),
)


def failure_detail(exc: BaseException) -> str:
    """A short, secret-free phrase for a person: never str(exc), which may carry URLs or headers."""
    if isinstance(exc, (UnrelayableResponse, UpstreamUnreachable)):
        return exc.why
    return next((phrase for cls, phrase in _DETAILS if isinstance(exc, cls)), "the connection failed")
