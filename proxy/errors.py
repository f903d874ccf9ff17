"""Proxy-made errors: the one place that builds them, in the OpenAI error shape.

SDKs parse `{"error": {...}}` and raise their usual exception for the status; `x-proxy-error`
tells a person (and a test) that the proxy, not the upstream, produced the response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from .classify import Category, failure_detail
from .units import format_duration


@dataclass(frozen=True, slots=True)
class ProxyError:
    status: int
    code: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def parts(self, extra: Mapping[str, str] | None = None) -> tuple[list[tuple[str, str]], bytes]:
        """The headers and body of the answer (the status is `status`)."""
        body = orjson.dumps({"error": {"message": self.message, "type": "proxy_error",
                                       "code": self.code, "param": None}})
        headers = [("Content-Type", "application/json"), ("x-proxy-error", self.code), *self.headers.items()]
        if extra:
            headers.extend(extra.items())
        return headers, body

    def response(self, extra: Mapping[str, str] | None = None) -> web.Response:
        headers, body = self.parts(extra)
        return web.Response(status=self.status, body=body, headers=headers)

    def quoting(self, request_id: str) -> ProxyError:
        """The same error naming the request it answers: the id a developer pastes into a log search
        or a support ticket (the x-proxy-request-id header carries it too, but messages get copied alone)."""
        return ProxyError(self.status, self.code, f"{self.message} (request id {request_id})", self.headers)


INCOMPLETE_BODY = ProxyError(400, "incomplete_request_body",
                             "The request body ended before the length its Content-Length header announced.")
BAD_TARGET = ProxyError(400, "invalid_request_target",
                        "The request target must be a path starting with '/' (this is not a forward proxy).")
BAD_PATH = ProxyError(400, "invalid_request_target", "The path's '..' segments climb above the root.")
METHOD_REFUSED = ProxyError(405, "method_not_allowed", "The proxy does not forward CONNECT (it is no tunnel) "
                                                       "or TRACE (it would echo the request, credentials included).")
BAD_VERSION = ProxyError(400, "invalid_http_version",
                         "The request line must end with HTTP/1.0 or HTTP/1.1; HTTP/0.9 requests are not forwarded.")
ADMIN_NOT_FOUND = ProxyError(404, "not_found", "The admin listener serves /healthz, /readyz and /metrics only.")
ADMIN_METHOD = ProxyError(405, "method_not_allowed", "The admin listener answers GET and HEAD only.")
BODY_TIMEOUT = ProxyError(408, "request_body_timeout",
                          "The request body stopped arriving (or was malformed) for longer than the idle timeout.")


def body_too_slow(total: float) -> ProxyError:
    """A body still arriving when the route's total timeout ran out (one byte inside each idle period)."""
    return ProxyError(408, "request_body_timeout", "The request body was still arriving when the total timeout "
                                                   f"of {format_duration(total)} ran out.")


def too_many_connections(limit: int) -> ProxyError:
    """The answer on a client connection past listen.max_connections; the SDKs retry a 503 after a backoff."""
    return ProxyError(503, "too_many_connections", f"The proxy already holds its maximum of {limit} client "
                                                   "connections (listen.max_connections); retry shortly.")


# design.md, "Interfaces": the status and code of each proxy-made error
STATUS_AND_CODE: Mapping[Category, tuple[int, str]] = {
    Category.CONNECT: (502, "upstream_connect_error"),
    Category.NETWORK: (502, "upstream_network_error"),
    Category.TIMEOUT: (504, "upstream_timeout"),
    Category.INVALID_RESPONSE: (502, "invalid_upstream_response"),
    Category.CIRCUIT_OPEN: (503, "circuit_open"),
}


def upstream_failure(category: Category, exc: BaseException, *, host: str, first_byte: float, total: float,
                     attempts: int, elapsed: float, stop: str | None, headers: Mapping[str, str]) -> ProxyError:
    """One plain sentence a developer can act on: what failed, how often over how long, what next. Built
    only from fixed words, the upstream host and numbers: never an exception's text (URLs, headers, keys)."""
    detail = failure_detail(exc)
    if category is Category.CONNECT:
        what, advice = f"Could not connect to {host}: {detail}", "the request never reached it; retry later"
    elif category is Category.TIMEOUT:
        what = (f"{host} did not send response headers within {format_duration(first_byte)}"
                if isinstance(exc, aiohttp.SocketTimeoutError)
                else f"{host} did not answer within the total timeout of {format_duration(total)}")
        advice = "the upstream may be overloaded, retry later"
    elif category is Category.NETWORK:
        what = f"The connection to {host} failed after the request was sent: {detail}"
        advice = "the request may or may not have been processed"
    else:
        what, advice = f"{host} sent a response the proxy could not read: {detail}", "retry later"
    tries = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} in {_seconds(elapsed)}"
    why = _STOP_WORDS.get(stop or "", "")
    return ProxyError(*STATUS_AND_CODE[category], f"{what}; {tries}{why}; {advice}.", headers)


_STOP_WORDS = {
    "budget": " (the retry budget of this route is spent: many requests are failing)",
    "deadline": " (no time was left for another attempt)",
    "not_replayable": " (the request body was too large to be sent again)",
    "breaker": " (the circuit breaker of this route opened)",
}


def _seconds(s: float) -> str:
    return f"{s:.0f}s" if s >= 10 else f"{s:.2g}s" if s >= 0.01 else f"{s * 1000:.0f}ms"


def circuit_open(breaker: str, retry_after: int, headers: Mapping[str, str],
                 upstreams: tuple[str, ...] = ()) -> ProxyError:
    """The fast refusal while a breaker is open (on a failover route, the breaker of every upstream):
    `retry-after` tells the SDK how long to wait."""
    which = f"The circuit breaker {breaker!r} is open" if len(upstreams) < 2 else \
        f"The circuit breakers of {breaker!r} are open for every upstream ({', '.join(upstreams)})"
    message = (f"{which} after repeated upstream failures, so the proxy did not "
               f"send this request; retry after {retry_after}s.")
    return ProxyError(*STATUS_AND_CODE[Category.CIRCUIT_OPEN], message, {**headers, "retry-after": str(retry_after)})
