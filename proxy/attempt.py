"""THE attempt loop: send -> classify -> decide -> wait -> send again, all before the commit. The
only code that knows every piece (breaker, budget, retry policy, backoff); each is a decision it asks.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp
from yarl import URL

from .backoff import Random, parse_retry_after
from .body import EMPTY, RequestBody, Upload
from .breaker import Permit
from .classify import (ERROR_BODY_LIMIT, UPSTREAM_ERRORS, Category, UnrelayableResponse, Verdict,
                       classify_exception, classify_status)
from .events import AttemptFinished, Emitter, RetryScheduled, StreamResumed
from .headers import Headers, readable_stream, unrelayable
from .policy import RoutePolicy
from .retry import RetryAfter, Stop, StopReason, decide
from .sse import StreamEnd, judge
from .upstream import UpstreamClient, UpstreamResponse, send

Sleep = Callable[[float], Awaitable[None]]

# A known-length body up to this size is read whole before the commit: one write instead of a
# chunk loop, and a failure while reading it can still be retried or answered.
SMALL_BODY = 64 * 1024


@dataclass(slots=True)
class Outcome:
    """What the loop ends with: a response to commit (with any prefetched body) or an error."""

    attempts: int
    verdict: Verdict
    stop: StopReason | None  # None: the last attempt succeeded, no decision was needed
    response: UpstreamResponse | None = None
    prefetched: bytes | None = None  # body bytes already read from `response`
    complete: bool = False  # `prefetched` is the whole body
    error: BaseException | None = None  # set when there is no response
    deferred: bool = False  # a stream the breaker has not heard about yet: stream_ended() tells it
    retry_after: float = 0.0  # never sent: seconds until the breaker would admit a request

    @classmethod
    def never_sent(cls, route: RoutePolicy) -> Outcome:
        """The breaker refused the first attempt: the only case answered `circuit_open`."""
        return cls(0, Verdict(Category.CIRCUIT_OPEN), StopReason.BREAKER, retry_after=route.breaker.retry_after())

    def discard(self) -> None:
        """The response is not wanted (a retry replaces it): drop its connection unless read whole."""
        if self.response is not None:
            if self.complete:
                self.response.release()
            else:
                self.response.close()


class Exchange(NamedTuple):
    """The request side of one client request, fixed before the first attempt."""

    method: str
    path: str  # the client's, which names the endpoint
    url: URL
    headers: Headers
    body: RequestBody
    start: float  # monotonic
    deadline: float  # monotonic: no retry waits past it (timeouts.total, or the client's own timeout)
    request_id: str | None = None  # carried into RetryScheduled, so a retry line names its request


async def _prefetch(up: UpstreamResponse, method: str) -> tuple[bytes | None, bool]:
    """(bytes read, whether they are the whole body): a small known-length body is read whole (one
    write, and a failure here is still retryable), an error body of unknown length up to the limit."""
    length = up.content_length
    if method == "HEAD" or up.status in (204, 304) or (length is None and up.status < 400):
        return None, False
    if length is not None:
        return (await up.read(), True) if length <= SMALL_BODY else (None, False)
    head = bytearray()
    while len(head) <= ERROR_BODY_LIMIT:
        chunk = await up.content.readany()
        if not chunk:
            return bytes(head), True
        head += chunk
    return bytes(head), False


async def run(client: UpstreamClient, route: RoutePolicy, ex: Exchange, emit: Emitter, *,
              clock: Callable[[], float], rng: Random, sleep: Sleep) -> Outcome:
    """Attempts until one succeeds or the policy stops.

    `circuit_open` answers only a request never sent: once an attempt was made, a breaker that
    refuses the next one ends the loop with that attempt's outcome (stop reason `breaker`). So a
    failed response is held across the backoff: a body read whole stays in memory (its connection
    back in the pool), any other response stays open until the retry replaces it.
    """
    breaker = route.breaker
    route.budget.deposit()
    attempt = 0
    outcome: Outcome | None = None  # the one response held open, discarded if anything raises
    try:
        while True:
            permit = breaker.allow()
            if permit is None:
                if outcome is None:
                    return Outcome.never_sent(route)
                outcome.stop = StopReason.BREAKER  # opened during the wait: the last answer stands
                return outcome
            if outcome is not None:
                outcome.discard()
                outcome = None
            attempt += 1
            outcome = await _attempt(client, route, ex, emit, permit, attempt, clock)
            category = outcome.verdict.category
            if category == "ok":
                return outcome
            up = outcome.response
            decision = decide(route.retry, outcome.verdict, attempt=attempt, replayable=ex.body.replayable,
                              upstream_forbids=up is not None and up.headers.get("x-should-retry") == "false",
                              hint=parse_retry_after(up.headers, time.time()) if up is not None else None,
                              remaining=ex.deadline - clock(), budget=route.budget, rng=rng,
                              admits=lambda delay: breaker.admits(clock() + delay))
            if not isinstance(decision, RetryAfter):
                outcome.stop = decision.reason
                return outcome
            if outcome.complete and up is not None:
                up.release()  # read whole: keep the bytes, not the connection, across the wait
            emit(RetryScheduled(route.name, attempt, category, up.status if up is not None else None,
                                decision.delay, decision.reason, decision.source, ex.request_id))
            await sleep(decision.delay)
    except BaseException:
        if outcome is not None:
            outcome.discard()
        raise


async def _attempt(client: UpstreamClient, route: RoutePolicy, ex: Exchange, emit: Emitter, permit: Permit,
                   attempt: int, clock: Callable[[], float]) -> Outcome:
    """One upstream call up to its classified response headers. The breaker hears of it here (a long
    stream must not hold the probe), except an ordinary stream: it hears of that once, at its end
    (stream_ended), so a stream cut after its headers is one failure, not a success and a failure."""
    breaker = route.breaker
    began = clock()
    timeout = route.timeout if attempt == 1 else aiohttp.ClientTimeout(
        total=max(ex.start + route.total - began, 0.001), sock_connect=route.connect, sock_read=route.first_byte)
    up: UpstreamResponse | None = None
    try:
        up = await send(client, ex.method, ex.url, ex.headers, ex.body, timeout)
        why = unrelayable(up.reason, up.headers)
        if why is not None:
            raise UnrelayableResponse(why)
        prefetched, complete = await _prefetch(up, ex.method)
        verdict = _small_stream(ex, up, prefetched) if complete else None
        verdict = verdict or classify_status(up.status, prefetched)
        outcome = Outcome(attempt, verdict, None, up, prefetched, complete)
    except UPSTREAM_ERRORS + (UnrelayableResponse,) as exc:
        if up is not None:
            up.close()
            up = None
        outcome = Outcome(attempt, Verdict(classify_exception(exc)), None, error=exc)
    except BaseException:
        breaker.release(permit)
        if up is not None:
            up.close()
        raise
    category = outcome.verdict.category
    if isinstance(ex.body.data, Upload) and ex.body.data.error is not None:
        breaker.release(permit)  # the client's upload broke: that says nothing about the upstream
    elif category == "ok" and not outcome.complete and permit is Permit.PASS and up is not None:
        outcome.deferred = True
    else:
        breaker.record(category, permit)
    emit(AttemptFinished(route.name, attempt, category, up.status if up is not None else None, clock() - began,
                         _header_int(up, "x-ratelimit-remaining-requests"),
                         _header_int(up, "x-ratelimit-remaining-tokens")))
    return outcome


def refused(route: RoutePolicy, now: float) -> Outcome | None:
    """Asked before the request body is read: an open breaker answers at once, without reading it."""
    return None if route.breaker.admits(now) else Outcome.never_sent(route)


def stream_ended(route: RoutePolicy, outcome: Outcome, category: Category, aborted: bool, complete: bool) -> None:
    """After the commit, the breaker hears how the response ended (`category`): a deferred stream
    when it ends, and any success cut after its headers (a probe was recorded at them). A client
    that leaves mid-stream (neither aborted nor complete) says nothing about the upstream."""
    if (outcome.deferred and complete) or (aborted and outcome.verdict.category is Category.OK):
        route.breaker.record(category)


def _small_stream(ex: Exchange, up: UpstreamResponse, body: bytes | None) -> Verdict | None:
    """An event stream short enough to be read whole before the commit is judged here, as a long
    one is while it is relayed: cut before its end marker, it is invalid_response (and may still
    be retried); carrying an in-band error, it is a server error."""
    if body is None or up.status != 200 or not readable_stream(up.headers):
        return None
    end = judge(ex.method, ex.path, body)
    if end is StreamEnd.TRUNCATED:
        raise UnrelayableResponse("the event stream ended before its end marker")
    return Verdict(Category.SERVER) if end is StreamEnd.ERROR_EVENT else None


def _header_int(up: UpstreamResponse | None, name: str) -> int | None:
    value = up.headers.get(name) if up is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def client_deadline(headers: Mapping[str, str], start: float, total: float) -> float:
    """`timeouts.total`, or sooner when the SDK says how long it will wait (x-stainless-read-timeout):
    retrying for a client that has already given up only adds load."""
    value = headers.get("x-stainless-read-timeout")
    if not value:
        return start + total
    try:
        seconds = float(value)
    except ValueError:
        return start + total
    return start + (seconds if 0 < seconds < total else total)


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

    __slots__ = ("_client", "_route", "_ex", "_outcome", "_emit", "_clock", "_rng", "_sleep")

    def __init__(self, client: UpstreamClient, route: RoutePolicy, ex: Exchange, outcome: Outcome, emit: Emitter, *,
                 clock: Callable[[], float], rng: Random, sleep: Sleep) -> None:
        self._client, self._route, self._outcome, self._emit = client, route, outcome, emit
        self._ex = ex._replace(method="GET", body=EMPTY,
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
                                  admits=lambda delay: route.breaker.admits(clock() + delay))
                if isinstance(decision, Stop):
                    return self._ended(response_id, starting_after, broken, decision.reason)
                if failed is not None:
                    self._emit(RetryScheduled(route.name, outcome.attempts, verdict.category,
                                              up.status if up is not None else None, decision.delay,
                                              decision.reason, decision.source, ex.request_id))
                    failed.discard()
                    failed = None
                    await self._sleep(decision.delay)
                permit = route.breaker.allow()
                if permit is None:
                    return self._ended(response_id, starting_after, broken, StopReason.BREAKER)
                outcome.attempts += 1
                new = await _attempt(self._client, route, ex, self._emit, permit, outcome.attempts, clock)
                if self._relays(new):
                    route.breaker.record(broken)  # the cut stream: one failure
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
            self._route.breaker.record(Category.INVALID_RESPONSE)
            new.deferred = False
        new.verdict = Verdict(Category.INVALID_RESPONSE)
        return False

    def _ended(self, response_id: str, starting_after: int, broken: Category, stop: StopReason | None) -> None:
        """Tell the observers how this cut ended; a stop is the request's stop reason too."""
        if stop is not None:
            self._outcome.stop = stop
        self._emit(StreamResumed(self._route.name, response_id, starting_after, self._outcome.attempts, broken,
                                 "failed" if stop is not None else "ok", stop, self._ex.request_id))
