"""Prometheus metrics: names, types and labels exactly as design.md's contract table.

The hot path never touches prometheus-client. Each process keeps its counters in one flat array
of doubles (a memory map): a request costs a few index increments, no lock and no label lookup.
A route's block is a fixed set of slots, so a route costs nothing until its first request, and a
scrape renders only routes that have seen traffic (plus the breaker and in-flight gauges, which
every route shows from the start). prometheus-client still renders the exposition text: the
collectors below turn a snapshot of the array into its metric families.

With --workers N each worker's array is a file in a private directory; the supervisor's
`DirectoryCollector` sums them (counters of dead workers included, gauges of live ones only), the
equivalent of prometheus-client's multiprocess mode at a fraction of its cost per increment.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .classify import Category
from .events import AttemptFinished, BreakerChange, Event, RequestFinished, RequestStarted, RetryScheduled
from .retry import StopReason

P = "openai_proxy_"
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "aborted")
_STATUS_CLASS = ("aborted", "aborted", "2xx", "3xx", "4xx", "5xx")  # by status // 100
# LLM latencies: tens of milliseconds (a cached embedding) to ten minutes (a long reasoning stream)
BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ATTEMPT_CATEGORIES = tuple(c.value for c in Category if c is not Category.CIRCUIT_OPEN)
_ERROR_CATEGORIES = tuple(c.value for c in Category if c is not Category.OK)
_STOP_REASONS = tuple(r.value for r in StopReason)


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
ATTEMPTS = Family(P + "attempts_total", "counter", "Upstream attempts, by category (ok for a success).",
                  ("route", "category"))
RETRIES = Family(P + "retries_total", "counter", "Retries, by the category of the attempt retried.",
                 ("route", "category"))
STOPS = Family(P + "retry_stops_total", "counter", "Why retrying stopped after a failed attempt.",
               ("route", "reason"))
BREAKER = Family(P + "breaker_state", "gauge", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ("route",))
DURATION = Family(P + "request_duration_seconds", "histogram", "Client request duration, until the last byte.",
                  ("route",))
IN_FLIGHT = Family(P + "in_flight_requests", "gauge", "Client requests in progress.", ("route",))
REMAINING_REQUESTS = Family(P + "ratelimit_remaining_requests", "gauge",
                            "The upstream's x-ratelimit-remaining-requests, last seen.", ("route",))
REMAINING_TOKENS = Family(P + "ratelimit_remaining_tokens", "gauge",
                          "The upstream's x-ratelimit-remaining-tokens, last seen.", ("route",))
FAMILIES = (REQUESTS, ERRORS, ATTEMPTS, RETRIES, STOPS, BREAKER, DURATION, IN_FLIGHT, REMAINING_REQUESTS,
            REMAINING_TOKENS)


# ---- one route's block of slots (pure layout) ----------------------------------------------------

def _layout() -> tuple[dict[str, int], int]:
    sizes = [("used", 1), ("requests", len(STATUS_CLASSES)), ("errors", len(_ERROR_CATEGORIES)),
             ("attempts", len(_ATTEMPT_CATEGORIES)), ("retries", len(_ATTEMPT_CATEGORIES)),
             ("stops", len(_STOP_REASONS)), ("buckets", len(BUCKETS) + 1), ("sum", 1), ("in_flight", 1),
             ("breaker", 1), ("remaining_requests", 1), ("remaining_requests_at", 1), ("remaining_tokens", 1),
             ("remaining_tokens_at", 1)]
    offsets, off = {}, 0
    for name, n in sizes:
        offsets[name] = off
        off += n
    return offsets, off


_OFF, BLOCK = _layout()
_USED, _BUCKETS, _SUM, _IN_FLIGHT, _BREAKER = (_OFF[k] for k in ("used", "buckets", "sum", "in_flight", "breaker"))
_REM_REQ, _REM_REQ_AT = _OFF["remaining_requests"], _OFF["remaining_requests_at"]
_REM_TOK, _REM_TOK_AT = _OFF["remaining_tokens"], _OFF["remaining_tokens_at"]
_REQUESTS = {c: _OFF["requests"] + i for i, c in enumerate(STATUS_CLASSES)}
_REQUESTS_BY_CODE = tuple(_REQUESTS[c] for c in _STATUS_CLASS)
_ERRORS = {Category(c): _OFF["errors"] + i for i, c in enumerate(_ERROR_CATEGORIES)}
_ATTEMPTS = {Category(c): _OFF["attempts"] + i for i, c in enumerate(_ATTEMPT_CATEGORIES)}
_RETRIES = {Category(c): _OFF["retries"] + i for i, c in enumerate(_ATTEMPT_CATEGORIES)}
_STOPS = {r: _OFF["stops"] + i for i, r in enumerate(_STOP_REASONS)}


# ---- the store: a process's array, anonymous or a file ------------------------------------------

_MAGIC = b"ORPM1\x00\x00\x00"
_HEAD = struct.Struct("<8sQ")  # magic, length of the JSON route list that follows


class MetricsStore:
    """One process's metric values: `slots[base(route) + offset]` are plain doubles.

    Anonymous memory in a single process; a file in `directory` (named by pid) under --workers, so
    the supervisor can read it. The file starts with the route names, so a worker restarted with a
    different config is still summed by name. Untouched pages cost no memory.
    """

    def __init__(self, routes: Sequence[str], directory: str | None = None) -> None:
        self.routes = tuple(dict.fromkeys(routes))
        self.base = {name: i * BLOCK for i, name in enumerate(self.routes)}
        header = json.dumps(self.routes).encode()
        start = -(-(_HEAD.size + len(header)) // 8) * 8  # the doubles start 8-byte aligned
        size = start + 8 * BLOCK * max(len(self.routes), 1)
        self.path: str | None = None
        if directory is None:
            self._map = mmap.mmap(-1, size)
        else:
            self.path = os.path.join(directory, f"{os.getpid()}.metrics")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        self._map[:_HEAD.size + len(header)] = _HEAD.pack(_MAGIC, len(header)) + header
        self._start = start
        self.slots = memoryview(self._map)[start:].cast("d")

    def snapshot(self) -> Snapshot:
        """A copy, taken in one step: a scrape never sees half of a request's updates."""
        return Snapshot(self.routes, memoryview(bytes(self.slots)).cast("d"))


class Snapshot(NamedTuple):
    routes: tuple[str, ...]
    slots: Sequence[float]


def read_snapshot(path: str) -> Snapshot | None:
    """A worker's file, or None if it is not one (being created, truncated, or foreign)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        magic, n = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            return None
        routes = tuple(json.loads(data[_HEAD.size:_HEAD.size + n]))
        start = -(-(_HEAD.size + n) // 8) * 8
        slots = memoryview(data)[start:start + 8 * BLOCK * len(routes)].cast("d")
        if len(slots) != BLOCK * len(routes):
            return None
        return Snapshot(routes, slots)
    except (OSError, ValueError, struct.error):
        return None


# ---- events -> slots ---------------------------------------------------------------------------

class MetricsObserver:
    """Events -> slot updates. Observes only; runs on the event loop, so no lock is needed."""

    __slots__ = ("store", "_s", "_base", "_now")

    def __init__(self, store: MetricsStore, *, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self._s = store.slots
        self._base = store.base
        self._now = now

    def __call__(self, event: Event) -> None:
        s = self._s
        if isinstance(event, RequestFinished):
            b = self._base[event.route]
            status = event.status
            if status is None or event.aborted or not 200 <= status < 600:
                s[b + _REQUESTS["aborted"]] += 1
            else:
                s[b + _REQUESTS_BY_CODE[status // 100]] += 1
            if event.category is not Category.OK:
                s[b + _ERRORS[event.category]] += 1
            if event.stop_reason is not None:
                s[b + _STOPS[event.stop_reason]] += 1
            d = event.duration_s
            s[b + _BUCKETS + bisect_left(BUCKETS, d)] += 1
            s[b + _SUM] += d
            s[b + _IN_FLIGHT] -= 1
        elif isinstance(event, RequestStarted):
            b = self._base[event.route]
            s[b + _USED] = 1
            s[b + _IN_FLIGHT] += 1
        elif isinstance(event, AttemptFinished):
            b = self._base[event.route]
            s[b + _ATTEMPTS[event.category]] += 1
            if event.remaining_requests is not None:
                s[b + _REM_REQ] = event.remaining_requests
                s[b + _REM_REQ_AT] = self._now()
            if event.remaining_tokens is not None:
                s[b + _REM_TOK] = event.remaining_tokens
                s[b + _REM_TOK_AT] = self._now()
        elif isinstance(event, RetryScheduled):
            s[self._base[event.route] + _RETRIES[event.category]] += 1
        elif isinstance(event, BreakerChange):
            for route in event.routes:
                s[self._base[route] + _BREAKER] = int(event.new)


# ---- snapshots -> metric families (pure) ---------------------------------------------------------

_ROUTE_VALUES = ((REQUESTS, "requests", STATUS_CLASSES), (ERRORS, "errors", _ERROR_CATEGORIES),
                 (ATTEMPTS, "attempts", _ATTEMPT_CATEGORIES), (RETRIES, "retries", _ATTEMPT_CATEGORIES),
                 (STOPS, "stops", _STOP_REASONS))
_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
_LE = tuple(floatToGoString(b) for b in BUCKETS) + ("+Inf",)


def combine(snapshots: Iterable[tuple[Snapshot, bool]]) -> dict[str, list[float]]:
    """Sum snapshots by route name into one block per route.

    Counters and the histogram are summed over every snapshot; `live` False marks a dead worker's
    file, whose counters still count (they happened) but whose gauges do not: in-flight is summed
    over live workers, the breaker is the worst of them, a rate-limit reading the newest of them.
    """
    out: dict[str, list[float]] = {}
    for snap, live in snapshots:
        s = snap.slots
        for name, i in zip(snap.routes, range(0, len(s), BLOCK)):
            block = s[i:i + BLOCK]
            c = out.get(name)
            if c is None:
                c = out[name] = [0.0] * BLOCK
            for k in range(_IN_FLIGHT):  # used, counters, buckets, sum
                c[k] += block[k]
            if not live:
                continue
            c[_IN_FLIGHT] += block[_IN_FLIGHT]
            c[_BREAKER] = max(c[_BREAKER], block[_BREAKER])
            for value, at in ((_REM_REQ, _REM_REQ_AT), (_REM_TOK, _REM_TOK_AT)):
                if block[at] > c[at]:
                    c[at], c[value] = block[at], block[value]
    return out


def families(routes: dict[str, list[float]]) -> list[Metric]:
    """The contract's metric families from combined route values.

    Every route shows its breaker and in-flight gauges. A route that has seen a request shows
    every counter series (zeros included, so a first error is a rate, not a new series) and its
    histogram; rate-limit gauges appear once the upstream has sent the header.
    """
    out = {fam: _KINDS[fam.kind](fam.name, fam.help, labels=list(fam.labels)) for fam in FAMILIES}
    for name, c in routes.items():
        out[BREAKER].add_metric([name], c[_BREAKER])
        out[IN_FLIGHT].add_metric([name], c[_IN_FLIGHT])
        if c[_REM_REQ_AT] > 0:
            out[REMAINING_REQUESTS].add_metric([name], c[_REM_REQ])
        if c[_REM_TOK_AT] > 0:
            out[REMAINING_TOKENS].add_metric([name], c[_REM_TOK])
        if not c[_USED]:
            continue
        for fam, key, values in _ROUTE_VALUES:
            metric, off = out[fam], _OFF[key]
            for i, v in enumerate(values):
                metric.add_metric([name, v], c[off + i])
        cumulative, buckets = 0.0, []
        for i, le in enumerate(_LE):
            cumulative += c[_BUCKETS + i]
            buckets.append((le, cumulative))
        out[DURATION].add_metric([name], buckets, sum_value=c[_SUM])
    return list(out.values())


class StoreCollector:
    """The collector of one process's own store (single-process mode)."""

    def __init__(self, store: MetricsStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield from families(combine([(self._store.snapshot(), True)]))

    def describe(self) -> list[Metric]:
        return families({})


class DirectoryCollector:
    """The supervisor's collector: every worker's file in `directory`, summed.

    `live_pids()` names the workers alive now; the others' files still count for counters.
    """

    def __init__(self, directory: str, live_pids: Callable[[], Iterable[int]]) -> None:
        self._dir = directory
        self._live = live_pids

    def collect(self) -> Iterator[Metric]:
        live = {str(p) for p in self._live()}
        snaps = []
        for entry in sorted(os.listdir(self._dir)):
            pid, dot, ext = entry.partition(".")
            if ext != "metrics":
                continue
            snap = read_snapshot(os.path.join(self._dir, entry))
            if snap is not None:
                snaps.append((snap, pid in live))
        yield from families(combine(snaps))

    def describe(self) -> list[Metric]:
        return families({})
