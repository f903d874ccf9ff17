"""Wiring: the traffic application, with the upstream session in its cleanup_ctx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from .config import ProxyConfig
from .events import Emitter, Observer
from .handler import Forwarder
from .upstream import create_session

CONFIG = web.AppKey("config", ProxyConfig)
SESSION = web.AppKey("session", aiohttp.ClientSession)

# aiohttp server options for the traffic listener: a disconnecting client cancels its handler (and
# so its upstream request); request bodies are never decompressed; no access log on the hot path.
SERVER_OPTIONS = dict(handler_cancellation=True, auto_decompress=False, access_log=None)


def create_app(config: ProxyConfig, observers: Sequence[Observer] = (), **forwarder_options: Any) -> web.Application:
    """The traffic app: every method and path goes to the forward handler.

    `observers` see every event (logs, metrics, tests); `forwarder_options` inject the clock,
    random source and sleep for tests."""
    # read() is used only for bodies within replay_limit; larger ones are streamed
    max_replay = max(r.policy.retry.replay_limit for r in (*config.routes.routes, config.routes.default))
    app = web.Application(client_max_size=max_replay + 1, handler_args=None)
    app[CONFIG] = config
    forwarder = Forwarder(config, Emitter(observers), **forwarder_options)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        session = create_session(config)
        app[SESSION] = forwarder.session = session
        yield
        await session.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{path:.*}", forwarder.handle)
    return app
