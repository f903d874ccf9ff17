"""What a scrape renders: metric stores' snapshots summed by route and turned into the contract's
metric families, off the hot path (proxy.metrics only adds to slots)."""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import NamedTuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from . import __version__, metrics
from .metrics import HEAD, OFF, PAIR_BLOCK, PAIR_OFF, MetricsStore, Pair, Snapshot, block_size, hist_size, read_snapshot

_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
_LABELLED = ((metrics.REQUESTS, "requests", metrics.STATUS_CLASSES),
             (metrics.ERRORS, "errors", metrics.ERROR_CATEGORIES),
             (metrics.RETRIES, "retries", metrics.ATTEMPT_CATEGORIES), (metrics.STOPS, "stops", metrics.STOP_REASONS),
             (metrics.RESUMES, "resumes", metrics.RESUME_RESULTS))
_REMAINING = ((metrics.REMAINING_REQUESTS, OFF["remaining_requests"], OFF["remaining_requests_at"]),
              (metrics.REMAINING_TOKENS, OFF["remaining_tokens"], OFF["remaining_tokens_at"]))
_USED, _IN_FLIGHT, _BREAKER = OFF["used"], OFF["in_flight"], PAIR_OFF["breaker"]


class Combined(NamedTuple):
    """Route name -> one block laid out for `bounds` (the bucket bounds every snapshot has), and
    (route, upstream) -> one pair block."""

    bounds: tuple[float, ...]
    routes: dict[str, list[float]]
    pairs: dict[Pair, list[float]] = {}


def _fold(src: tuple[float, ...], dst: tuple[float, ...]) -> list[tuple[int, int]]:
    """(source slot, target slot) pairs that add a block with bucket bounds `src` into one with `dst`,
    a subset of `src`: `used` and the counters as they are; in each histogram the sum to the sum and
    a bucket to the first target bucket whose bound is >= its own (exact), +Inf to +Inf."""
    hist = [0] + [1 + bisect_left(dst, bound) for bound in (*src, math.inf)]
    return [(k, k) for k in range(_IN_FLIGHT)] + [
        (HEAD + o * hist_size(src) + i, HEAD + o * hist_size(dst) + t)
        for o in range(len(metrics.OUTCOMES)) for i, t in enumerate(hist)]


def combine(snapshots: Iterable[tuple[Snapshot, bool]]) -> Combined:
    """Sum (snapshot, live) pairs by route name into one block per route. A dead worker's counters
    and histograms still count (they happened), its gauges do not: in-flight is summed over the
    live, the breaker is the worst of them, a rate-limit reading the newest. Files that disagree on
    bucket bounds (a worker restarted with another config) are rendered with the bounds all have."""
    snaps = list(snapshots)
    bounds = tuple(sorted(set.intersection(*(set(s.bounds) for s, _ in snaps)))) if snaps else ()
    out: dict[str, list[float]] = {}
    pairs: dict[Pair, list[float]] = {}
    for snap, live in snaps:
        after = block_size(snap.bounds) * len(snap.routes)
        for k, pair in enumerate(snap.pairs):
            src = snap.slots[after + k * PAIR_BLOCK:after + (k + 1) * PAIR_BLOCK]
            c = pairs.setdefault(pair, [0.0] * PAIR_BLOCK)
            for i in range(_BREAKER):  # the counters
                c[i] += src[i]
            if live:
                c[_BREAKER] = max(c[_BREAKER], src[_BREAKER])
        s, n, fold = snap.slots, block_size(snap.bounds), _fold(snap.bounds, bounds)
        for name, i in zip(snap.routes, range(0, after, n)):
            src, c = s[i:i + n], out.setdefault(name, [0.0] * block_size(bounds))
            for a, b in fold:
                c[b] += src[a]
            if live:
                c[_IN_FLIGHT] += src[_IN_FLIGHT]
                for _, value, at in _REMAINING:
                    if src[at] > c[at]:
                        c[at], c[value] = src[at], src[value]
    return Combined(bounds, out, pairs)


def families(combined: Combined) -> list[Metric]:
    """The contract's families. Every (route, upstream) shows its breaker and transitions, every route
    its in-flight; one that has had a request every other counter series (zeros too, so a first error
    is a rate, not a new series) and both outcomes of its histogram; a rate-limit gauge once the
    upstream has sent it."""
    out = {fam: _KINDS[fam.kind](fam.name, fam.help, labels=fam.labels) for fam in metrics.FAMILIES}
    out[metrics.BUILD_INFO].add_metric([__version__], 1)
    le = [floatToGoString(b) for b in combined.bounds] + ["+Inf"]
    for (name, upstream), c in combined.pairs.items():
        out[metrics.BREAKER].add_metric([name, upstream], c[_BREAKER])
        for i, to in enumerate(metrics.TRANSITION_STATES):
            out[metrics.TRANSITIONS].add_metric([name, upstream, to], c[PAIR_OFF["transitions"] + i])
        if combined.routes.get(name, [0.0])[_USED]:
            for i, category in enumerate(metrics.ATTEMPT_CATEGORIES):
                out[metrics.ATTEMPTS].add_metric([name, upstream, category], c[PAIR_OFF["attempts"] + i])
    for name, c in combined.routes.items():
        out[metrics.IN_FLIGHT].add_metric([name], c[_IN_FLIGHT])
        for fam, value, at in _REMAINING:
            if c[at] > 0:
                out[fam].add_metric([name], c[value])
        if not c[_USED]:
            continue
        for fam, key, values in _LABELLED:
            for i, v in enumerate(values):
                out[fam].add_metric([name, v], c[OFF[key] + i])
        out[metrics.RETRY_SUCCESSES].add_metric([name], c[OFF["retry_successes"]])
        for o, outcome in enumerate(metrics.OUTCOMES):
            h = HEAD + o * hist_size(combined.bounds)
            out[metrics.DURATION].add_metric([name, outcome], list(zip(le, accumulate(c[h + 1:h + 1 + len(le)]))), c[h])
    return list(out.values())


class _Collector:
    def describe(self) -> list[Metric]:
        """The families without series: the names a registry checks for duplicates."""
        return families(Combined((), {}))


class StoreCollector(_Collector):
    """The collector of one process's own store (single-process mode)."""

    def __init__(self, store: MetricsStore) -> None:
        self._store = store

    def collect(self) -> list[Metric]:
        return families(combine([(self._store.snapshot(), True)]))


class DirectoryCollector(_Collector):
    """The supervisor's collector: every worker's file in `directory`, summed; `live_pids()` names
    the workers alive now (the others' files count for counters only)."""

    def __init__(self, directory: str, live_pids: Callable[[], Iterable[int]]) -> None:
        self._dir = directory
        self._live = live_pids

    def collect(self) -> list[Metric]:
        live = {f"{pid}.metrics" for pid in self._live()}
        files = sorted(f for f in os.listdir(self._dir) if f.endswith(".metrics"))
        snaps = [(read_snapshot(os.path.join(self._dir, f)), f in live) for f in files]
        return families(combine((snap, alive) for snap, alive in snaps if snap is not None))
