"""Wiring: the traffic application, with the upstream session in its cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from .config import ProxyConfig
from .events import Emitter, Observer
from .handler import Forwarder
from .logs import LogObserver
from .metrics import Metrics, MetricsObserver
from .upstream import create_session

CONFIG = web.AppKey("config", ProxyConfig)
SESSION = web.AppKey("session", aiohttp.ClientSession)

# aiohttp server options for the traffic listener: a disconnecting client cancels its handler (and
# so its upstream request); request bodies are never decompressed; no access log on the hot path.
SERVER_OPTIONS = dict(handler_cancellation=True, auto_decompress=False, access_log=None)


def route_names(config: ProxyConfig) -> list[str]:
    return [r.name for r in config.routes.routes] + [config.routes.default.name]


def standard_observers(config: ProxyConfig, registry: CollectorRegistry, *, logs: bool = True) -> list[Observer]:
    """The production observers: the masked log lines and the Prometheus metrics."""
    observers: list[Observer] = [MetricsObserver(Metrics(registry), route_names(config))]
    if logs:
        observers.append(LogObserver())
    return observers


def _observer_failed(exc: BaseException) -> None:
    logging.getLogger("openai_resilience_proxy").error("an observer failed", exc_info=exc)


def create_app(config: ProxyConfig, observers: Sequence[Observer] = (), **forwarder_options: Any) -> web.Application:
    """The traffic app: every method and path goes to the forward handler.

    `observers` see every event (logs, metrics, tests); `forwarder_options` inject the clock,
    random source and sleep for tests."""
    # read() is used only for bodies within replay_limit; larger ones are streamed
    max_replay = max(r.policy.retry.replay_limit for r in (*config.routes.routes, config.routes.default))
    app = web.Application(client_max_size=max_replay + 1, handler_args=None)
    app[CONFIG] = config
    forwarder = Forwarder(config, Emitter(observers, _observer_failed), **forwarder_options)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        session = create_session(config)
        app[SESSION] = forwarder.session = session
        yield
        await session.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{path:.*}", forwarder.handle)
    return app
