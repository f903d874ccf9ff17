"""--workers N: a supervisor and N worker processes sharing the traffic port (SO_REUSEPORT).

The supervisor serves the admin listener (/metrics sums the workers' metric files) and restarts a
worker that dies. Breaker state and the retry budget stay per worker: with N workers a breaker opens
on `failure_threshold` failures seen by one of them, and the budget allows N x `min_per_second`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import signal
import socket
import tempfile
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import CollectorRegistry

from .config import ProxyConfig
from .exposition import DirectoryCollector
from .logs import configure, get_logger
from .process_metrics import process_collectors
from .reload import pinned
from .server import StartupError, run_loop, serve_traffic_only

_START_TIMEOUT = 30.0


def worker_main(config: ProxyConfig, port: int, conn: Connection, metrics_dir: str) -> None:
    """A worker process (spawn target). It runs the supervisor's checked config (pickled by spawn), never
    the command line or the environment again, so a config file changed since cannot reach it."""
    configure(config.log.level, config.log.format)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's: it sends the checked config
    run_loop(serve_traffic_only(config, port, conn, metrics_dir))


class Supervisor:
    """The worker processes as server.serve's traffic listener (the same setup, listen, cleanup)."""

    def __init__(self, config: ProxyConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.registry = registry
        self.log = get_logger()
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, BaseProcess] = {}  # slot -> process
        self.channels: dict[int, Connection] = {}  # slot -> the pipe to its worker: readiness in, configs out
        self.reloaded: ProxyConfig | None = None  # the last config reloaded, as the file says it (not pinned)
        self.spawned_with: dict[int, ProxyConfig | None] = {}  # slot -> self.reloaded when its worker started
        self.live: set[int] = set()  # pids of the workers alive now (their gauges count in /metrics)
        self.port = 0
        self.metrics_dir = ""
        self.stopping = False

    async def setup(self) -> None:
        self.metrics_dir = tempfile.mkdtemp(prefix="openai-proxy-metrics-")
        # read from the scrape's thread: tuple() copies the set in one step
        self.registry.register(DirectoryCollector(self.metrics_dir, lambda: tuple(self.live)))
        for collector in process_collectors(lambda: tuple(self.live)):  # process_*: supervisor + workers
            self.registry.register(collector)

    async def listen(self, host: str, port: int, **options: Any) -> None:
        """Start every worker on one port (a free one chosen here for port 0) and wait until each listens."""
        if not port:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
        self.port = port
        errors = await asyncio.gather(*(self._ready(slot, *self._spawn(slot)) for slot in range(self.config.workers)))
        for error in filter(None, errors):
            raise StartupError(error)

    @property
    def addresses(self) -> list[Any]:
        return [(self.config.listen.host, self.port)] if self.port else []

    def pids(self) -> list[int | None]:
        return [p.pid for p in self.workers.values()]

    def reload(self, config: ProxyConfig) -> None:
        """Every worker serves `config` from its next request on (each reports what waits for a
        restart); one started later gets it too, with this process's listener settings."""
        self.config = pinned(config, self.config)
        self.reloaded = config
        for slot, conn in list(self.channels.items()):
            try:
                conn.send(config)
            except OSError:  # it died: _exited restarts it with self.config
                self.log.warning("worker_reload_missed", slot=slot)

    def _spawn(self, slot: int) -> tuple[BaseProcess, Connection]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker_main, args=(self.config, self.port, child, self.metrics_dir),
                                name=f"worker-{slot}")
        proc.start()
        child.close()
        self.workers[slot] = proc
        self.spawned_with[slot] = self.reloaded
        self.live.add(proc.pid or 0)
        return proc, parent

    async def _ready(self, slot: int, proc: BaseProcess, conn: Connection) -> str | None:
        """Wait until the worker listens, then watch it to restart it when it dies; else why it did not start."""
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(None, conn.poll, _START_TIMEOUT)
            error = conn.recv() if ok else f"worker {proc.pid} did not start within {_START_TIMEOUT:.0f}s"
        except EOFError:
            error = f"worker {proc.pid} exited while starting (exit code {proc.exitcode})"
        if error is None:
            self.channels[slot] = conn
            if self.reloaded is not self.spawned_with[slot]:  # a reload came while it started: it has the one before
                conn.send(self.reloaded)
            loop.add_reader(proc.sentinel, self._exited, slot, proc)
        else:
            conn.close()
        return error

    def _exited(self, slot: int, proc: BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(0)
        self.live.discard(proc.pid or 0)
        if (conn := self.channels.pop(slot, None)) is not None:
            conn.close()
        if not self.stopping:
            self.log.error("worker_exited", pid=proc.pid, exitcode=proc.exitcode, restarting=True)
            asyncio.ensure_future(self._restart(slot, *self._spawn(slot)))

    async def _restart(self, slot: int, proc: BaseProcess, conn: Connection) -> None:
        error = await self._ready(slot, proc, conn)
        if error is not None and not self.stopping:
            self.log.error("worker_restart_failed", reason=error)

    async def cleanup(self) -> None:
        """SIGTERM to each worker (each drains its own requests), SIGKILL to any still running after the grace."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace + 5.0
        for proc in self.workers.values():
            loop.remove_reader(proc.sentinel)
            if proc.is_alive():
                proc.terminate()
        try:
            for proc in self.workers.values():
                await loop.run_in_executor(None, proc.join, max(deadline - loop.time(), 0.0))
                self.live.discard(proc.pid or 0)
        finally:
            for proc in self.workers.values():
                if proc.is_alive():
                    self.log.error("worker_killed", pid=proc.pid)
                    proc.kill()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
