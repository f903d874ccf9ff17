"""Route table: (method, path) -> Route. Pure; compiled once from the config.

Patterns: an exact path (`/v1/chat/completions`), `{param}` segments (`/v1/videos/{id}`), or a
prefix ending in `/*` (`/v1/files/*`, which matches `/v1/files` and everything below it).
First match wins; no match is the route named "default".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")

DEFAULT_ROUTE = "default"
_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=:@%-]+$")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled pattern: literal segments, None for a `{param}`, and whether it is a prefix."""

    text: str
    segments: tuple[str | None, ...]
    prefix: bool

    def matches_parts(self, parts: list[str]) -> bool:
        """Against a path already split by split_path (once per request, not once per route)."""
        segs = self.segments
        if self.prefix:
            if len(parts) < len(segs):
                return False
        elif len(parts) != len(segs):
            return False
        for want, got in zip(segs, parts):
            if want is None:
                if not got:
                    return False
            elif want != got:
                return False
        return True


def split_path(path: str) -> list[str]:
    return path.strip("/").split("/") if path != "/" else []


def compile_path(text: str) -> PathPattern:
    """Validate and compile a route path; ValueError names what is wrong."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {text!r}")
    prefix = text == "/*" or text.endswith("/*")
    body = text[:-2] if prefix else text
    parts = body.strip("/").split("/") if body.strip("/") else []
    if not prefix and not parts:
        raise ValueError("the path '/' matches nothing a client sends; use '/*' to match every path")
    segments: list[str | None] = []
    seen: set[str] = set()
    for part in parts:
        if not part:
            raise ValueError(f"empty segment ('//') in {text!r}")
        if "{" in part or "}" in part:
            if not _PARAM.match(part):
                raise ValueError(f"bad parameter segment {part!r} in {text!r}: write a whole segment as {{name}}")
            if part in seen:
                raise ValueError(f"parameter {part} appears twice in {text!r}")
            seen.add(part)
            segments.append(None)
        elif "*" in part:
            raise ValueError(f"'*' is allowed only as the last segment ('/*') in {text!r}")
        elif not _LITERAL.match(part):
            raise ValueError(f"invalid characters in segment {part!r} of {text!r}")
        else:
            segments.append(part)
    return PathPattern(text, tuple(segments), prefix)


@dataclass(frozen=True, slots=True)
class Route(Generic[P]):
    name: str
    methods: frozenset[str] | None  # None: any method
    pattern: PathPattern | None  # None: the default route
    policy: P


class _Node:
    """A trie node over path segments: route indexes that end here, or match everything below."""

    __slots__ = ("literal", "param", "exact", "prefix")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.exact: list[int] = []  # patterns with exactly this many segments
        self.prefix: list[int] = []  # `/*` patterns: this node and every path below it

    def add(self, segments: tuple[str | None, ...], prefix: bool, index: int) -> None:
        node = self
        for seg in segments:
            if seg is None:
                node.param = node.param or _Node()
                node = node.param
            else:
                node = node.literal.setdefault(seg, _Node())
        (node.prefix if prefix else node.exact).append(index)

    def collect(self, parts: list[str], i: int, out: list[int]) -> None:
        """Every route index whose pattern matches parts[i:] from this node (any order)."""
        out.extend(self.prefix)
        if i == len(parts):
            out.extend(self.exact)
            return
        part = parts[i]
        child = self.literal.get(part)
        if child is not None:
            child.collect(parts, i + 1, out)
        if self.param is not None and part:  # a {param} segment is never empty
            self.param.collect(parts, i + 1, out)


class RouteTable(Generic[P]):
    """First match wins, in config order.

    Paths are looked up in a segment trie, so the cost follows the path's depth, not the number of
    routes (1,000 routes match as fast as 10); the candidates found are then taken in config order
    and checked for method. Exact method+path hits are also cached, since OpenAI paths repeat.
    """

    __slots__ = ("_routes", "_default", "_cache", "_trie")

    def __init__(self, routes: list[Route[P]], default: Route[P]) -> None:
        self._routes = tuple(routes)
        self._default = default
        self._cache: dict[tuple[str, str], Route[P]] = {}
        self._trie = _Node()
        for i, route in enumerate(self._routes):
            if route.pattern is None:
                self._trie.prefix.append(i)  # no pattern: every path
            else:
                self._trie.add(route.pattern.segments, route.pattern.prefix, i)

    @property
    def routes(self) -> tuple[Route[P], ...]:
        return self._routes

    @property
    def default(self) -> Route[P]:
        return self._default

    def match(self, method: str, path: str) -> Route[P]:
        key = (method, path)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        found = self._default
        candidates: list[int] = []
        self._trie.collect(split_path(path), 0, candidates)
        for i in sorted(candidates):
            methods = self._routes[i].methods
            if methods is None or method in methods:
                found = self._routes[i]
                break
        if len(self._cache) < 4096:  # ids in paths would grow it without bound
            self._cache[key] = found
        return found
