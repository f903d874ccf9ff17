"""Process lifecycle: bind both listeners, serve until SIGTERM/SIGINT, then drain in order.

Drain order: /readyz turns 503 at once -> the traffic listener stops accepting -> in-flight
requests and streams finish (bounded by shutdown_grace, then cancelled) -> the upstream session
closes (cleanup_ctx) -> the admin listener closes.
"""

from __future__ import annotations

import asyncio
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from .app import TrafficServer, standard_observers
from . import __version__
from .config import ProxyConfig, effective
from .health import ServerState, create_admin_app
from .logs import WRITER, get_logger
from .process_metrics import process_collectors


class StartupError(Exception):
    """A listener could not be bound; the message is for a person."""


def run_loop(coro: object) -> None:
    """uvloop when it is there (the supervisor, each worker and a single process all run this)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)  # type: ignore[arg-type]


async def serve(config: ProxyConfig, stop: asyncio.Event | None = None) -> None:
    log = get_logger()
    stop = stop or asyncio.Event()
    state = ServerState()
    registry = CollectorRegistry()
    for collector in process_collectors():
        registry.register(collector)
    traffic = TrafficServer(config, standard_observers(config, registry), shutdown_timeout=config.shutdown_grace)
    admin = web.AppRunner(create_admin_app(state, registry), shutdown_timeout=1.0, access_log=None)
    await traffic.setup()
    await admin.setup()
    try:
        try:
            await traffic.listen(config.listen.host, config.listen.port, backlog=4096)
            await web.TCPSite(admin, config.admin.host, config.admin.port).start()
        except OSError as exc:
            where = config.admin if traffic.addresses else config.listen
            raise StartupError(f"cannot listen on {where.host}:{where.port}: {exc.strerror or exc}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        state.ready = True
        log.info("startup", config=effective(config), config_source=config.source, version=__version__)
        log.info("listening", traffic=_addresses(traffic.addresses), admin=_addresses(admin.addresses),
                 upstream=config.upstream.url)
        await stop.wait()
        state.draining = True
        log.info("draining", grace_s=config.shutdown_grace)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    finally:
        await traffic.cleanup()
        await admin.cleanup()
    log.info("stopped")
    WRITER.flush()


def _addresses(addresses: list[Any]) -> list[str]:
    return [f"{a[0]}:{a[1]}" for a in addresses if isinstance(a, tuple)]


async def serve_traffic_only(config: ProxyConfig, port: int, conn: Connection, metrics_dir: str) -> None:
    """A worker of --workers N: the traffic listener on a port shared with the other workers."""
    log = get_logger()
    stop = asyncio.Event()
    registry = CollectorRegistry()  # unused: the supervisor reads this worker's file in metrics_dir
    traffic = TrafficServer(config, standard_observers(config, registry, metrics_dir=metrics_dir),
                            shutdown_timeout=config.shutdown_grace)
    await traffic.setup()
    try:
        try:
            await traffic.listen(config.listen.host, port, backlog=4096, reuse_port=True)
        except OSError as exc:
            conn.send(("error", f"cannot listen on {config.listen.host}:{port}: {exc.strerror or exc}"))
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        conn.send(("ok", os.getpid()))
        conn.close()
        log.info("worker_started", pid=os.getpid())
        await stop.wait()
    finally:
        await traffic.cleanup()
        WRITER.flush()
