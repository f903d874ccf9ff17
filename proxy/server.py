"""One process's lifecycle: bind the traffic and admin listeners, serve until SIGTERM/SIGINT, then
drain in order: /readyz turns 503 at once -> the traffic listener stops accepting -> in-flight
requests and streams finish (bounded by shutdown_grace, then cancelled) -> the upstream session
closes -> the admin listener (/healthz, /readyz, /metrics) closes.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import __version__
from .app import TrafficServer, server_runner, standard_observers
from .config import ProxyConfig, effective
from .errors import ADMIN_METHOD, ADMIN_NOT_FOUND
from .logs import WRITER, get_logger
from .process_metrics import process_collectors
from .reload import Loader, Reloader

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupError(Exception):
    """A listener could not be bound; the message is for a person."""


async def admin_runner(status: Callable[[], str], registry: CollectorRegistry) -> web.ServerRunner:
    """The admin listener, set up and ready to bind; /readyz answers `status()`: 503 unless "ready"."""

    async def healthz() -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz() -> web.Response:
        now = status()
        return web.json_response({"status": now}, status=200 if now == "ready" else 503)

    async def metrics() -> web.Response:
        # rendering is pure Python and grows with routes x series: in a thread, the event loop keeps
        # serving traffic between the interpreter's switch intervals instead of stalling for the scrape
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    pages = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        page = pages.get(request.path)
        if page is None:
            return ADMIN_NOT_FOUND.response()
        if request.method not in ("GET", "HEAD"):
            return ADMIN_METHOD.response({"Allow": "GET, HEAD"})
        return await page()

    runner = server_runner(handle, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    return runner


def listen_error(host: str, port: int, exc: OSError) -> str:
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """uvloop when it is there (the supervisor, each worker and a single process all run this); a
    KeyboardInterrupt before the signal handlers are in place ends it quietly."""
    try:
        from uvloop import new_event_loop as loop_factory
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform but Windows
        loop_factory = None  # type: ignore[assignment]
    with suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


async def serve(config: ProxyConfig, supervisor: Callable[[ProxyConfig, CollectorRegistry], Any] | None = None,
                loader: Loader | None = None) -> None:
    """Both listeners until SIGTERM/SIGINT; the traffic one is this process's, or `supervisor`'s workers.
    SIGHUP (and the file watch) reloads through `loader`."""
    log = get_logger()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    status = "starting"  # then "ready" once both listeners are bound, "draining" from the stop signal on
    registry = CollectorRegistry()
    workers = supervisor(config, registry) if supervisor else None
    if workers is None:
        for collector in process_collectors():
            registry.register(collector)
    traffic = workers or TrafficServer(config, standard_observers(config, registry),
                                       shutdown_timeout=config.shutdown_grace)
    await traffic.setup()
    admin = await admin_runner(lambda: status, registry)
    try:
        try:
            await traffic.listen(config.listen.host, config.listen.port, backlog=4096)
            await web.TCPSite(admin, config.admin.host, config.admin.port).start()
        except OSError as exc:
            where = config.admin if traffic.addresses else config.listen
            raise StartupError(listen_error(where.host, where.port, exc)) from None
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        reloader = Reloader(config, loader or (lambda: config), traffic.reload, registry)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        watch = asyncio.ensure_future(reloader.watch())
        status = "ready"
        log.info("startup", config=effective(config), config_source=config.source, version=__version__,
                 workers=config.workers, pids=workers.pids() if workers else [os.getpid()])
        log.info("listening", traffic=_addresses(traffic.addresses), admin=_addresses(admin.addresses),
                 upstream=config.upstream.url, workers=config.workers)
        await stop.wait()
        watch.cancel()
        loop.remove_signal_handler(signal.SIGHUP)  # default action ends the process: ignore it while draining
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        status = "draining"
        log.info("draining", grace_s=config.shutdown_grace, workers=config.workers)
        for sig in STOP_SIGNALS if workers is None else ():  # a second signal ends a single process at once
            loop.remove_signal_handler(sig)
    finally:
        await traffic.cleanup()
        await admin.cleanup()
    log.info("stopped")
    WRITER.flush()


def _addresses(addresses: list[Any]) -> list[str]:
    return [f"{a[0]}:{a[1]}" for a in addresses if isinstance(a, tuple)]


async def serve_traffic_only(config: ProxyConfig, port: int, conn: Connection, metrics_dir: str) -> None:
    """A worker of --workers N: the traffic listener on a port shared with the other workers. `conn`
    says when it listens, then brings each config the supervisor has reloaded and checked."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry()  # unused: the supervisor reads this worker's file in metrics_dir
    traffic = TrafficServer(config, standard_observers(config, registry, metrics_dir=metrics_dir),
                            shutdown_timeout=config.shutdown_grace)
    await traffic.setup()
    try:
        try:
            await traffic.listen(config.listen.host, port, backlog=4096, reuse_port=True)
        except OSError as exc:
            conn.send(listen_error(config.listen.host, port, exc))
            return
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        conn.send(None)  # listening
        loop.add_reader(conn.fileno(), _next_config, conn, traffic, stop)
        get_logger().info("worker_started", pid=os.getpid())
        await stop.wait()
        loop.remove_reader(conn.fileno())
    finally:
        conn.close()
        await traffic.cleanup()
        WRITER.flush()


def _next_config(conn: Connection, traffic: TrafficServer, stop: asyncio.Event) -> None:
    """A reloaded config from the supervisor (one pickled message; it writes each whole). The pipe's
    end means the supervisor is gone (killed): drain and exit rather than serve on unsupervised."""
    try:
        config = conn.recv()
    except (EOFError, OSError):
        asyncio.get_running_loop().remove_reader(conn.fileno())
        get_logger().error("supervisor_gone", pid=os.getpid(), action="draining")
        stop.set()
        return
    try:
        traffic.reload(config)
    except Exception as exc:  # a bug: this worker keeps its running config, and says so
        get_logger().exception("config_reload_failed", trigger="supervisor", error=f"applying it failed: {exc!r}",
                               kept="the running config", pid=os.getpid())
