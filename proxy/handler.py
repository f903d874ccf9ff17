"""The forward handler: route -> request body -> attempt loop -> commit (deliver or proxy error).

It emits one RequestFinished per client request, whatever happens, including a client that
leaves halfway (the handler is cancelled then).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from aiohttp import web
from yarl import URL

from . import attempt
from .backoff import Random
from .body import BodyError, RequestBody, Upload, read_body
from .classify import Category, Verdict
from .config import ProxyConfig
from .errors import BAD_TARGET, BODY_TIMEOUT, INCOMPLETE_BODY, ProxyError, circuit_open, upstream_failure
from .events import Emitter, RequestFinished, RequestStarted
from .headers import request_headers
from .policy import RoutePolicy, compile_routes
from .relay import Delivery, deliver, send_error
from .retry import StopReason
from .upstream import UpstreamClient, UrlCache


class Forwarder:
    """Bound to one upstream client and one compiled config; holds no per-request state."""

    __slots__ = ("client", "_routes", "_url", "_host", "_emit", "_clock", "_rng", "_sleep")

    def __init__(self, config: ProxyConfig, emit: Emitter | None = None, *, clock: Callable[[], float] = time.monotonic,
                 rng: Random = random.random, sleep: attempt.Sleep = asyncio.sleep) -> None:
        self.client: UpstreamClient | None = None  # set by the app's cleanup_ctx
        self._emit = emit or Emitter()
        self._routes = compile_routes(config, clock, self._emit)
        self._url = UrlCache(config.upstream.url)
        self._host = URL(config.upstream.url).host or config.upstream.url
        self._clock, self._rng, self._sleep = clock, rng, sleep

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if not request.raw_path.startswith("/"):  # absolute-form, authority-form (CONNECT) or "*"
            return BAD_TARGET.response()  # never glued onto the upstream URL
        start = self._clock()
        route = self._routes.match(request.method, request.path).policy
        self._emit(RequestStarted(route.name))
        outcome: attempt.Outcome | None = None
        delivery: Delivery | None = None
        body: RequestBody | None = None
        ttfb: float | None = None
        try:
            permit = route.breaker.allow()  # before reading the body: an open breaker answers at once
            if permit is None:
                outcome = attempt.Outcome(0, Verdict(Category.CIRCUIT_OPEN), StopReason.BREAKER)
            else:
                try:
                    body = await read_body(request, route.replay_limit, route.idle)
                except BaseException as exc:
                    route.breaker.release(permit)
                    if isinstance(exc, BodyError):
                        resp, delivery = await send_error(request, _body_error(exc), Category.CLIENT)
                        return resp
                    raise
                route.budget.deposit()
                ex = attempt.Exchange(request.method, self._url(request.raw_path), request_headers(request.headers),
                                      body, start, attempt.client_deadline(request.headers, start, route.total))
                assert self.client is not None
                outcome = await attempt.run(self.client, route, ex, self._emit, permit,
                                            clock=self._clock, rng=self._rng, sleep=self._sleep)
            extra = _coordination_headers(outcome, route)
            ttfb = self._clock() - start
            if outcome.verdict.category is Category.CIRCUIT_OPEN:
                resp, delivery = await send_error(
                    request, circuit_open(route.breaker.name, route.breaker.retry_after(), extra), Category.CIRCUIT_OPEN)
                return resp
            if outcome.response is None and body is not None and isinstance(body.data, Upload) and body.data.error:
                # the client's upload broke, not the upstream
                resp, delivery = await send_error(request, _body_error(body.data.error), Category.CLIENT, extra)
                return resp
            if outcome.response is None:
                assert outcome.error is not None
                err = upstream_failure(
                    outcome.verdict.category, outcome.error, host=self._host, first_byte=route.first_byte,
                    total=route.total, attempts=outcome.attempts, elapsed=self._clock() - start,
                    stop=outcome.stop, headers=extra)
                resp, delivery = await send_error(request, err, outcome.verdict.category)
                return resp
            stream, delivery = await deliver(request, outcome.response, outcome.prefetched, outcome.complete, extra,
                                             route.idle, outcome.verdict.category,
                                             remaining=start + route.total - self._clock())
            if delivery.category is not outcome.verdict.category:
                route.breaker.record(delivery.category)  # the stream broke after the commit
            return stream
        finally:
            self._finished(request, route, start, ttfb, body, outcome, delivery)

    def _finished(self, request: web.BaseRequest, route: RoutePolicy, start: float, ttfb: float | None,
                  body: RequestBody | None, outcome: attempt.Outcome | None, delivery: Delivery | None) -> None:
        h = request.headers
        lang = h.get("x-stainless-lang")
        sdk = f"{lang}/{h.get('x-stainless-package-version', '?')}" if lang else None
        if delivery is None:  # the client left before anything was sent
            status, category, aborted, out, upstream_id = None, Category.OK, True, 0, None
        else:
            status, category, aborted = delivery.status, delivery.category, delivery.aborted or delivery.client_gone
            out, upstream_id = delivery.bytes_out, delivery.upstream_request_id
        self._emit(RequestFinished(
            route=route.name, method=request.method, path=request.path, status=status, category=category,
            attempts=outcome.attempts if outcome else 0, stop_reason=outcome.stop if outcome else None,
            aborted=aborted, duration_s=self._clock() - start, ttfb_s=ttfb,
            bytes_in=body.size if body else None, bytes_out=out, replayable=body.replayable if body else True,
            upstream_request_id=upstream_id, client_sdk=sdk, client_request_id=h.get("x-client-request-id"),
        ))


def _body_error(exc: BodyError) -> ProxyError:
    return BODY_TIMEOUT if exc.timed_out else INCOMPLETE_BODY


def _coordination_headers(outcome: attempt.Outcome, route: RoutePolicy) -> dict[str, str]:
    """Tell the SDK what the proxy did, so retries do not multiply (design.md, client contract).

    After a failure the proxy's policy has run: `x-should-retry: false` stops the SDK's own
    retries. A route with max_attempts 1 leaves the SDK's retries alone.
    """
    extra = {"x-proxy-attempts": str(outcome.attempts)}
    category = outcome.verdict.category
    # circuit_open carries retry-after instead: the SDK should come back when a probe may pass
    if category is not Category.OK and category is not Category.CIRCUIT_OPEN and route.retry.retries_enabled:
        extra["x-should-retry"] = "false"
    return extra
