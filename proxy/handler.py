"""The forward handler: route match -> request body -> one upstream attempt -> relay or proxy error."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from yarl import URL

from .body import read_body
from .classify import Category, classify_exception, failure_detail
from .config import Policy, ProxyConfig
from .errors import ProxyError, for_category
from .headers import request_headers
from .relay import UPSTREAM_ERRORS, UpstreamFailure, relay
from .units import format_duration
from .upstream import base_url, client_timeout, send


class Forwarder:
    """Callable handler bound to one session and one compiled config; no per-request setup."""

    __slots__ = ("session", "_routes", "_base", "_host", "_timeouts")

    def __init__(self, config: ProxyConfig) -> None:
        self.session: aiohttp.ClientSession | None = None  # set by the app's cleanup_ctx
        self._routes = config.routes
        self._base = base_url(config.upstream.url)
        self._host = URL(config.upstream.url).host or config.upstream.url
        routes = [*config.routes.routes, config.routes.default]
        self._timeouts = {r.name: client_timeout(r.policy.timeouts) for r in routes}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = self._routes.match(request.method, request.path)
        policy = route.policy
        body = await read_body(request, policy.retry.replay_limit)
        try:
            assert self.session is not None
            up = await send(self.session, request.method, self._base, request.raw_path,
                            request_headers(request.headers), body, self._timeouts[route.name])
            return await relay(request, up, policy.timeouts.idle)
        except UpstreamFailure as failure:
            return self._error(failure.cause, policy).response()
        except UPSTREAM_ERRORS as exc:
            return self._error(exc, policy).response()

    def _error(self, exc: BaseException, policy: Policy) -> ProxyError:
        category = classify_exception(exc)
        return for_category(category, self._message(category, exc, policy))

    def _message(self, category: Category, exc: BaseException, policy: Policy) -> str:
        t = policy.timeouts
        host = self._host
        if category is Category.CONNECT:
            return f"Could not connect to {host}: {failure_detail(exc)}. The request was not sent; retry later."
        if category is Category.TIMEOUT:
            if isinstance(exc, aiohttp.SocketTimeoutError):
                return (f"{host} did not send response headers within {format_duration(t.first_byte)}; "
                        "the upstream may be overloaded, retry later.")
            return f"{host} did not answer within the total timeout of {format_duration(t.total)}; retry later."
        if category is Category.NETWORK:
            return (f"The connection to {host} failed after the request was sent: {failure_detail(exc)}. "
                    "The request may or may not have been processed.")
        return f"{host} sent a response the proxy could not read: {failure_detail(exc)}."
