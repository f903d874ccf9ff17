"""Failure categories: one value per attempt outcome, computed once, read by everyone else.

The string values are a contract (metric label values, log field values; design.md).
"""

from __future__ import annotations

import asyncio
import enum

import aiohttp


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


FAILURES = frozenset(Category) - {Category.OK}


def classify_exception(exc: BaseException) -> Category:
    """Map an aiohttp client exception to a category, most specific class first.

    aiohttp's ConnectionTimeoutError is a ServerTimeoutError, not a ClientConnectorError, so the
    connect checks come before the timeout checks; ServerTimeoutError is also asyncio.TimeoutError.
    """
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return Category.CONNECT
    if isinstance(exc, asyncio.TimeoutError):  # SocketTimeoutError (first byte / idle) and total
        return Category.TIMEOUT
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Category.INVALID_RESPONSE
    if isinstance(exc, aiohttp.ClientResponseError):  # unparsable status line or headers
        return Category.INVALID_RESPONSE
    if isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
        return Category.NETWORK
    return Category.INVALID_RESPONSE


def failure_detail(exc: BaseException) -> str:
    """A short, secret-free phrase for a person: never str(exc), which may carry URLs or headers."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "its host name could not be resolved"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate could not be verified"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "no connection was established within the connect timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "the connection was refused"
        return "the connection could not be established"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "no data arrived within the read timeout"
    if isinstance(exc, asyncio.TimeoutError):
        return "the total timeout ran out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before responding"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response body ended early or was malformed"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "the response could not be parsed"
    return "the connection failed"
