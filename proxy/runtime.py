"""The running config: what one config compiles to, swapped whole by a reload.

A Runtime holds the compiled routes (with their live breakers and budgets), the upstream pool and
the request-line cache. The handler reads the current one once per request, so a request finishes
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
from .upstream import UpstreamClient, create_client

_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
_CACHED_TARGETS = 4096  # distinct (method, target) pairs remembered; ids in paths would grow it without bound


class Target(NamedTuple):
    """Where one request goes: its route and its path in the one form that is matched, logged and sent."""

    route: RoutePolicy
    path: str  # normalized, without the query
    url: URL  # the upstream base URL + that path + the query as sent


class Runtime:
    """One config, compiled; immutable but for its caches and the live state of breakers and budgets."""

    __slots__ = ("config", "routes", "client", "host", "_base", "_targets")

    def __init__(self, config: ProxyConfig, routes: RouteTable[RoutePolicy], client: UpstreamClient) -> None:
        self.config = config
        self.routes = routes
        self.client = client
        self._base = config.upstream.url.rstrip("/")
        self.host = URL(config.upstream.url).host or config.upstream.url  # for error messages
        self._targets: dict[tuple[str, str], Target] = {}

    @classmethod
    def build(cls, config: ProxyConfig, clock: Callable[[], float], notify: Callable[[BreakerChange], None],
              previous: Runtime | None = None) -> Runtime:
        """Inside the running loop (a pool binds to it). From `previous` (a reload) it keeps the pool
        when upstream.* did not change, and the breakers and budgets compile_routes keeps."""
        routes = compile_routes(config, clock, notify, previous.routes if previous is not None else None)
        if previous is not None and previous.config.upstream == config.upstream:
            return cls(config, routes, previous.client)
        return cls(config, routes, create_client(config))

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
        url = URL(self._base + normal + sep + query, encoded=True)
        found = Target(self.routes.match(method, normal).policy, normal, url)
        if len(self._targets) < _CACHED_TARGETS:
            self._targets[(method, raw)] = found
        return found

    def clients(self) -> set[UpstreamClient]:
        return {self.client}
