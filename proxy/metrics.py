"""Prometheus metrics: names, types and labels exactly as design.md's contract table.

An injected registry (no module-level globals), label values only from fixed sets (route names
from the config, categories, status classes, stop reasons), and every label child created once
at startup, so a request costs dictionary lookups and increments, never a label resolution.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from .classify import Category
from .events import AttemptFinished, BreakerChange, Event, RequestFinished, RequestStarted, RetryScheduled
from .retry import StopReason

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "aborted")
_STATUS_CLASS = ("", "", "2xx", "3xx", "4xx", "5xx")  # by status // 100
# LLM latencies: tens of milliseconds (a cached embedding) to ten minutes (a long reasoning stream)
BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ATTEMPT_CATEGORIES = tuple(c for c in Category if c is not Category.CIRCUIT_OPEN)
_ERROR_CATEGORIES = tuple(c for c in Category if c is not Category.OK)


class Metrics:
    """The metric families, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # every counter child would add a *_created series: with routes x categories that more than
        # doubles a scrape for a value no dashboard reads (process-wide switch, idempotent)
        disable_created_metrics()
        p = "openai_proxy_"
        self.requests = Counter(p + "requests_total", "Client requests, by route and status class "
                                "(aborted: the connection was cut after the commit).", ["route", "status_class"],
                                registry=registry)
        self.errors = Counter(p + "errors_total", "Client requests whose final outcome was a failure, by category.",
                              ["route", "category"], registry=registry)
        self.attempts = Counter(p + "attempts_total", "Upstream attempts, by category (ok for a success).",
                                ["route", "category"], registry=registry)
        self.retries = Counter(p + "retries_total", "Retries, by the category of the attempt retried.",
                               ["route", "category"], registry=registry)
        self.retry_stops = Counter(p + "retry_stops_total", "Why retrying stopped after a failed attempt.",
                                   ["route", "reason"], registry=registry)
        # multiprocess_mode only matters with --workers (prometheus-client multiprocess mode): the
        # worst breaker of any worker, the sum of in-flight requests, the latest rate-limit reading
        self.breaker_state = Gauge(p + "breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                                   ["route"], registry=registry, multiprocess_mode="livemax")
        self.duration = Histogram(p + "request_duration_seconds", "Client request duration, until the last byte.",
                                  ["route"], buckets=BUCKETS, registry=registry)
        self.in_flight = Gauge(p + "in_flight_requests", "Client requests in progress.", ["route"], registry=registry,
                               multiprocess_mode="livesum")
        self.remaining_requests = Gauge(p + "ratelimit_remaining_requests",
                                        "The upstream's x-ratelimit-remaining-requests, last seen.", ["route"],
                                        registry=registry, multiprocess_mode="livemostrecent")
        self.remaining_tokens = Gauge(p + "ratelimit_remaining_tokens",
                                      "The upstream's x-ratelimit-remaining-tokens, last seen.", ["route"],
                                      registry=registry, multiprocess_mode="livemostrecent")


class _RouteChildren:
    """The label children of one route, resolved once."""

    __slots__ = ("requests", "errors", "attempts", "retries", "stops", "breaker", "duration", "in_flight",
                 "remaining_requests", "remaining_tokens")

    def __init__(self, m: Metrics, route: str) -> None:
        self.requests = {c: m.requests.labels(route, c) for c in STATUS_CLASSES}
        self.errors = {c: m.errors.labels(route, c.value) for c in _ERROR_CATEGORIES}
        self.attempts = {c: m.attempts.labels(route, c.value) for c in _ATTEMPT_CATEGORIES}
        self.retries = {c: m.retries.labels(route, c.value) for c in _ATTEMPT_CATEGORIES}
        self.stops = {r.value: m.retry_stops.labels(route, r.value) for r in StopReason}
        self.breaker = m.breaker_state.labels(route)
        self.duration = m.duration.labels(route)
        self.in_flight = m.in_flight.labels(route)
        self.remaining_requests = m.remaining_requests.labels(route)
        self.remaining_tokens = m.remaining_tokens.labels(route)


class MetricsObserver:
    """Events -> metric updates. Observes only."""

    __slots__ = ("_routes",)

    def __init__(self, metrics: Metrics, routes: Iterable[str]) -> None:
        self._routes = {name: _RouteChildren(metrics, name) for name in routes}
        for children in self._routes.values():
            children.breaker.set(0)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RequestFinished):
            r = self._routes[event.route]
            status = event.status
            r.requests["aborted" if status is None or event.aborted or not 200 <= status < 600
                       else _STATUS_CLASS[status // 100]].inc()
            if event.category is not Category.OK:
                r.errors[event.category].inc()
            if event.stop_reason is not None:
                r.stops[event.stop_reason].inc()
            r.duration.observe(event.duration_s)
            r.in_flight.dec()
        elif isinstance(event, RequestStarted):
            self._routes[event.route].in_flight.inc()
        elif isinstance(event, AttemptFinished):
            r = self._routes[event.route]
            r.attempts[event.category].inc()
            if event.remaining_requests is not None:
                r.remaining_requests.set(event.remaining_requests)
            if event.remaining_tokens is not None:
                r.remaining_tokens.set(event.remaining_tokens)
        elif isinstance(event, RetryScheduled):
            self._routes[event.route].retries[event.category].inc()
        elif isinstance(event, BreakerChange):
            for route in event.routes:
                self._routes[route].breaker.set(int(event.new))
