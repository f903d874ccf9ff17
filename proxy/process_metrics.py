"""The standard process_* and python_info series for the admin /metrics, and under --workers the
process_* of the whole proxy (supervisor and workers together), the way a pod's CPU and memory are."""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric


def process_collectors(worker_pids: Callable[[], Iterable[int]] | None = None) -> list[Any]:
    """The standard process_* and python_info collectors for the admin registry.

    Single process: prometheus-client's own. Supervisor of --workers (`worker_pids` given): the
    process_* series describe the whole proxy, see `ProcessTreeCollector`."""
    proc = ProcessCollector(registry=None) if worker_pids is None else ProcessTreeCollector(worker_pids)
    return [proc, PlatformCollector(registry=None)]


class ProcessTreeCollector:
    """process_* for the supervisor and its workers together, the way a pod's CPU and memory are:

    - process_cpu_seconds_total: the supervisor, its live workers (from /proc), and every worker
      that has exited and been reaped (getrusage(RUSAGE_CHILDREN)), so a worker's restart does not
      make the counter go back. Never lower than at the previous scrape (a worker reaped between
      the two readings would otherwise be missed once).
    - resident/virtual memory and open fds: summed over the supervisor and the live workers.
    - start_time_seconds and max_fds: the supervisor's.
    """

    _SUMMED = ("process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
               "process_open_fds")

    def __init__(self, worker_pids: Callable[[], Iterable[int]], proc: str = "/proc") -> None:
        self._pids = worker_pids
        self._proc = proc
        self._readers: dict[int | str, ProcessCollector] = {}
        self._lock = threading.Lock()  # scrapes run in threads (health.metrics)
        self._cpu = 0.0

    def _reader(self, pid: int | str) -> ProcessCollector:
        reader = self._readers.get(pid)
        if reader is None:
            reader = ProcessCollector(pid=lambda: pid, proc=self._proc, registry=None)
        return reader

    def collect(self) -> list[Metric]:
        with self._lock:
            return self._collect()

    def _collect(self) -> list[Metric]:
        # first the reaped workers, then the live ones: a worker reaped in between is missed (and
        # the floor below hides that), never counted twice
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        readers = {pid: self._reader(pid) for pid in ("self", *self._pids())}
        self._readers = readers  # the exited workers' readers go
        own = {m.name: m for m in readers["self"].collect()}
        if not own:
            return []  # no /proc here (macOS): nothing, as prometheus-client's own collector
        totals = {name: own[name].samples[0].value for name in self._SUMMED if name in own}
        totals["process_cpu_seconds"] = totals.get("process_cpu_seconds", 0.0) + children.ru_utime + children.ru_stime
        for pid, reader in readers.items():
            if pid == "self":
                continue
            for metric in reader.collect():
                if metric.name in totals:
                    totals[metric.name] += metric.samples[0].value
        self._cpu = max(self._cpu, totals["process_cpu_seconds"])
        totals["process_cpu_seconds"] = self._cpu
        out: list[Metric] = []
        for name, metric in own.items():
            kind = CounterMetricFamily if metric.type == "counter" else GaugeMetricFamily
            out.append(kind(name, metric.documentation, value=totals.get(name, metric.samples[0].value)))
        return out
