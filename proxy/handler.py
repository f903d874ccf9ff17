"""The forward handler: route -> request body -> attempt loop -> commit (deliver or proxy error).

One RequestFinished per client request, whatever happens, even a client that leaves halfway.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import weakref
from collections.abc import Callable, Mapping

from aiohttp import web

from . import attempt
from .backoff import Random
from .body import BodyError, RequestBody, Upload, read_body
from .classify import Category
from .config import ProxyConfig
from .errors import (BAD_VERSION, BODY_TIMEOUT, INCOMPLETE_BODY, METHOD_REFUSED, ProxyError, body_too_slow,
                     circuit_open, upstream_failure)
from .events import Emitter, RequestFinished, RequestStarted
from .headers import request_headers
from .masking import mask
from .policy import RoutePolicy
from .relay import REQUEST_ID_HEADER, Delivery, Resuming, deliver, send_error
from .resume import Resumer
from .runtime import Runtime, Target
from .sse import resume_point
from .upstream import Endpoint, UpstreamClient

_CLIENT_ID_HEADERS = ("x-request-id", "x-client-request-id")
UPSTREAM_HEADER = "x-proxy-upstream"  # on multi-upstream routes: the upstream of the last attempt
# UUIDs, OpenAI-style req_... and most tracing ids fit; nothing that could split a header or a log line
_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_random_bits = random.getrandbits


def request_id(headers: Mapping[str, str]) -> str:
    """The id that ties a request's log lines, response and error message together: the client's own
    (x-request-id, else x-client-request-id) when it is safe to echo and log (short, plain characters,
    not shaped like a key), so its logs and ours share it; else 128 random bits in hex, like nginx's
    $request_id (a correlation id, not a secret; ~0.2 us)."""
    for name in _CLIENT_ID_HEADERS:
        sent = headers.get(name)
        if sent and _SAFE_ID.fullmatch(sent) and mask(sent) == sent:
            return sent
    return _random_bits(128).to_bytes(16, "big").hex()


class Forwarder:
    """Forwards with the current Runtime (one config, compiled); holds no per-request state."""

    __slots__ = ("runtime", "_emit", "_clock", "_rng", "_sleep", "_retired")

    def __init__(self, emit: Emitter | None = None, *, clock: Callable[[], float] = time.monotonic,
                 rng: Random = random.random, sleep: attempt.Sleep = asyncio.sleep) -> None:
        self.runtime: Runtime | None = None  # set by start(), inside the running loop
        self._emit = emit or Emitter()
        self._clock, self._rng, self._sleep = clock, rng, sleep
        self._retired: weakref.WeakSet[UpstreamClient] = weakref.WeakSet()  # replaced pools still in use

    def start(self, config: ProxyConfig) -> None:
        self.runtime = Runtime.build(config, self._clock, self._emit)

    def reload(self, config: ProxyConfig) -> None:
        """New requests use `config` from now on; requests in flight finish on the Runtime they took.
        A pool the new Runtime does not keep stops pooling, and is gone with its last request."""
        old = self.runtime
        assert old is not None
        self.runtime = new = Runtime.build(config, self._clock, self._emit, old)
        for client in old.clients() - new.clients():
            client.retire()
            self._retired.add(client)

    async def close(self) -> None:
        """Every pool, current or retired: their open responses fail (shutdown's grace has passed)."""
        clients = set(self._retired) | (self.runtime.clients() if self.runtime is not None else set())
        for client in clients:
            await client.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rid = request_id(request.headers)
        if request.version.major != 1:  # HTTP/0.9 (a versionless request line): no headers, no framing
            return BAD_VERSION.quoting(rid).response({REQUEST_ID_HEADER: rid})
        runtime = self.runtime
        assert runtime is not None
        target = runtime.target(request.method, request.raw_path)
        if isinstance(target, ProxyError):
            refusal = target.quoting(rid).response({REQUEST_ID_HEADER: rid})
            if target is METHOD_REFUSED:
                refusal.force_close()  # after CONNECT come tunnel bytes, not HTTP
            return refusal
        start = self._clock()
        route = target.route
        self._emit(RequestStarted(route.name))
        outcome: attempt.Outcome | None = None
        delivery = Delivery()
        body: RequestBody | None = None
        ttfb: float | None = None
        try:
            outcome = attempt.refused(route, start)
            if outcome is None:
                try:
                    body = await read_body(request, route.replay_limit, route.idle, route.total)
                except BodyError as exc:
                    return await send_error(request, delivery, _body_error(exc, route).quoting(rid), Category.CLIENT,
                                            {REQUEST_ID_HEADER: rid})
                ex = attempt.Exchange(request.method, target.path, target.url, request_headers(request.headers),
                                      body, start, attempt.client_deadline(request.headers, start, route.total), rid,
                                      target.urls)
                # the probe is taken in there, after the body is read: a stalled upload never holds it
                outcome = await attempt.run(target.endpoints, route, ex, self._emit,
                                            clock=self._clock, rng=self._rng, sleep=self._sleep)
            extra = _coordination_headers(outcome, route, rid)
            ttfb = self._clock() - start
            category = outcome.verdict.category
            if outcome.response is not None:
                return await deliver(request, delivery, outcome.response, outcome.prefetched, outcome.complete, extra,
                                     route.idle, category, remaining=start + route.total - self._clock(),
                                     path=target.path, resuming=self._resuming(target.endpoints, route, ex, outcome)
                                     if target.resumable else None)
            if category is Category.CIRCUIT_OPEN:
                err = circuit_open(route.breaker.name, outcome.retry_after, extra,
                                   route.upstreams if Category.CIRCUIT_OPEN in route.failover_on else ())
            elif body is not None and isinstance(body.data, Upload) and body.data.error:  # the client's upload broke
                return await send_error(request, delivery, _body_error(body.data.error, route).quoting(rid),
                                        Category.CLIENT, extra)
            else:
                assert outcome.error is not None
                host = target.endpoints[outcome.upstream].host
                err = upstream_failure(category, outcome.error, host=host, first_byte=route.first_byte,
                                       total=route.total, attempts=outcome.attempts, elapsed=self._clock() - start,
                                       stop=outcome.stop, headers=extra)
            return await send_error(request, delivery, err.quoting(rid), category)
        finally:
            if outcome is not None and delivery.status is not None:
                attempt.stream_ended(route, outcome, delivery.category, delivery.aborted, delivery.complete)
            self._finished(request, rid, target, start, ttfb, body, outcome, delivery)

    def _finished(self, request: web.BaseRequest, rid: str, target: Target, start: float, ttfb: float | None,
                  body: RequestBody | None, outcome: attempt.Outcome | None, d: Delivery) -> None:
        h = request.headers
        route, path = target.route, target.path
        upstream = target.endpoints[outcome.upstream].name if outcome is not None and outcome.attempts else None
        lang = h.get("x-stainless-lang")
        sdk = f"{lang}/{h.get('x-stainless-package-version', '?')}" if lang else None
        self._emit(RequestFinished(
            route=route.name, method=request.method, path=path, status=d.status, category=d.category,
            attempts=outcome.attempts if outcome else 0, stop_reason=outcome.stop if outcome else None,
            aborted=d.aborted or d.client_gone or not d.complete, duration_s=self._clock() - start, ttfb_s=ttfb,
            bytes_in=body.size if body else None, bytes_out=d.bytes_out, replayable=body.replayable if body else True,
            upstream_request_id=d.upstream_request_id, client_sdk=sdk, client_request_id=h.get("x-client-request-id"),
            request_id=rid, upstream=upstream, resumes=d.resumes,
        ))

    def _resuming(self, endpoints: tuple[Endpoint, ...], route: RoutePolicy, ex: attempt.Exchange,
                  outcome: attempt.Outcome) -> Resuming | None:
        """How a background Responses stream is reopened after a cut (relay.Resuming), or None for
        any other request: the same upstream, the client's own headers, the route's policy."""
        point = resume_point(ex.method, ex.path, ex.url.raw_query_string if ex.method == "GET" else "", ex.body.data)
        if point is None:
            return None
        return Resuming(point, Resumer(endpoints, route, ex, outcome, self._emit,
                                       clock=self._clock, rng=self._rng, sleep=self._sleep))


def _body_error(exc: BodyError, route: RoutePolicy) -> ProxyError:
    if exc.why == "total":
        return body_too_slow(route.total)
    return BODY_TIMEOUT if exc.why == "idle" else INCOMPLETE_BODY


def _coordination_headers(outcome: attempt.Outcome, route: RoutePolicy, rid: str) -> dict[str, str]:
    """Tell the SDK what the proxy did, so retries do not multiply (design.md, client contract): after
    a failure the proxy's policy has run, unless the route has max_attempts 1. An open breaker ends the
    SDK's retries on every route (an SDK that obeyed its `retry-after` would sleep inside one call)."""
    extra = {"x-proxy-attempts": str(outcome.attempts), REQUEST_ID_HEADER: rid}
    if route.multi and outcome.attempts:  # which account answered (a circuit_open went to none)
        extra[UPSTREAM_HEADER] = route.upstreams[outcome.upstream]
    category = outcome.verdict.category
    if category is Category.CIRCUIT_OPEN or (category is not Category.OK and route.retry.retries_enabled):
        extra["x-should-retry"] = "false"
    return extra
