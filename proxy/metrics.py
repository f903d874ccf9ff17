"""Prometheus metrics: names, types and labels exactly as design.md's contract table.

The hot path never touches prometheus-client: each process keeps its values in one flat array of
doubles (a memory map), so a request costs a few index increments, no lock and no label lookup.
Under --workers the array is a file the supervisor sums (proxy.exposition renders them), like
prometheus-client's multiprocess mode at a fraction of its cost per increment.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import NamedTuple

from .classify import Category
from .events import (RESUME_RESULTS, AttemptFinished, BreakerChange, ConfigReloaded, Event, RequestFinished,
                     RequestStarted, RetryScheduled, StreamResumed)
from .upstreams import DEFAULT_UPSTREAM
from .retry import StopReason

P = "openai_proxy_"
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "aborted")
_STATUS_CLASS = ("aborted", "aborted", "2xx", "3xx", "4xx", "5xx")  # by status // 100
OUTCOMES = ("ok", "error")
TRANSITION_STATES = ("closed", "half_open", "open")  # by BreakerState value
# LLM latencies: 5 ms (a proxy-made 503 of an open breaker, a cached embedding) to the longest
# total timeout (a long reasoning stream). One fixed ladder, cut per config by `bucket_bounds`: two
# configs share their `le` values wherever both have them, so a fleet's histograms still add up.
LADDER = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
          900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)
ATTEMPT_CATEGORIES = tuple(c.value for c in Category if c is not Category.CIRCUIT_OPEN)
ERROR_CATEGORIES = tuple(c.value for c in Category if c is not Category.OK)
STOP_REASONS = tuple(r.value for r in StopReason)


class Family(NamedTuple):
    """One metric family of the contract: exposed name, type, help text and label names."""

    name: str
    kind: str  # counter, gauge, histogram
    help: str
    labels: tuple[str, ...]


REQUESTS = Family(P + "requests_total", "counter", "Client requests, by route and status class "
                  "(aborted: the connection was cut after the commit).", ("route", "status_class"))
ERRORS = Family(P + "errors_total", "counter", "Client requests whose final outcome was a failure, by category.",
                ("route", "category"))
ATTEMPTS = Family(P + "attempts_total", "counter", "Upstream attempts, by upstream and category (ok for a success).",
                  ("route", "upstream", "category"))
RETRIES = Family(P + "retries_total", "counter", "Retries, by the category of the attempt retried.",
                 ("route", "category"))
STOPS = Family(P + "retry_stops_total", "counter", "Why retrying stopped after a failed attempt.",
               ("route", "reason"))
BREAKER = Family(P + "breaker_state", "gauge", "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
                 ("route", "upstream"))
DURATION = Family(P + "request_duration_seconds", "histogram", "Client request duration, until the last byte; "
                  "outcome ok: a success delivered whole, error: everything else.", ("route", "outcome"))
IN_FLIGHT = Family(P + "in_flight_requests", "gauge", "Client requests in progress.", ("route",))
REMAINING_REQUESTS = Family(P + "ratelimit_remaining_requests", "gauge",
                            "The upstream's x-ratelimit-remaining-requests, last seen.", ("route",))
REMAINING_TOKENS = Family(P + "ratelimit_remaining_tokens", "gauge",
                          "The upstream's x-ratelimit-remaining-tokens, last seen.", ("route",))
RETRY_SUCCESSES = Family(P + "retry_successes_total", "counter",
                         "Client requests that succeeded after more than one attempt.", ("route",))
TRANSITIONS = Family(P + "breaker_transitions_total", "counter",
                     "Circuit breaker state changes, by upstream and the state entered.", ("route", "upstream", "to"))
RESUMES = Family(P + "stream_resumes_total", "counter", "Cut background Responses streams: ok, reconnected and "
                 "relayed on; failed, the proxy gave up and aborted the client connection.", ("route", "result"))
BUILD_INFO = Family(P + "build_info", "gauge", "The proxy's version; always 1.", ("version",))
FAMILIES = (REQUESTS, ERRORS, ATTEMPTS, RETRIES, STOPS, RETRY_SUCCESSES, RESUMES, BREAKER, TRANSITIONS, DURATION,
            IN_FLIGHT, REMAINING_REQUESTS, REMAINING_TOKENS, BUILD_INFO)


def bucket_bounds(longest_total: float) -> tuple[float, ...]:
    """The ladder up to its first bound >= the longest total timeout, so a request that ends within
    its deadline lands in a finite bucket; past the ladder's end, the total itself is the last bound."""
    for i, bound in enumerate(LADDER):
        if bound >= longest_total:
            return LADDER[:i + 1]
    return LADDER + ((float(longest_total),) if math.isfinite(longest_total) else ())


DEFAULT_BUCKETS = bucket_bounds(900.0)  # the built-in total timeout


# A route's block of slots: a fixed head (the counters, then the gauges), then one histogram per outcome:
# [sum, bucket 0 .. bucket n], n = len(bounds), the last bucket +Inf. Only the histograms depend on the bounds.
_SIZES = {"used": 1, "requests": len(STATUS_CLASSES), "errors": len(ERROR_CATEGORIES),
          "retries": len(ATTEMPT_CATEGORIES), "stops": len(STOP_REASONS), "retry_successes": 1,
          "resumes": len(RESUME_RESULTS), "in_flight": 1,
          "remaining_requests": 1, "remaining_requests_at": 1, "remaining_tokens": 1, "remaining_tokens_at": 1}
OFF = dict(zip(_SIZES, accumulate(_SIZES.values(), initial=0)))  # where each part of the head starts
HEAD = sum(_SIZES.values())
# A (route, upstream) pair's block, after every route's: its attempts and its breaker (the counters first).
_PAIR_SIZES = {"attempts": len(ATTEMPT_CATEGORIES), "transitions": len(TRANSITION_STATES), "breaker": 1}
PAIR_OFF = dict(zip(_PAIR_SIZES, accumulate(_PAIR_SIZES.values(), initial=0)))
PAIR_BLOCK = sum(_PAIR_SIZES.values())
_USED, _IN_FLIGHT, _BREAKER = OFF["used"], OFF["in_flight"], PAIR_OFF["breaker"]
_RETRY_SUCCESSES, _TRANSITIONS = OFF["retry_successes"], PAIR_OFF["transitions"]
_REM_REQ, _REM_REQ_AT = OFF["remaining_requests"], OFF["remaining_requests_at"]
_REM_TOK, _REM_TOK_AT = OFF["remaining_tokens"], OFF["remaining_tokens_at"]
_ABORTED = OFF["requests"] + STATUS_CLASSES.index("aborted")
_REQUESTS_BY_CODE = tuple(OFF["requests"] + STATUS_CLASSES.index(c) for c in _STATUS_CLASS)
_ERRORS = {Category(c): OFF["errors"] + i for i, c in enumerate(ERROR_CATEGORIES)}
_ATTEMPTS = {Category(c): PAIR_OFF["attempts"] + i for i, c in enumerate(ATTEMPT_CATEGORIES)}
_RETRIES = {Category(c): OFF["retries"] + i for i, c in enumerate(ATTEMPT_CATEGORIES)}
_STOPS = {r: OFF["stops"] + i for i, r in enumerate(STOP_REASONS)}
_RESUMES = {r: OFF["resumes"] + i for i, r in enumerate(RESUME_RESULTS)}


def hist_size(bounds: Sequence[float]) -> int:
    return len(bounds) + 2  # sum, the finite buckets, +Inf


def block_size(bounds: Sequence[float]) -> int:
    return HEAD + len(OUTCOMES) * hist_size(bounds)


_MAGIC = b"ORPM4\x00\x00\x00"  # 4: (route, upstream) pairs and the stream_resumes slots
_FILE_HEAD = struct.Struct("<8sQ")  # magic, length of the JSON that follows: {"routes", "pairs", "buckets"}
Pair = tuple[str, str]  # (route, upstream)


def _check_bounds(bounds: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(b) for b in bounds)
    if not out or any(not math.isfinite(b) for b in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"bucket bounds must be finite and increasing: {out!r}")
    return out


class MetricsStore:
    """One process's metric values, `slots[base[route] + offset]` and, for the families labelled by
    upstream, `slots[pair_base[route][upstream] + offset]`: anonymous memory, or under --workers a
    file in `directory` named by pid. The file starts with the route names, (route, upstream) pairs
    and bucket bounds, so workers of different configs still add up by name. Blocks are found by
    their key, never by position. Untouched pages cost no memory. `pairs` default: each route's
    (route, "default")."""

    def __init__(self, routes: Sequence[str], directory: str | None = None, *,
                 buckets: Sequence[float] = DEFAULT_BUCKETS, pairs: Sequence[Pair] | None = None) -> None:
        self.bounds = _check_bounds(buckets)
        self._path = None if directory is None else os.path.join(directory, f"{os.getpid()}.metrics")
        names = tuple(dict.fromkeys(routes))
        self.base: dict[str, int] = {}
        self.pair_base: dict[str, dict[str, int]] = {}
        self._map(names, tuple(dict.fromkeys(pairs if pairs is not None else [(r, DEFAULT_UPSTREAM) for r in names])))

    def _map(self, routes: tuple[str, ...], pairs: tuple[Pair, ...]) -> None:
        """Memory for `routes` and `pairs`, each block already here copied over by its key, then swapped
        in. A file is written under another name and moved over the old: the supervisor reads one or the other."""
        block = block_size(self.bounds)
        base = {name: i * block for i, name in enumerate(routes)}
        after = block * len(routes)
        pair_base: dict[str, dict[str, int]] = {}
        for i, (route, upstream) in enumerate(pairs):
            pair_base.setdefault(route, {})[upstream] = after + i * PAIR_BLOCK
        meta = json.dumps({"routes": routes, "pairs": pairs, "buckets": self.bounds}).encode()
        meta += b" " * (-len(meta) % 8)  # so the doubles start 8-byte aligned
        head = _FILE_HEAD.pack(_MAGIC, len(meta)) + meta
        size = len(head) + 8 * max(after + PAIR_BLOCK * len(pairs), 1)
        if self._path is None:
            memory = mmap.mmap(-1, size)
        else:
            with os.fdopen(os.open(self._path + ".new", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), "r+b") as f:
                f.truncate(size)
                memory = mmap.mmap(f.fileno(), size)
        memory[:len(head)] = head
        slots = memoryview(memory)[len(head):].cast("d")
        for name, at in self.base.items():  # a reload: every old block to its new place
            slots[base[name]:base[name] + block] = self.slots[at:at + block]
        for route, ups in self.pair_base.items():
            for upstream, at in ups.items():
                to = pair_base[route][upstream]
                slots[to:to + PAIR_BLOCK] = self.slots[at:at + PAIR_BLOCK]
        if self._path is not None:
            os.replace(self._path + ".new", self._path)
        self.routes, self.pairs, self.slots, self.base, self.pair_base = routes, pairs, slots, base, pair_base
        self._current = Snapshot(routes, self.bounds, slots, pairs)  # one attribute: a scrape reads it in one step

    def add(self, routes: Sequence[str], pairs: Sequence[Pair]) -> None:
        """A reload's new routes and (route, upstream) pairs get blocks of their own; the others keep their
        values (and their series: a counter must not vanish). The histogram bounds stay: rates would break."""
        new = tuple(r for r in dict.fromkeys(routes) if r not in self.base)
        more = tuple(p for p in dict.fromkeys(pairs) if p[1] not in self.pair_base.get(p[0], ()))
        if new or more:
            self._map(self.routes + new, self.pairs + more)

    def snapshot(self) -> Snapshot:
        """A copy, taken in one step: a scrape never sees half of a request's updates."""
        routes, bounds, slots, pairs = self._current
        return Snapshot(routes, bounds, memoryview(bytes(slots)).cast("d"), pairs)


class Snapshot(NamedTuple):
    routes: tuple[str, ...]
    bounds: tuple[float, ...]  # the duration histogram's finite bucket bounds
    slots: Sequence[float]  # the routes' blocks, then the pairs'
    pairs: tuple[Pair, ...] = ()


def read_snapshot(path: str) -> Snapshot | None:
    """A worker's file, or None if it is not one (being created, truncated, or foreign)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        magic, n = _FILE_HEAD.unpack_from(data)
        if magic != _MAGIC:
            return None
        meta = json.loads(data[_FILE_HEAD.size:_FILE_HEAD.size + n])
        routes, bounds = tuple(str(r) for r in meta["routes"]), _check_bounds(meta["buckets"])
        pairs = tuple((str(r), str(u)) for r, u in meta["pairs"])
        start, size = _FILE_HEAD.size + n, block_size(bounds) * len(routes) + PAIR_BLOCK * len(pairs)
        slots = memoryview(data)[start:start + 8 * size].cast("d")
        return Snapshot(routes, bounds, slots, pairs) if len(slots) == size else None
    except (OSError, ValueError, TypeError, KeyError, struct.error):
        return None


_OK = Category.OK


class MetricsObserver:
    """Events -> slot updates. Observes only; runs on the event loop, so no lock is needed."""

    __slots__ = ("_store", "_s", "_base", "_pairs", "_now", "_bounds", "_hist_error")

    def __init__(self, store: MetricsStore, *, now: Callable[[], float] = time.time) -> None:
        self._store = store
        self._s, self._base, self._bounds, self._now = store.slots, store.base, store.bounds, now
        self._pairs = store.pair_base
        self._hist_error = HEAD + hist_size(store.bounds)

    def __call__(self, event: Event) -> None:
        s = self._s
        if isinstance(event, RequestFinished):
            b = self._base[event.route]
            status = event.status
            if status is None or event.aborted or not 200 <= status < 600:
                s[b + _ABORTED] += 1
            else:
                s[b + _REQUESTS_BY_CODE[status // 100]] += 1
            category = event.category
            if category is not _OK:
                s[b + _ERRORS[category]] += 1
                h = b + self._hist_error
            elif event.aborted:
                h = b + self._hist_error
            else:
                h = b + HEAD
                if event.attempts > 1:
                    s[b + _RETRY_SUCCESSES] += 1
            if event.stop_reason is not None:
                s[b + _STOPS[event.stop_reason]] += 1
            d = event.duration_s
            s[h + 1 + bisect_left(self._bounds, d)] += 1
            s[h] += d
            s[b + _IN_FLIGHT] -= 1
        elif isinstance(event, RequestStarted):
            b = self._base[event.route]
            s[b + _USED] = 1
            s[b + _IN_FLIGHT] += 1
        elif isinstance(event, AttemptFinished):
            s[self._pairs[event.route][event.upstream] + _ATTEMPTS[event.category]] += 1
            b = self._base[event.route]
            if event.remaining_requests is not None:
                s[b + _REM_REQ] = event.remaining_requests
                s[b + _REM_REQ_AT] = self._now()
            if event.remaining_tokens is not None:
                s[b + _REM_TOK] = event.remaining_tokens
                s[b + _REM_TOK_AT] = self._now()
        elif isinstance(event, RetryScheduled):
            s[self._base[event.route] + _RETRIES[event.category]] += 1
        elif isinstance(event, StreamResumed):
            s[self._base[event.route] + _RESUMES[event.result]] += 1
        elif isinstance(event, ConfigReloaded):
            store = self._store
            store.add(event.routes, event.pairs)
            self._s, self._base, self._pairs = store.slots, store.base, store.pair_base
        elif isinstance(event, BreakerChange):
            new = int(event.new)
            for route in event.routes:
                b = self._pairs[route][event.upstream]
                s[b + _BREAKER] = new
                s[b + _TRANSITIONS + new] += 1
