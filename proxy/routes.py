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
# RFC 3986 2.3: an escaped unreserved character (ALPHA, DIGIT, "-", ".", "_", "~") is that character
_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DEde]|5[Ff]|7[Ee])")


def _unescape(m: re.Match[str]) -> str:
    return chr(int(m[0][1:], 16))


def normalize_path(path: str) -> str | None:
    """The one form of a request path that is matched, logged and forwarded (RFC 3986 6.2.2, as Envoy's
    normalize_path forwards it): escapes of unreserved characters decoded (`/v1/%63hat` is `/v1/chat`),
    then dot-segments resolved (5.2.4). Other escapes stay (`%2F` is no segment break), and so do repeated
    slashes (Envoy's merge_slashes is off by default too). None: a `..` climbs above the root, which nginx
    answers 400; so no path can leave the upstream URL's base path."""
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(_unescape, path)
    if "/." not in path:
        return path
    segments = path.split("/")[1:]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if not out:
                return None
            out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):  # "/v1/models/.." is "/v1/", not "/v1"
        out.append("")
    return "/" + "/".join(out)


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled pattern: literal segments, None for a `{param}`, and whether it is a prefix."""

    text: str
    segments: tuple[str | None, ...]
    prefix: bool

    def matches_parts(self, parts: list[str]) -> bool:
        """One pattern against a path already split by split_path."""
        if len(parts) < len(self.segments) or (len(parts) > len(self.segments) and not self.prefix):
            return False
        return all(got if want is None else want == got for want, got in zip(self.segments, parts))


def split_path(path: str) -> list[str]:
    return path.strip("/").split("/") if path != "/" else []


def compile_path(text: str) -> PathPattern:
    """Validate and compile a route path; ValueError names what is wrong."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {text!r}")
    prefix = text.endswith("/*")
    body = (text[:-2] if prefix else text).strip("/")
    if not prefix and not body:
        raise ValueError("the path '/' matches nothing a client sends; use '/*' to match every path")
    parts = body.split("/") if body else []
    for n, part in enumerate(parts):
        if not part:
            raise ValueError(f"empty segment ('//') in {text!r}")
        if "{" in part or "}" in part:
            if not _PARAM.match(part):
                raise ValueError(f"bad parameter segment {part!r} in {text!r}: write a whole segment as {{name}}")
            if part in parts[:n]:
                raise ValueError(f"parameter {part} appears twice in {text!r}")
        elif "*" in part:
            raise ValueError(f"'*' is allowed only as the last segment ('/*') in {text!r}")
        elif not _LITERAL.match(part):
            raise ValueError(f"invalid characters in segment {part!r} of {text!r}")
        elif part in (".", ".."):
            raise ValueError(f"dot-segment {part!r} in {text!r}: request paths are matched with them resolved")
    literal = [None if part.startswith("{") else _UNRESERVED_ESCAPE.sub(_unescape, part) for part in parts]
    return PathPattern(text, tuple(literal), prefix)  # literals in the form normalize_path gives requests


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
        self.prefix: list[int] = []  # `/*` patterns (and the pattern-less route): here and every path below

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

    A segment trie finds the candidate routes, so a new path costs time by its depth, not by the
    number of routes; they are then taken in config order and checked for method. Hits are cached
    by (method, path), since OpenAI paths repeat.
    """

    __slots__ = ("routes", "default", "_cache", "_trie")

    def __init__(self, routes: list[Route[P]], default: Route[P]) -> None:
        self.routes = tuple(routes)
        self.default = default
        self._cache: dict[tuple[str, str], Route[P]] = {}
        self._trie = _Node()
        for i, route in enumerate(self.routes):
            node, pattern = self._trie, route.pattern
            for seg in pattern.segments if pattern else ():
                if seg is None:
                    node.param = node.param or _Node()
                    node = node.param
                else:
                    node = node.literal.setdefault(seg, _Node())
            (node.prefix if pattern is None or pattern.prefix else node.exact).append(i)

    def match(self, method: str, path: str) -> Route[P]:
        """The first route in config order that takes `method` on `path`, else the default."""
        key = (method, path)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        found = self.default
        candidates: list[int] = []
        self._trie.collect(split_path(path), 0, candidates)
        for i in sorted(candidates):
            methods = self.routes[i].methods
            if methods is None or method in methods:
                found = self.routes[i]
                break
        if len(self._cache) < 4096:  # ids in paths would grow it without bound
            self._cache[key] = found
        return found
