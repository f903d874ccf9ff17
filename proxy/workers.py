"""--workers N: one supervisor and N worker processes sharing the traffic port (SO_REUSEPORT).

The kernel spreads connections over the workers. Each worker is a whole proxy without the admin
listener; the supervisor owns the admin listener: /metrics sums every worker (each worker keeps
its metric values in a memory-mapped file in a private directory: proxy.metrics; the process_*
series add up the supervisor and its workers), /readyz is ready once every worker listens and
turns 503 on SIGTERM. The supervisor forwards SIGTERM/SIGINT, waits for the workers to drain,
restarts a worker that dies, and removes the metrics directory on exit.

Per worker, not shared: circuit breaker state and the retry budget. With N workers a breaker
opens after `failure_threshold` consecutive failures seen by one worker, and the budget allows
N x `min_per_second`; both stay bounded and each worker protects the upstream on its own.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import signal
import socket
import tempfile
from multiprocessing.connection import Connection

from aiohttp import web

from .config import ProxyConfig, effective
from .health import ServerState, create_admin_app
from .logs import WRITER, configure, get_logger
from .exposition import DirectoryCollector
from .process_metrics import process_collectors
from .server import StartupError, run_loop, serve_traffic_only

_START_TIMEOUT = 30.0


def _pick_port(host: str) -> int:
    """Port 0 means "any free port", but every worker must bind the same one: choose it here."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_main(config: ProxyConfig, port: int, conn: Connection, metrics_dir: str) -> None:
    """A worker process (multiprocessing spawn target): the proxy without the admin listener.

    It gets the supervisor's config object (pickled by spawn), never the command line or the
    environment again: every worker runs the config that was checked, even if the file changed."""
    configure(config.log.level, config.log.format)
    try:
        run_loop(serve_traffic_only(config, port, conn, metrics_dir))
    except KeyboardInterrupt:
        pass


class Supervisor:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.log = get_logger()
        self.state = ServerState()
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, multiprocessing.process.BaseProcess] = {}  # slot -> process
        self.live: set[int] = set()  # pids of the workers alive now (their gauges count in /metrics)
        self.port = 0
        self.metrics_dir = ""
        self.stopping = False

    def _spawn(self, slot: int) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=worker_main, args=(self.config, self.port, child, self.metrics_dir),
                                name=f"worker-{slot}", daemon=False)
        proc.start()
        child.close()
        self.workers[slot] = proc
        assert proc.pid is not None
        self.live.add(proc.pid)
        return proc, parent

    async def _ready(self, proc: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, conn.poll, _START_TIMEOUT)
        try:
            msg = conn.recv() if ok else ("error", f"worker {proc.pid} did not start within {_START_TIMEOUT:.0f}s")
        except EOFError:
            msg = ("error", f"worker {proc.pid} exited while starting (exit code {proc.exitcode})")
        finally:
            conn.close()
        if msg[0] != "ok":
            raise StartupError(msg[1])

    async def run(self, stop: asyncio.Event) -> None:
        from prometheus_client import CollectorRegistry

        cfg = self.config
        self.metrics_dir = tempfile.mkdtemp(prefix="openai-proxy-metrics-")
        registry = CollectorRegistry()
        # read from the scrape's thread: tuple() copies the set in one step
        registry.register(DirectoryCollector(self.metrics_dir, lambda: tuple(self.live)))
        for collector in process_collectors(lambda: tuple(self.live)):  # process_*: supervisor + workers
            registry.register(collector)
        admin = web.AppRunner(create_admin_app(self.state, registry), shutdown_timeout=1.0, access_log=None)
        await admin.setup()
        loop = asyncio.get_running_loop()
        try:
            try:
                await web.TCPSite(admin, cfg.admin.host, cfg.admin.port).start()
                self.port = cfg.listen.port or _pick_port(cfg.listen.host)
            except OSError as exc:
                raise StartupError(f"cannot listen on {cfg.admin.host}:{cfg.admin.port}: {exc.strerror or exc}") \
                    from None
            started = [self._spawn(slot) for slot in range(cfg.workers)]
            await asyncio.gather(*(self._ready(p, c) for p, c in started))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            for slot, proc in self.workers.items():
                self._watch(slot, proc)
            self.state.ready = True
            self.log.info("startup", config=effective(cfg), config_source=cfg.source, workers=cfg.workers,
                          pids=[p.pid for p in self.workers.values()])
            self.log.info("listening", traffic=[f"{cfg.listen.host}:{self.port}"],
                          admin=[f"{a[0]}:{a[1]}" for a in admin.addresses if isinstance(a, tuple)],
                          upstream=cfg.upstream.url, workers=cfg.workers)
            await stop.wait()
            self.state.draining = True
            self.stopping = True
            self.log.info("draining", grace_s=cfg.shutdown_grace, workers=cfg.workers)
            await self._stop_workers()
        finally:
            self.stopping = True
            for proc in self.workers.values():
                if proc.is_alive():
                    proc.kill()
            await admin.cleanup()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.log.info("stopped")
        WRITER.flush()

    def _watch(self, slot: int, proc: multiprocessing.process.BaseProcess) -> None:
        """Restart a worker that dies while serving (not while stopping)."""
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(proc.sentinel)
            proc.join(0)
            self.live.discard(proc.pid or 0)
            if self.stopping:
                return
            self.log.error("worker_exited", pid=proc.pid, exitcode=proc.exitcode, restarting=True)
            new, conn = self._spawn(slot)

            async def restart() -> None:
                try:
                    await self._ready(new, conn)
                except StartupError as exc:
                    if not self.stopping:
                        self.log.error("worker_restart_failed", reason=str(exc))
                    return
                self._watch(slot, new)

            asyncio.ensure_future(restart())

        loop.add_reader(proc.sentinel, exited)

    async def _stop_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for proc in self.workers.values():
            loop.remove_reader(proc.sentinel)
            if proc.is_alive():
                proc.terminate()  # SIGTERM: each worker drains its own requests
        deadline = loop.time() + self.config.shutdown_grace + 5.0
        for proc in self.workers.values():
            remaining = max(deadline - loop.time(), 0.0)
            await loop.run_in_executor(None, proc.join, remaining)
            if proc.is_alive():
                self.log.error("worker_killed", pid=proc.pid)
                proc.kill()
                await loop.run_in_executor(None, proc.join, 5.0)
            self.live.discard(proc.pid or 0)
