"""The standard process_* and python_info series for the admin /metrics, and under --workers the
process_* of the whole proxy (supervisor and workers together), the way a pod's CPU and memory are."""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric


def process_collectors(worker_pids: Callable[[], Iterable[int]] | None = None) -> list[Any]:
    """prometheus-client's process and platform collectors; for the supervisor of --workers
    (`worker_pids` given) a ProcessTreeCollector instead of the process one."""
    proc = ProcessCollector(registry=None) if worker_pids is None else ProcessTreeCollector(worker_pids)
    return [proc, PlatformCollector(registry=None)]


class ProcessTreeCollector:
    """process_* of the supervisor and its live workers: CPU, memory and open fds summed, start
    time and max fds the supervisor's. CPU adds the workers that exited (RUSAGE_CHILDREN), so a
    restart does not make it go back, and never falls below the previous scrape's value."""

    _SUMMED = ("process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
               "process_open_fds")

    def __init__(self, worker_pids: Callable[[], Iterable[int]], proc: str = "/proc") -> None:
        self._pids = worker_pids
        self._proc = proc
        self._lock = threading.Lock()  # scrapes run in threads (health.metrics)
        self._cpu = 0.0

    def collect(self) -> list[Metric]:
        # the exited workers before the live ones: a worker reaped in between is missed once (the
        # floor hides that), never counted twice
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own, *workers = (ProcessCollector(pid=lambda p=pid: p, proc=self._proc, registry=None).collect()
                         for pid in ("self", *self._pids()))
        if not own:
            return []  # no /proc here (macOS): nothing, as prometheus-client's own collector
        totals = {metric.name: metric.samples[0].value for metric in own}
        totals["process_cpu_seconds"] = totals.get("process_cpu_seconds", 0.0) + children.ru_utime + children.ru_stime
        for metric in chain.from_iterable(workers):
            if metric.name in self._SUMMED and metric.name in totals:
                totals[metric.name] += metric.samples[0].value
        with self._lock:
            self._cpu = totals["process_cpu_seconds"] = max(self._cpu, totals["process_cpu_seconds"])
        family = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        return [family[metric.type](metric.name, metric.documentation, value=totals[metric.name]) for metric in own]
