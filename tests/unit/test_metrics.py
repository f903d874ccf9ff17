"""The metric store: events -> slots -> the contract's families, and the sum over worker files."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from proxy.classify import Category
from proxy.events import AttemptFinished, BreakerChange, BreakerState, RequestFinished, RequestStarted, RetryScheduled
from proxy.metrics import (BUCKETS, FAMILIES, DirectoryCollector, MetricsObserver, MetricsStore, StoreCollector,
                           combine, families, read_snapshot)

ROUTES = ["chat", "files", "default"]


def finished(route: str, status: int | None = 200, category: Category = Category.OK, duration: float = 0.2,
             stop: str | None = None, aborted: bool = False) -> RequestFinished:
    return RequestFinished(route, "POST", "/v1/x", status, category, 1, stop, aborted, duration, 0.01, 10, 20, True,
                           None, None, None)


def samples(collector) -> dict[tuple, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples}


def drive(observe: MetricsObserver, route: str, *events) -> None:
    observe(RequestStarted(route))
    for e in events:
        observe(e)


def test_counts_buckets_and_gauges_from_events():
    store = MetricsStore(ROUTES)
    observe = MetricsObserver(store, now=lambda: 100.0)
    drive(observe, "chat", AttemptFinished("chat", 1, Category.SERVER, 503, 0.1),
          RetryScheduled("chat", 1, Category.SERVER, 503, 0.01, "backoff", "backoff"),
          AttemptFinished("chat", 2, Category.OK, 200, 0.1, remaining_requests=59, remaining_tokens=1000),
          finished("chat", duration=0.05))
    drive(observe, "chat", finished("chat", 503, Category.SERVER, duration=700.0, stop="limit"))
    drive(observe, "chat", finished("chat", None, aborted=True))
    observe(RequestStarted("chat"))  # still in flight
    observe(BreakerChange("chat", ("chat",), BreakerState.CLOSED, BreakerState.OPEN))
    got = samples(StoreCollector(store))

    def v(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted({"route": "chat", **labels}.items())))]

    assert v("openai_proxy_requests_total", status_class="2xx") == 1
    assert v("openai_proxy_requests_total", status_class="5xx") == 1
    assert v("openai_proxy_requests_total", status_class="aborted") == 1
    assert v("openai_proxy_errors_total", category="server") == 1
    assert v("openai_proxy_errors_total", category="quota_exceeded") == 0  # zeros exist once the route is used
    assert v("openai_proxy_attempts_total", category="server") == 1
    assert v("openai_proxy_attempts_total", category="ok") == 1
    assert v("openai_proxy_retries_total", category="server") == 1
    assert v("openai_proxy_retry_stops_total", reason="limit") == 1
    assert v("openai_proxy_in_flight_requests") == 1
    assert v("openai_proxy_breaker_state") == 2
    assert v("openai_proxy_ratelimit_remaining_requests") == 59
    assert v("openai_proxy_ratelimit_remaining_tokens") == 1000
    # le is inclusive: 0.05 lands in the 0.05 bucket; 700 s only in +Inf
    assert v("openai_proxy_request_duration_seconds_bucket", le="0.025") == 0
    assert v("openai_proxy_request_duration_seconds_bucket", le="0.05") == 1
    assert v("openai_proxy_request_duration_seconds_bucket", le="600.0") == 2
    assert v("openai_proxy_request_duration_seconds_bucket", le="+Inf") == 3
    assert v("openai_proxy_request_duration_seconds_count") == 3
    assert abs(v("openai_proxy_request_duration_seconds_sum") - 700.25) < 1e-9


def test_an_unused_route_shows_only_its_breaker_and_in_flight_gauges():
    store = MetricsStore(ROUTES)
    drive(MetricsObserver(store), "chat", finished("chat"))
    got = samples(StoreCollector(store))
    files = {name for name, labels in got if ("route", "files") in labels}
    assert files == {"openai_proxy_breaker_state", "openai_proxy_in_flight_requests"}
    text = generate_latest(_registry(StoreCollector(store))).decode()
    for fam in FAMILIES:
        assert f"# TYPE {fam.name.removesuffix('_total')}" in text or f"# TYPE {fam.name}" in text
    assert "_created" not in text
    # no rate-limit reading yet: no gauge rather than a misleading 0
    assert "openai_proxy_ratelimit_remaining_requests{" not in text


def _registry(collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_worker_files_sum_counters_of_all_and_gauges_of_the_live(tmp_path, monkeypatch):
    import os
    stores = []
    for pid, (remaining_at, breaker) in zip((101, 102, 103), ((10.0, 0), (20.0, 1), (30.0, 2))):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        store = MetricsStore(ROUTES, str(tmp_path))
        observe = MetricsObserver(store, now=lambda t=remaining_at: t)
        drive(observe, "chat", AttemptFinished("chat", 1, Category.OK, 200, 0.1, remaining_requests=int(remaining_at)),
              finished("chat"))
        observe(RequestStarted("chat"))  # one in flight each
        observe(BreakerChange("chat", ("chat",), BreakerState.CLOSED, BreakerState(breaker)))
        stores.append(store)
    (tmp_path / "junk.metrics").write_bytes(b"not ours")  # ignored, as are other names
    (tmp_path / "notes.txt").write_text("x")
    got = samples(DirectoryCollector(str(tmp_path), lambda: (101, 102)))  # 103 died

    def v(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted({"route": "chat", **labels}.items())))]

    assert v("openai_proxy_requests_total", status_class="2xx") == 3  # the dead worker's count stays
    assert v("openai_proxy_request_duration_seconds_count") == 3
    assert v("openai_proxy_in_flight_requests") == 2  # the dead worker's in-flight request is gone
    assert v("openai_proxy_breaker_state") == 1  # the worst of the live workers
    assert v("openai_proxy_ratelimit_remaining_requests") == 20  # the newest reading of a live worker


def test_a_worker_with_another_route_list_is_summed_by_name(tmp_path, monkeypatch):
    import os
    monkeypatch.setattr(os, "getpid", lambda: 1)
    drive(MetricsObserver(MetricsStore(["a", "b"], str(tmp_path))), "b", finished("b"))
    monkeypatch.setattr(os, "getpid", lambda: 2)
    drive(MetricsObserver(MetricsStore(["b", "c"], str(tmp_path))), "b", finished("b"))
    snaps = [read_snapshot(str(tmp_path / f"{pid}.metrics")) for pid in (1, 2)]
    assert all(s is not None for s in snaps)
    combined = combine((s, True) for s in snaps if s is not None)
    assert set(combined) == {"a", "b", "c"}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in families(combined) for s in m.samples}
    assert got[("openai_proxy_requests_total", (("route", "b"), ("status_class", "2xx")))] == 2


def test_bucket_bounds_are_the_documented_ones():
    assert BUCKETS == (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
