"""What a scrape renders: metric stores' snapshots summed by route and turned into the contract's
metric families (prometheus-client writes the text). Runs at scrape time, off the hot path: the
store and its observer (proxy.metrics) only add to slots.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from . import __version__
from .metrics import (ATTEMPT_CATEGORIES, ATTEMPTS, BREAKER, BUILD_INFO, DURATION, ERROR_CATEGORIES, ERRORS, FAMILIES,
                      HEAD, IN_FLIGHT, OUTCOMES, REMAINING_REQUESTS, REMAINING_TOKENS, REQUESTS, RETRIES,
                      RETRY_SUCCESSES, SLOTS as L, STATUS_CLASSES, STOP_REASONS, STOPS, TRANSITION_STATES, TRANSITIONS,
                      MetricsStore, Snapshot, block_size, hist_size, read_snapshot)


_ROUTE_VALUES = ((REQUESTS, "requests", STATUS_CLASSES), (ERRORS, "errors", ERROR_CATEGORIES),
                 (ATTEMPTS, "attempts", ATTEMPT_CATEGORIES), (RETRIES, "retries", ATTEMPT_CATEGORIES),
                 (STOPS, "stops", STOP_REASONS))
_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


class Combined(NamedTuple):
    """Route name -> one block laid out for `bounds` (the bucket bounds every snapshot has)."""

    bounds: tuple[float, ...]
    routes: dict[str, list[float]]


def _fold(src: Sequence[float], dst: Sequence[float]) -> list[tuple[int, int]]:
    """(source slot, target slot) pairs, relative to the histograms' start, that re-bucket the
    histograms of a block with bounds `src` into bounds `dst`, a subset of `src`.

    Exact: each target bucket (dst[k-1], dst[k]] is the union of the source buckets in it, so a
    source bucket goes to the first target bucket whose bound is >= its own (+Inf to +Inf)."""
    pairs = []
    for o in range(len(OUTCOMES)):
        s0, d0 = o * hist_size(src), o * hist_size(dst)
        pairs.append((s0, d0))  # the sum
        for i, bound in enumerate(src):
            pairs.append((s0 + 1 + i, d0 + 1 + bisect_left(dst, bound)))
        pairs.append((s0 + 1 + len(src), d0 + 1 + len(dst)))  # +Inf
    return pairs


def combine(snapshots: Iterable[tuple[Snapshot, bool]]) -> Combined:
    """Sum snapshots by route name into one block per route.

    Counters and the histograms are summed over every snapshot; `live` False marks a dead worker's
    file, whose counters still count (they happened) but whose gauges do not: in-flight is summed
    over live workers, the breaker is the worst of them, a rate-limit reading the newest of them.

    Workers of one config share one set of bucket bounds. Should files disagree (a worker restarted
    with another config), the histograms are rendered with the bounds all of them have: the counts
    stay exact, the other bounds are left out until the supervisor restarts.
    """
    snaps = list(snapshots)
    common = set(snaps[0][0].bounds) if snaps else set()
    for snap, _ in snaps[1:]:
        common &= set(snap.bounds)
    bounds = tuple(sorted(common))
    block = block_size(bounds)
    out: dict[str, list[float]] = {}
    for snap, live in snaps:
        s, n = snap.slots, block_size(snap.bounds)
        fold = [(HEAD + a, HEAD + b) for a, b in _fold(snap.bounds, bounds)]
        for name, i in zip(snap.routes, range(0, len(s), n)):
            src = s[i:i + n]
            c = out.get(name)
            if c is None:
                c = out[name] = [0.0] * block
            for k in range(L.in_flight):  # used and the counters
                c[k] += src[k]
            if src[L.used]:  # a route that never had a request has empty histograms
                for a, b in fold:
                    c[b] += src[a]
            if not live:
                continue
            c[L.in_flight] += src[L.in_flight]
            c[L.breaker] = max(c[L.breaker], src[L.breaker])
            for value, at in L.remaining:
                if src[at] > c[at]:
                    c[at], c[value] = src[at], src[value]
    return Combined(bounds, out)


def families(combined: Combined) -> list[Metric]:
    """The contract's metric families from combined route values.

    Every route shows its breaker and in-flight gauges and its transition counters. A route that
    has seen a request shows every other counter series (zeros included, so a first error is a
    rate, not a new series) and both outcomes of its histogram; rate-limit gauges appear once the
    upstream has sent the header.
    """
    out = {fam: _KINDS[fam.kind](fam.name, fam.help, labels=list(fam.labels)) for fam in FAMILIES}
    out[BUILD_INFO].add_metric([__version__], 1)
    le = [floatToGoString(b) for b in combined.bounds] + ["+Inf"]
    size = hist_size(combined.bounds)
    for name, c in combined.routes.items():
        out[BREAKER].add_metric([name], c[L.breaker])
        for i, to in enumerate(TRANSITION_STATES):
            out[TRANSITIONS].add_metric([name, to], c[L.transitions + i])
        out[IN_FLIGHT].add_metric([name], c[L.in_flight])
        if c[L.remaining[0][1]] > 0:
            out[REMAINING_REQUESTS].add_metric([name], c[L.remaining[0][0]])
        if c[L.remaining[1][1]] > 0:
            out[REMAINING_TOKENS].add_metric([name], c[L.remaining[1][0]])
        if not c[L.used]:
            continue
        for fam, key, values in _ROUTE_VALUES:
            metric, off = out[fam], L.offsets[key]
            for i, v in enumerate(values):
                metric.add_metric([name, v], c[off + i])
        out[RETRY_SUCCESSES].add_metric([name], c[L.retry_successes])
        for o, outcome in enumerate(OUTCOMES):
            h = HEAD + o * size
            cumulative, buckets = 0.0, []
            for i, bound in enumerate(le):
                cumulative += c[h + 1 + i]
                buckets.append((bound, cumulative))
            out[DURATION].add_metric([name, outcome], buckets, sum_value=c[h])
    return list(out.values())


class StoreCollector:
    """The collector of one process's own store (single-process mode)."""

    def __init__(self, store: MetricsStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield from families(combine([(self._store.snapshot(), True)]))

    def describe(self) -> list[Metric]:
        return families(Combined((), {}))


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
        return families(Combined((), {}))
