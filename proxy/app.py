"""Wiring: the traffic listener, with the upstream client in its Application's cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence
from email.utils import formatdate
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from .config import ProxyConfig
from .errors import ProxyError, too_many_connections
from .events import ConfigReloaded, Emitter, Observer
from .exposition import StoreCollector
from .handler import Forwarder
from .headers import serialize_head
from .logs import LogObserver
from .metrics import MetricsObserver, MetricsStore, bucket_bounds
from .reload import RESTART_KEYS, changed_keys, pinned

# aiohttp server options for the traffic listener: a disconnecting client cancels its handler (and
# so its upstream request); request bodies are never decompressed; no access log on the hot path.
SERVER_OPTIONS = dict(handler_cancellation=True, auto_decompress=False, access_log=None)

# How long a client connection may sit without a complete request: idle between requests, and
# also from accept to the first request's headers (aiohttp arms the same timer at accept), so a
# client that trickles header bytes (slowloris) cannot hold a file descriptor for long. aiohttp's
# low-level default is 3630 s. 75 s is nginx's keepalive_timeout: well above the SDKs' own idle
# expiry (httpx 5 s, undici 4 s), so the client, not the proxy, closes an idle connection first
# and never races a request against the proxy's close.
KEEPALIVE_TIMEOUT = 75.0


def route_names(config: ProxyConfig) -> list[str]:
    return [r.name for r in config.routes.routes] + [config.routes.default.name]


def route_upstreams(config: ProxyConfig) -> list[tuple[str, str]]:
    """(route, upstream) for each upstream of each route: the keys of the metrics labelled by upstream."""
    return [(r.name, u) for r in (*config.routes.routes, config.routes.default) for u in r.policy.upstreams]


def duration_buckets(config: ProxyConfig) -> tuple[float, ...]:
    """The duration histogram's bounds: up to the longest total timeout of any route."""
    routes = (*config.routes.routes, config.routes.default)
    return bucket_bounds(max(r.policy.timeouts.total for r in routes))


def standard_observers(config: ProxyConfig, registry: CollectorRegistry, *, logs: bool = True,
                       metrics_dir: str | None = None) -> list[Observer]:
    """The production observers: the masked log lines and the Prometheus metrics (on `registry`,
    and in a file in `metrics_dir` for the supervisor of --workers)."""
    store = MetricsStore(route_names(config), metrics_dir, buckets=duration_buckets(config),
                         pairs=route_upstreams(config))
    registry.register(StoreCollector(store))
    observers: list[Observer] = [MetricsObserver(store)]
    if logs:
        observers.append(LogObserver(level=config.log.level, fmt=config.log.format))
    return observers


def _observer_failed(exc: BaseException) -> None:
    logging.getLogger("openai_resilience_proxy").error("an observer failed", exc_info=exc)


class _RequestHandler(web.RequestHandler):  # type: ignore[type-arg]
    """aiohttp's own error answers (a request it cannot parse, 400; a handler crash, 500) quote the
    offending request line or header, which may hold an API key: answer with a fixed OpenAI-shaped
    error instead, naming only the kind of problem. aiohttp has no documented hook for these
    answers; `handle_error` is the exported class's public method, and tests pin what it does."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        kind = type(exc).__name__ if exc is not None else "invalid request"
        if status == 500:
            super().handle_error(request, status, exc, message)  # the traceback, and the "already sent" check
            err = ProxyError(500, "proxy_internal_error", "The proxy failed while handling this request.")
        else:  # the client's malformed request: one warning, no traceback, nothing it sent is quoted
            logging.getLogger("openai_resilience_proxy").warning("bad request from a client: %s", kind)
            err = ProxyError(status, "invalid_http_request", f"The request is not valid HTTP/1.1 ({kind}).")
        resp = err.response()
        resp.force_close()
        return resp


class _Refused(asyncio.Protocol):
    """A connection past `listen.max_connections`: answered 503 at once, never parsed, never forwarded.
    It closes when the client closes its side, or LINGER seconds on: closing with the client's request
    unread would reset the connection, and a reset can destroy the 503 before the client reads it
    (nginx's lingering close, lingering_timeout 5 s)."""

    LINGER = 5.0

    def __init__(self, answer: ProxyError) -> None:
        self._answer = answer
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is one, though not a subclass
        headers, body = self._answer.parts()
        headers += [("Content-Length", str(len(body))), ("Connection", "close"), ("Date", formatdate(usegmt=True))]
        transport.write(serialize_head("HTTP/1.1 503 Service Unavailable", headers) + body)
        if transport.can_write_eof():
            transport.write_eof()  # the answer is whole: the client reads it and closes
        self._timer = asyncio.get_running_loop().call_later(self.LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # read and dropped, so closing does not reset the connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Server(web.Server):
    """web.Server (a documented protocol factory) whose connections answer errors as above, and that
    holds at most `max_connections` client connections (None: no cap): one past it gets `_Refused`."""

    def __init__(self, handler: Any, *, handler_cancellation: bool = False, max_connections: int | None = None,
                 **options: Any) -> None:
        super().__init__(handler, handler_cancellation=handler_cancellation, **options)
        self.options = options
        self.max_connections = max_connections
        self.open_connections = 0  # counted as each protocol is made: a burst of accepts cannot pass the cap
        self._refusal = too_many_connections(max_connections) if max_connections is not None else None
        self._warned = -math.inf

    def __call__(self) -> asyncio.Protocol:
        if self.max_connections is not None and self.open_connections >= self.max_connections:
            self._warn()
            assert self._refusal is not None
            return _Refused(self._refusal)
        self.open_connections += 1
        return _RequestHandler(self, loop=asyncio.get_running_loop(), **self.options)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)  # the public hook every RequestHandler calls once, at its end
        self.open_connections -= 1

    def _warn(self) -> None:
        """One line per 10 s at most: a flood of refusals must not flood the log."""
        now = asyncio.get_running_loop().time()
        if now - self._warned >= 10:
            self._warned = now
            logging.getLogger("openai_resilience_proxy").warning(
                "client connection refused with 503: listen.max_connections (%d) are open; "
                "further refusals in the next 10 s are not logged", self.max_connections)


def server_runner(handler: Any, *, shutdown_timeout: float, **options: Any) -> web.ServerRunner:
    """A low-level listener (handler gets every request) whose own error answers never quote the request."""
    return web.ServerRunner(_Server(handler, **options), shutdown_timeout=shutdown_timeout)


class TrafficServer:
    """The traffic listener.

    aiohttp's low-level `web.Server` calls the forward handler directly: every method and path goes
    to it, so a router and a middleware chain would only cost time (docs/benchmarks.md).
    An Application still owns the lifecycle: the upstream client lives in its cleanup_ctx.
    `observers` see every event (logs, metrics, tests); `forwarder_options` inject the clock,
    random source and sleep for tests.
    """

    def __init__(self, config: ProxyConfig, observers: Sequence[Observer] = (), *, shutdown_timeout: float = 60.0,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT, **forwarder_options: Any) -> None:
        self.config = config
        self.emit = Emitter(observers, _observer_failed)
        self.forwarder = Forwarder(self.emit, **forwarder_options)
        self.app = web.Application()
        self.app.cleanup_ctx.append(self._client_ctx)
        self.runner = server_runner(self.forwarder.handle, shutdown_timeout=shutdown_timeout,
                                    keepalive_timeout=keepalive_timeout,
                                    max_connections=config.listen.max_connections, **SERVER_OPTIONS)

    async def _client_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self.forwarder.start(self.config)
        yield
        await self.forwarder.close()

    def reload(self, config: ProxyConfig) -> None:
        """Serve `config` from the next request on (in-flight ones finish on the old); the keys a
        running listener cannot change are reported, and wait for a restart."""
        changed = changed_keys(self.config, config)
        config = pinned(config, self.config)
        self.forwarder.reload(config)  # builds the new Runtime whole before it swaps: a failure changes nothing
        self.config = config
        self.emit(ConfigReloaded(config.source, tuple(changed), tuple(k for k in changed if k in RESTART_KEYS),
                                 tuple(route_names(config)), tuple(route_upstreams(config))))

    async def setup(self) -> None:
        self.app.freeze()
        await self.app.startup()
        await self.runner.setup()

    async def listen(self, host: str, port: int, **site_options: Any) -> None:
        await web.TCPSite(self.runner, host, port, **site_options).start()

    @property
    def addresses(self) -> list[Any]:
        return self.runner.addresses

    async def cleanup(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded by shutdown_timeout), close the upstream client."""
        try:
            await self.runner.cleanup()
        finally:
            await self.app.cleanup()
