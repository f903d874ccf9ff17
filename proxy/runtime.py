"""The running config: what one config compiles to, swapped whole by a reload.

A Runtime holds the compiled routes (with their live breakers and budgets), a pool per upstream
and the request-line cache. The handler reads the current one once per request, so a request finishes
on the config it began with while new requests get the new one. `Runtime.build` makes a reload's
Runtime from the old one, keeping every piece whose settings did not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from yarl import URL

from .config import ProxyConfig
from .errors import BAD_PATH, BAD_TARGET, METHOD_REFUSED, ProxyError
from .events import BreakerChange
from .policy import RoutePolicy, compile_routes
from .routes import RouteTable, normalize_path
from .sse import may_resume
from .upstream import Endpoint, UpstreamClient, create_client
from .upstreams import DEFAULT_UPSTREAM

_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
_CACHED_TARGETS = 4096  # distinct (method, target) pairs remembered; ids in paths would grow it without bound


class Target(NamedTuple):
    """Where one request goes: its route and its path in the one form that is matched, logged and sent."""

    route: RoutePolicy
    path: str  # normalized, without the query
    endpoints: tuple[Endpoint, ...]  # the route's upstreams, in order
    urls: tuple[URL, ...]  # the request's URL at each of them: base URL + that path + the query as sent
    resumable: bool  # a background Responses stream could be behind it (sse.may_resume)

    @property
    def url(self) -> URL:
        """At the first upstream."""
        return self.urls[0]


def _pool_settings(config: ProxyConfig) -> dict[str, tuple[str, int, str, str | None]]:
    """Upstream name -> what its pool is made of: a pool is kept by a reload while this stays."""
    up = config.upstream
    named = {name: (u.url, u.max_connections or up.max_connections) for name, u in config.upstreams.items()}
    return {name: (url, n, up.proxy, up.ca_file)
            for name, (url, n) in {DEFAULT_UPSTREAM: (up.url, up.max_connections), **named}.items()}


class Runtime:
    """One config, compiled; immutable but for its caches and the live state of breakers and budgets."""

    __slots__ = ("config", "routes", "pools", "_endpoints", "_targets")

    def __init__(self, config: ProxyConfig, routes: RouteTable[RoutePolicy], pools: dict[str, UpstreamClient]) -> None:
        """`pools`: one per upstream some route lists."""
        self.config = config
        self.routes = routes
        self.pools = pools
        urls = {name: settings[0] for name, settings in _pool_settings(config).items()}
        endpoints = {name: Endpoint(name, pool, urls[name], config.credentials.get(name))
                     for name, pool in pools.items()}
        self._endpoints = {r.name: tuple(endpoints[u] for u in r.policy.upstreams)
                           for r in (*routes.routes, routes.default)}
        self._targets: dict[tuple[str, str], Target] = {}

    @classmethod
    def build(cls, config: ProxyConfig, clock: Callable[[], float], notify: Callable[[BreakerChange], None],
              previous: Runtime | None = None) -> Runtime:
        """Inside the running loop (a pool binds to it). From `previous` (a reload) it keeps the pool of
        each upstream whose URL, max_connections and egress (upstream.proxy, ca_file) did not change,
        and the breakers and budgets compile_routes keeps (a breaker not, when its upstream's URL moved:
        it judged another server)."""
        settings = _pool_settings(config)
        old = _pool_settings(previous.config) if previous is not None else {}
        moved = frozenset(name for name in settings if old.get(name, settings[name])[0] != settings[name][0])
        routes = compile_routes(config, clock, notify, previous.routes if previous is not None else None, moved)
        pools: dict[str, UpstreamClient] = {}
        for name in dict.fromkeys(u for r in (*routes.routes, routes.default) for u in r.policy.upstreams):
            if previous is not None and name in previous.pools and old.get(name) == settings[name]:
                pools[name] = previous.pools[name]
            else:
                url, max_connections = settings[name][:2]
                pools[name] = create_client(config, url, max_connections)
        return cls(config, routes, pools)

    def target(self, method: str, raw: str) -> Target | ProxyError:
        """Route and upstream URL of a request line, or the error that refuses it; one dict lookup for a
        request line seen before (OpenAI paths repeat)."""
        hit = self._targets.get((method, raw))
        if hit is not None:
            return hit
        if method in _REFUSED_METHODS:  # RFC 9110 9.3.6, 9.3.8: no tunnel; TRACE would echo the key back
            return METHOD_REFUSED
        if not raw.startswith("/"):  # absolute-form, authority-form or "*"
            return BAD_TARGET  # never glued onto the upstream URL
        path, sep, query = raw.partition("?")
        normal = normalize_path(path)
        if normal is None:
            return BAD_PATH
        route = self.routes.match(method, normal).policy
        endpoints = self._endpoints[route.name]
        urls = tuple(URL(e.base.join(normal + sep + query), encoded=True) for e in endpoints)
        found = Target(route, normal, endpoints, urls, may_resume(method, normal))
        if len(self._targets) < _CACHED_TARGETS:
            self._targets[(method, raw)] = found
        return found

    def clients(self) -> set[UpstreamClient]:
        """Every pool: a reload retires those the new Runtime does not keep."""
        return set(self.pools.values())
