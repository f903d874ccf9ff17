"""The metric store: events -> slots -> the contract's families, and the sum over worker files."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy import config as cfg
from proxy import process_metrics
from proxy.app import duration_buckets
from proxy.classify import Category
from proxy.events import AttemptFinished, BreakerChange, BreakerState, RequestFinished, RequestStarted, RetryScheduled
from proxy.exposition import DirectoryCollector, StoreCollector, combine, families
from proxy.metrics import DEFAULT_BUCKETS, FAMILIES, LADDER, MetricsObserver, MetricsStore, bucket_bounds, read_snapshot
from proxy.process_metrics import ProcessTreeCollector, process_collectors
from prometheus_client import ProcessCollector

ROUTES = ["chat", "files", "default"]
DURATION = "openai_proxy_request_duration_seconds"


def finished(route: str, status: int | None = 200, category: Category = Category.OK, duration: float = 0.2,
             stop: str | None = None, aborted: bool = False, attempts: int = 1) -> RequestFinished:
    return RequestFinished(route, "POST", "/v1/x", status, category, attempts, stop, aborted, duration, 0.01, 10, 20,
                           True, None, None, None)


def exposition(collector) -> dict[tuple, float]:
    """The collector's /metrics text, parsed back as Prometheus would: (sample name, labels) -> value."""
    text = generate_latest(_registry(collector)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _registry(*collectors) -> CollectorRegistry:
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    return registry


# the families labelled by upstream too: a route of one upstream has "default"
BY_UPSTREAM = {"openai_proxy_attempts_total", "openai_proxy_breaker_state", "openai_proxy_breaker_transitions_total"}


def getter(got: dict[tuple, float], route: str = "chat", upstream: str = "default"):
    def v(name: str, **labels: str) -> float:
        if name in BY_UPSTREAM:
            labels = {"upstream": upstream, **labels}
        return got[(name, tuple(sorted({"route": route, **labels}.items())))]
    return v


def drive(observe: MetricsObserver, route: str, *events) -> None:
    observe(RequestStarted(route))
    for e in events:
        observe(e)


def at_pid(monkeypatch: pytest.MonkeyPatch, pid: int) -> None:
    monkeypatch.setattr(os, "getpid", lambda: pid)


def test_counts_buckets_and_gauges_from_events():
    store = MetricsStore(ROUTES)
    observe = MetricsObserver(store, now=lambda: 100.0)
    drive(observe, "chat", AttemptFinished("chat", 1, Category.SERVER, 503, 0.1),
          RetryScheduled("chat", 1, Category.SERVER, 503, 0.01, "backoff", "backoff"),
          AttemptFinished("chat", 2, Category.OK, 200, 0.1, remaining_requests=59, remaining_tokens=1000),
          finished("chat", duration=0.05, attempts=2))
    drive(observe, "chat", finished("chat", 503, Category.SERVER, duration=700.0, stop="limit", attempts=3))
    drive(observe, "chat", finished("chat", None, aborted=True, duration=0.004, attempts=2))
    observe(RequestStarted("chat"))  # still in flight
    observe(BreakerChange("chat", ("chat",), BreakerState.CLOSED, BreakerState.OPEN))
    v = getter(exposition(StoreCollector(store)))

    assert v("openai_proxy_requests_total", status_class="2xx") == 1
    assert v("openai_proxy_requests_total", status_class="5xx") == 1
    assert v("openai_proxy_requests_total", status_class="aborted") == 1
    assert v("openai_proxy_errors_total", category="server") == 1
    assert v("openai_proxy_errors_total", category="quota_exceeded") == 0  # zeros exist once the route is used
    assert v("openai_proxy_attempts_total", category="server") == 1
    assert v("openai_proxy_attempts_total", category="ok") == 1
    assert v("openai_proxy_retries_total", category="server") == 1
    assert v("openai_proxy_retry_stops_total", reason="limit") == 1
    # only the success after a retry: neither the failure after 3 attempts nor the aborted one
    assert v("openai_proxy_retry_successes_total") == 1
    assert v("openai_proxy_in_flight_requests") == 1
    assert v("openai_proxy_breaker_state") == 2
    assert v("openai_proxy_breaker_transitions_total", to="open") == 1
    assert v("openai_proxy_breaker_transitions_total", to="closed") == 0
    assert v("openai_proxy_ratelimit_remaining_requests") == 59
    assert v("openai_proxy_ratelimit_remaining_tokens") == 1000
    # outcome ok: the success only; error: the 503 and the aborted request (its category is ok)
    assert v(DURATION + "_count", outcome="ok") == 1
    assert v(DURATION + "_sum", outcome="ok") == pytest.approx(0.05)
    assert v(DURATION + "_bucket", outcome="ok", le="0.025") == 0
    assert v(DURATION + "_bucket", outcome="ok", le="0.05") == 1  # le is inclusive
    assert v(DURATION + "_count", outcome="error") == 2
    assert v(DURATION + "_sum", outcome="error") == pytest.approx(700.004)
    assert v(DURATION + "_bucket", outcome="error", le="0.005") == 1  # 5 ms is the first bound
    assert v(DURATION + "_bucket", outcome="error", le="600.0") == 1
    assert v(DURATION + "_bucket", outcome="error", le="900.0") == 2  # 700 s: no longer only in +Inf
    assert v(DURATION + "_bucket", outcome="error", le="+Inf") == 2


def test_transitions_count_every_route_of_a_group_and_exist_from_the_start():
    store = MetricsStore(ROUTES)
    observe = MetricsObserver(store)
    v0 = exposition(StoreCollector(store))
    for route in ROUTES:  # before any request or change: three zeros per route
        for to in ("closed", "half_open", "open"):
            assert getter(v0, route)("openai_proxy_breaker_transitions_total", to=to) == 0
    flips = [(BreakerState.CLOSED, BreakerState.OPEN), (BreakerState.OPEN, BreakerState.HALF_OPEN),
             (BreakerState.HALF_OPEN, BreakerState.OPEN), (BreakerState.OPEN, BreakerState.HALF_OPEN),
             (BreakerState.HALF_OPEN, BreakerState.CLOSED)]
    for old, new in flips:  # the 10 ms half-open -> open flip that a gauge scraped every 15 s misses
        observe(BreakerChange("upstream_a", ("chat", "files"), old, new))
    got = exposition(StoreCollector(store))
    for route in ("chat", "files"):
        v = getter(got, route)
        assert (v("openai_proxy_breaker_transitions_total", to="open"),
                v("openai_proxy_breaker_transitions_total", to="half_open"),
                v("openai_proxy_breaker_transitions_total", to="closed")) == (2, 2, 1)
        assert v("openai_proxy_breaker_state") == 0
    assert getter(got, "default")("openai_proxy_breaker_transitions_total", to="open") == 0


def test_an_unused_route_shows_only_its_breaker_gauges_transitions_and_in_flight():
    store = MetricsStore(ROUTES)
    drive(MetricsObserver(store), "chat", finished("chat"))
    got = exposition(StoreCollector(store))
    files = {name for name, labels in got if ("route", "files") in labels}
    assert files == {"openai_proxy_breaker_state", "openai_proxy_in_flight_requests",
                     "openai_proxy_breaker_transitions_total"}
    # a used route has both outcomes from its first request, so an error rate has a denominator
    v = getter(got)
    assert v(DURATION + "_count", outcome="ok") == 1 and v(DURATION + "_count", outcome="error") == 0
    assert v("openai_proxy_retry_successes_total") == 0
    text = generate_latest(_registry(StoreCollector(store))).decode()
    for fam in FAMILIES:
        assert f"# TYPE {fam.name} {fam.kind}" in text, fam.name
        assert f"# HELP {fam.name} {fam.help}" in text, fam.name
    assert "_created" not in text
    # no rate-limit reading yet: no gauge rather than a misleading 0
    assert "openai_proxy_ratelimit_remaining_requests{" not in text


def test_build_info_names_the_installed_version():
    got = exposition(StoreCollector(MetricsStore(ROUTES)))
    assert got[("openai_proxy_build_info", (("version", proxy.__version__),))] == 1
    assert proxy.__version__ == importlib.metadata.version("openai-resilience-proxy")


def test_every_family_is_listed_with_its_labels():
    by_name = {f.name: f for f in FAMILIES}
    assert by_name["openai_proxy_request_duration_seconds"].labels == ("route", "outcome")
    assert by_name["openai_proxy_breaker_transitions_total"] == ("openai_proxy_breaker_transitions_total", "counter",
                                                                by_name["openai_proxy_breaker_transitions_total"].help,
                                                                ("route", "upstream", "to"))
    assert by_name["openai_proxy_attempts_total"].labels == ("route", "upstream", "category")
    assert by_name["openai_proxy_breaker_state"].labels == ("route", "upstream")
    assert by_name["openai_proxy_retry_successes_total"].labels == ("route",)
    assert by_name["openai_proxy_build_info"].labels == ("version",)
    assert all(f.help and f.kind in ("counter", "gauge", "histogram") for f in FAMILIES)
    # every family the collector renders is in FAMILIES (the chart's tests read it)
    rendered = {m.name for m in families(combine([(MetricsStore(ROUTES).snapshot(), True)]))}
    assert rendered == {f.name.removesuffix("_total") for f in FAMILIES}


# ---- bucket bounds -------------------------------------------------------------------------------

@pytest.mark.parametrize(("total", "last"), [
    (900.0, 900.0),  # the built-in total timeout: exactly a ladder bound
    (30.0, 30.0),
    (45.0, 60.0),  # the next ladder bound, not 45: fleets with other totals keep the same le values
    (0.001, 0.005),
    (86400.0, 86400.0),
    (100000.0, 100000.0),  # past the ladder's end: the total itself
])
def test_bucket_bounds_reach_the_longest_total(total: float, last: float):
    bounds = bucket_bounds(total)
    assert bounds[0] == 0.005 and bounds[-1] == last
    assert bounds[:-1] == LADDER[:len(bounds) - 1]


def test_default_bounds():
    assert DEFAULT_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                               300.0, 600.0, 900.0)


def test_bounds_come_from_the_longest_total_of_any_route(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": {"timeouts": {"total": "30s"}},
        "routes": [{"name": "chat", "path": "/v1/chat/completions"},
                   {"name": "long", "path": "/v1/responses", "timeouts": {"total": "20m"}}]}))
    assert duration_buckets(cfg.load(str(path)))[-1] == 1800.0
    path.write_text(yaml.safe_dump({"defaults": {"timeouts": {"total": "2m"}},
                                    "routes": [{"name": "chat", "path": "/v1/chat/completions",
                                                "timeouts": {"total": "10s"}}]}))
    assert duration_buckets(cfg.load(str(path)))[-1] == 120.0  # the default route counts too
    assert duration_buckets(cfg.load(None)) == DEFAULT_BUCKETS


def test_a_store_renders_its_own_bounds():
    store = MetricsStore(ROUTES, buckets=bucket_bounds(2.0))
    drive(MetricsObserver(store), "chat", finished("chat", duration=1.5))
    drive(MetricsObserver(store), "chat", finished("chat", duration=3.0))
    got = exposition(StoreCollector(store))
    les = sorted(float(dict(labels)["le"]) for name, labels in got if name == DURATION + "_bucket"
                 and ("outcome", "ok") in labels)
    assert les == [*bucket_bounds(2.0), float("inf")]
    v = getter(got)
    assert v(DURATION + "_bucket", outcome="ok", le="2.5") == 1
    assert v(DURATION + "_bucket", outcome="ok", le="+Inf") == 2


def test_bad_bounds_are_refused():
    for bad in ((), (1.0, 1.0), (2.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError):
            MetricsStore(ROUTES, buckets=bad)


# ---- --workers: the supervisor sums the workers' files ------------------------------------------

def test_worker_files_sum_counters_of_all_and_gauges_of_the_live(tmp_path, monkeypatch):
    for pid, (remaining_at, breaker) in zip((101, 102, 103), ((10.0, 0), (20.0, 1), (30.0, 2))):
        at_pid(monkeypatch, pid)
        store = MetricsStore(ROUTES, str(tmp_path))
        observe = MetricsObserver(store, now=lambda t=remaining_at: t)
        drive(observe, "chat", AttemptFinished("chat", 1, Category.OK, 200, 0.1, remaining_requests=int(remaining_at)),
              finished("chat", attempts=2))
        drive(observe, "chat", finished("chat", 502, Category.CONNECT, duration=0.003))
        observe(RequestStarted("chat"))  # one in flight each
        observe(BreakerChange("chat", ("chat",), BreakerState.CLOSED, BreakerState(breaker)))
    (tmp_path / "junk.metrics").write_bytes(b"not ours")  # ignored, as are other names
    (tmp_path / "notes.txt").write_text("x")
    v = getter(exposition(DirectoryCollector(str(tmp_path), lambda: (101, 102))))  # 103 died

    assert v("openai_proxy_requests_total", status_class="2xx") == 3  # the dead worker's count stays
    assert v("openai_proxy_retry_successes_total") == 3
    assert v(DURATION + "_count", outcome="ok") == 3
    assert v(DURATION + "_count", outcome="error") == 3
    assert v(DURATION + "_bucket", outcome="error", le="0.005") == 3
    assert v(DURATION + "_bucket", outcome="ok", le="0.25") == 3
    assert v(DURATION + "_bucket", outcome="ok", le="0.1") == 0
    assert v(DURATION + "_sum", outcome="ok") == pytest.approx(0.6)
    assert v("openai_proxy_breaker_transitions_total", to="half_open") == 1
    assert v("openai_proxy_breaker_transitions_total", to="open") == 1  # the dead worker's transition happened
    assert v("openai_proxy_in_flight_requests") == 2  # the dead worker's in-flight request is gone
    assert v("openai_proxy_breaker_state") == 1  # the worst of the live workers
    assert v("openai_proxy_ratelimit_remaining_requests") == 20  # the newest reading of a live worker


def test_a_worker_with_another_route_list_is_summed_by_name(tmp_path, monkeypatch):
    at_pid(monkeypatch, 1)
    drive(MetricsObserver(MetricsStore(["a", "b"], str(tmp_path))), "b", finished("b"))
    at_pid(monkeypatch, 2)
    drive(MetricsObserver(MetricsStore(["b", "c"], str(tmp_path))), "b", finished("b"))
    snaps = [read_snapshot(str(tmp_path / f"{pid}.metrics")) for pid in (1, 2)]
    assert all(s is not None for s in snaps)
    combined = combine((s, True) for s in snaps if s is not None)
    assert set(combined.routes) == {"a", "b", "c"}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in families(combined) for s in m.samples}
    assert got[("openai_proxy_requests_total", (("route", "b"), ("status_class", "2xx")))] == 2


def test_a_worker_file_with_another_ladder_is_rendered_with_the_shared_bounds(tmp_path, monkeypatch):
    """A worker restarted with another config (total 1 minute instead of 15): the files disagree on
    their bounds. Every count stays exact; the bounds only one file has are left out."""
    at_pid(monkeypatch, 1)
    long = MetricsObserver(MetricsStore(ROUTES, str(tmp_path)))  # bounds up to 900 s
    for d in (0.004, 45.0, 100.0, 1000.0):
        drive(long, "chat", finished("chat", duration=d))
    at_pid(monkeypatch, 2)
    short = MetricsObserver(MetricsStore(ROUTES, str(tmp_path), buckets=bucket_bounds(60.0)))
    for d in (0.004, 45.0, 200.0):  # 200 s: +Inf in this file
        drive(short, "chat", finished("chat", 500, Category.SERVER, duration=d))
        drive(short, "chat", finished("chat", duration=d))
    assert read_snapshot(str(tmp_path / "1.metrics")).bounds == DEFAULT_BUCKETS  # type: ignore[union-attr]
    got = exposition(DirectoryCollector(str(tmp_path), lambda: (1, 2)))
    v = getter(got)
    les = {dict(labels)["le"] for name, labels in got if name == DURATION + "_bucket"}
    assert les == {"0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "20.0",
                   "30.0", "60.0", "+Inf"}
    assert [v(DURATION + "_bucket", outcome="ok", le=le) for le in ("0.005", "30.0", "60.0", "+Inf")] == [2, 2, 4, 7]
    assert v(DURATION + "_count", outcome="ok") == 7
    assert v(DURATION + "_sum", outcome="ok") == pytest.approx(0.004 + 45 + 100 + 1000 + 0.004 + 45 + 200)
    assert [v(DURATION + "_bucket", outcome="error", le=le) for le in ("0.005", "60.0", "+Inf")] == [1, 2, 3]
    assert v("openai_proxy_requests_total", status_class="2xx") == 7
    # the old worker's file gone (the supervisor restarted): the long ladder is back
    os.unlink(tmp_path / "2.metrics")
    got = exposition(DirectoryCollector(str(tmp_path), lambda: (1,)))
    assert getter(got)(DURATION + "_bucket", outcome="ok", le="900.0") == 3


def test_a_file_from_an_older_format_or_torn_is_skipped(tmp_path, monkeypatch):
    at_pid(monkeypatch, 7)
    store = MetricsStore(ROUTES, str(tmp_path))
    drive(MetricsObserver(store), "chat", finished("chat"))
    data = (tmp_path / "7.metrics").read_bytes()
    (tmp_path / "8.metrics").write_bytes(b"ORPM1\x00\x00\x00" + data[8:])  # the format before bounds
    (tmp_path / "9.metrics").write_bytes(data[:len(data) // 2])  # being written
    assert read_snapshot(str(tmp_path / "8.metrics")) is None
    assert read_snapshot(str(tmp_path / "9.metrics")) is None
    v = getter(exposition(DirectoryCollector(str(tmp_path), lambda: (7, 8, 9))))
    assert v("openai_proxy_requests_total", status_class="2xx") == 1


# ---- process metrics -----------------------------------------------------------------------------

def test_single_process_has_the_standard_process_metrics():
    got = exposition(_ProcessOnly(process_collectors()))
    assert got[("process_cpu_seconds_total", ())] > 0
    assert got[("process_resident_memory_bytes", ())] > 0
    assert any(name == "python_info" for name, _ in got)


class _ProcessOnly:
    def __init__(self, collectors) -> None:
        self._c = collectors

    def collect(self):
        for c in self._c:
            yield from c.collect()


def _fake_proc(root: Path, pid: str, utime_ticks: int, rss_pages: int, fds: int) -> None:
    d = root / pid
    (d / "fd").mkdir(parents=True, exist_ok=True)
    for f in (d / "fd").iterdir():
        f.unlink()
    fields = ["S"] + ["0"] * 40
    fields[11], fields[12] = str(utime_ticks), "0"  # utime, stime (ticks)
    fields[19], fields[20], fields[21] = "100", "1000", str(rss_pages)  # start time, vsize, rss (pages)
    (d / "stat").write_text(f"{pid} (python) " + " ".join(fields))
    (d / "limits").write_text("Max open files            1024                 4096                 files\n")
    for i in range(fds):
        (d / "fd" / str(i)).write_text("")


class _Usage:
    def __init__(self, cpu: float) -> None:
        self.ru_utime, self.ru_stime = cpu, 0.0


def test_supervisor_process_metrics_add_up_the_workers(tmp_path, monkeypatch):
    ticks, page = os.sysconf("SC_CLK_TCK"), ProcessCollector(registry=None)._pagesize
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    _fake_proc(tmp_path, "self", utime_ticks=ticks * 1, rss_pages=10, fds=3)
    _fake_proc(tmp_path, "11", utime_ticks=ticks * 5, rss_pages=100, fds=7)
    _fake_proc(tmp_path, "12", utime_ticks=ticks * 6, rss_pages=200, fds=8)
    reaped = _Usage(2.0)  # workers that exited before: their CPU stays counted
    monkeypatch.setattr(process_metrics.resource, "getrusage", lambda who: reaped)
    live = [11, 12]
    tree = ProcessTreeCollector(lambda: tuple(live), proc=str(tmp_path))

    def scrape() -> dict[str, float]:
        return {name: value for (name, _), value in exposition(tree).items()}

    got = scrape()
    assert got["process_cpu_seconds_total"] == pytest.approx(1 + 5 + 6 + 2)
    assert got["process_resident_memory_bytes"] == 310 * page
    assert got["process_open_fds"] == 18
    assert got["process_max_fds"] == 1024  # the supervisor's
    assert got["process_start_time_seconds"] == pytest.approx(1700000000 + 100 / ticks)
    # worker 12 exits; read between its reaping and getrusage seeing it, it is missing once:
    live.remove(12)
    assert scrape()["process_cpu_seconds_total"] == pytest.approx(14)  # the counter does not go back
    reaped.ru_utime = 2.0 + 6.0  # reaped: its CPU moved to RUSAGE_CHILDREN
    _fake_proc(tmp_path, "13", utime_ticks=ticks * 1, rss_pages=50, fds=1)  # its replacement
    live.append(13)
    got = scrape()
    assert got["process_cpu_seconds_total"] == pytest.approx(1 + 5 + 8 + 1)
    assert got["process_resident_memory_bytes"] == 160 * page


def test_supervisor_process_metrics_without_proc_are_absent(tmp_path):
    assert list(ProcessTreeCollector(lambda: (), proc=str(tmp_path / "nothing")).collect()) == []


def test_attempts_and_breakers_are_counted_per_upstream_of_a_route(tmp_path, monkeypatch):
    """A failover route's attempts and breakers by upstream, in one process and summed over worker
    files by (route, upstream) key, whatever order each worker's store lists its pairs in."""
    orders = ([("chat", "primary"), ("chat", "secondary")], [("chat", "secondary"), ("chat", "primary")])
    for pid, pairs in zip((1, 2), orders):
        at_pid(monkeypatch, pid)
        store = MetricsStore(["chat", "default"], str(tmp_path), pairs=[*pairs, ("default", "default")])
        observe = MetricsObserver(store)
        drive(observe, "chat", AttemptFinished("chat", 1, Category.SERVER, 503, 0.1, upstream="primary"),
              AttemptFinished("chat", 2, Category.OK, 200, 0.1, upstream="secondary"), finished("chat", attempts=2))
        observe(BreakerChange("chat", ("chat",), BreakerState.CLOSED, BreakerState.OPEN, "primary"))
    got = exposition(DirectoryCollector(str(tmp_path), lambda: (1, 2)))
    primary, secondary = getter(got, upstream="primary"), getter(got, upstream="secondary")
    assert primary("openai_proxy_attempts_total", category="server") == 2
    assert primary("openai_proxy_attempts_total", category="ok") == 0
    assert secondary("openai_proxy_attempts_total", category="ok") == 2
    assert primary("openai_proxy_breaker_state") == 2 and secondary("openai_proxy_breaker_state") == 0
    assert primary("openai_proxy_breaker_transitions_total", to="open") == 2
    assert secondary("openai_proxy_breaker_transitions_total", to="open") == 0
    assert getter(got, "default")("openai_proxy_breaker_state") == 0
