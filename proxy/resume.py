"""Resuming a cut background Responses stream: reconnect after the last event relayed, with the
client's own headers, to the upstream that served it, within the route's retry policy. The relay
calls a Resumer as its `reopen`; the policy lives here, beside the attempt loop it reuses."""

from __future__ import annotations

import time
from collections.abc import Callable

from yarl import URL

from .attempt import Exchange, Outcome, Sleep, one_attempt
from .backoff import Random, parse_retry_after
from .body import EMPTY
from .classify import Category, Verdict
from .events import Emitter, RetryScheduled, StreamResumed
from .headers import readable_stream
from .policy import RoutePolicy
from .retry import Stop, StopReason, decide
from .upstream import Endpoint, UpstreamResponse

_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})  # a resume sends no body


def resume_url(url: URL, path: str, response_id: str, starting_after: int) -> URL | None:
    """Where a cut stream's events are read again: the same upstream (scheme, host, base path) that
    served it, with the path of the response's events. The upstream path ends with the client's path
    after `/v1` (a base path may stand for `/v1`), and that end is swapped for `/responses/{id}`; a
    GET's other query parameters are kept. None when the URL does not end as expected."""
    suffix = path[3:] if path.startswith("/v1/") else ""
    head = str(url.with_query(None))
    if not suffix or not head.endswith(suffix):
        return None
    kept = [p for p in url.raw_query_string.split("&") if p and p.partition("=")[0] not in ("stream", "starting_after")]
    query = "&".join([*kept, "stream=true", f"starting_after={starting_after}"])
    return URL(f"{head[:-len(suffix)]}/responses/{response_id}?{query}", encoded=True)


class Resumer:
    """The relay's `reopen` for a background Responses stream: reconnects a cut stream after the last
    event relayed, with the client's own headers, within the route's retry policy.

    Policy: a reconnect is an attempt of the client request's route. max_attempts counts the attempts
    before the commit plus every reconnect; each reconnect is a retry to `retry.decide` (the budget
    pays for it, the deadline (timeouts.total, or the client's x-stainless-read-timeout) bounds it,
    the breaker must admit it). The first reconnect after a cut goes at once: the stream was flowing,
    so nothing says the upstream needs a rest; backoff only separates failed reconnects.

    Breaker: it hears of each upstream call once. The cut stream was a success recorded at its headers
    (a probe) or not yet heard of (deferred); its cut is one failure, recorded here once a reconnect
    replaces it, or by stream_ended (the client connection aborted) when none does, never both. A
    reconnect is recorded by _attempt like any attempt: a failure at once, a probe at its headers,
    and a stream at its end: it becomes the outcome's deferred stream, which stream_ended hears of.
    """

    __slots__ = ("_endpoint", "_u", "_breaker", "_route", "_ex", "_outcome", "_emit", "_clock", "_rng", "_sleep")

    def __init__(self, endpoints: tuple[Endpoint, ...], route: RoutePolicy, ex: Exchange, outcome: Outcome,
                 emit: Emitter, *, clock: Callable[[], float], rng: Random, sleep: Sleep) -> None:
        u = outcome.upstream  # the upstream that served the stream: the response lives in its account
        self._endpoint, self._u, self._breaker = endpoints[u], u, route.breakers[u]
        self._route, self._outcome, self._emit = route, outcome, emit
        self._ex = ex._replace(method="GET", body=EMPTY, url=ex.at(u), urls=(),
                               headers=[h for h in ex.headers if h[0].lower() not in _BODY_HEADERS])
        self._clock, self._rng, self._sleep = clock, rng, sleep

    async def __call__(self, response_id: str, starting_after: int, broken: Category) -> UpstreamResponse | None:
        """A response relaying the events after `starting_after`, or None: the proxy gave up."""
        url = resume_url(self._ex.url, self._ex.path, response_id, starting_after)
        if url is None:
            return self._ended(response_id, starting_after, broken, StopReason.NOT_RETRYABLE)
        ex = self._ex._replace(path=f"/v1/responses/{response_id}", url=url)
        route, outcome, clock = self._route, self._outcome, self._clock
        # a clean close before the terminal event is, for a response that lives on, a dropped connection
        verdict = Verdict(Category.NETWORK if broken is Category.INVALID_RESPONSE else broken)
        hint: tuple[float, str] | None = (0.0, "resume")  # the first reconnect: at once
        failed: Outcome | None = None
        try:
            while True:
                up = failed.response if failed is not None else None
                decision = decide(route.retry, verdict, attempt=outcome.attempts, replayable=True,
                                  upstream_forbids=up is not None and up.headers.get("x-should-retry") == "false",
                                  hint=hint, remaining=ex.deadline - clock(), budget=route.budget, rng=self._rng,
                                  admits=lambda delay: self._breaker.admits(clock() + delay))
                if isinstance(decision, Stop):
                    return self._ended(response_id, starting_after, broken, decision.reason)
                if failed is not None:
                    self._emit(RetryScheduled(route.name, outcome.attempts, verdict.category,
                                              up.status if up is not None else None, decision.delay,
                                              decision.reason, decision.source, ex.request_id, self._endpoint.name))
                    failed.discard()
                    failed = None
                    await self._sleep(decision.delay)
                permit = self._breaker.allow()
                if permit is None:
                    return self._ended(response_id, starting_after, broken, StopReason.BREAKER)
                outcome.attempts += 1
                new = await one_attempt(self._endpoint, route, ex, self._emit, permit, outcome.attempts, clock, self._u)
                if self._relays(new):
                    self._breaker.record(broken)  # the cut stream: one failure
                    outcome.deferred = new.deferred  # from now on, stream_ended is about the new stream
                    self._ended(response_id, starting_after, broken, None)
                    return new.response
                failed, verdict = new, new.verdict
                hint = parse_retry_after(new.response.headers, time.time()) if new.response is not None else None
        except BaseException:
            if failed is not None:
                failed.discard()
            raise

    def _relays(self, new: Outcome) -> bool:
        """A reconnect's answer can be relayed on: a readable event stream. A 200 that is not one (the
        upstream ignored `stream=true`) is an invalid response, and heard as one if not yet heard of."""
        up = new.response
        if new.verdict.category is not Category.OK or up is None:
            return False
        if up.status == 200 and readable_stream(up.headers):
            return True
        if new.deferred:
            self._breaker.record(Category.INVALID_RESPONSE)
            new.deferred = False
        new.verdict = Verdict(Category.INVALID_RESPONSE)
        return False

    def _ended(self, response_id: str, starting_after: int, broken: Category, stop: StopReason | None) -> None:
        """Tell the observers how this cut ended; a stop is the request's stop reason too."""
        if stop is not None:
            self._outcome.stop = stop
        self._emit(StreamResumed(self._route.name, response_id, starting_after, self._outcome.attempts, broken,
                                 "failed" if stop is not None else "ok", stop, self._ex.request_id))
