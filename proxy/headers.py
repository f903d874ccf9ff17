"""Which headers cross the proxy (RFC 9110 7.6.1): hop-by-hop headers, and any the Connection header
names, describe one connection and stay behind; everything end-to-end, Authorization included, passes."""

from __future__ import annotations

import re

from multidict import CIMultiDict, CIMultiDictProxy, istr

HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# Host is the upstream's (aiohttp sets it from the URL); the length is recomputed per hop.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}  # Expect: the proxy answers the 100 itself
# The proxy's coordination headers are its own (design.md, client contract): the upstream's copies
# never reach the client beside them. x-should-retry is replaced only when the proxy sets it.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-proxy-attempts", "x-proxy-upstream"}
# Connection values that name no other header, as senders spell them (an unusual spelling only takes
# the slower path); an istr key skips multidict's case folding of the name.
_PLAIN_CONNECTION = frozenset({"keep-alive", "Keep-Alive", "close", "Close", "upgrade", "Upgrade"})
_CONNECTION = istr("Connection")
# RFC 9110 5.5: a field value is visible characters, spaces, tabs and obs-text; no other control.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

Headers = list[tuple[str, str]]  # aiohttp copies headers on the way in, so a list is the cheapest carrier


def serialize_head(status_line: str, headers: Headers) -> bytes:
    """The status line and header block as wire bytes; surrogateescape restores any non-UTF-8 byte.
    A CR, LF or NUL would start a header of the sender's choosing: ValueError, as aiohttp refuses it."""
    text = "\r\n".join((status_line, *map(": ".join, headers), "", ""))
    n = len(headers) + 2
    if text.count("\n") != n or text.count("\r") != n or "\0" in text:
        raise ValueError("a header name or value holds CR, LF or NUL")
    return text.encode("utf-8", "surrogateescape")


def _keeps(name: str, drop: frozenset[str]) -> bool:
    low = name.lower()
    return low not in drop and not low.startswith("proxy-")


class _Filter:
    """Keep or drop, by header name: decided once per distinct spelling (SDKs send the same names
    on every request), then a dict lookup instead of lower() + set test + prefix test per header."""

    __slots__ = ("_drop", "_known")

    def __init__(self, drop: frozenset[str]) -> None:
        self._drop = drop
        self._known: dict[str, bool] = {}

    def __call__(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> Headers:
        connection = headers.getall(_CONNECTION, None)  # every one: a second may name more (RFC 9110 7.6.1)
        if connection is not None and (len(connection) > 1 or connection[0] not in _PLAIN_CONNECTION):
            drop = self._drop | {t.strip().lower() for v in connection for t in v.split(",")}
            return [(name, value) for name, value in headers.items() if _keeps(name, drop)]
        known, learn = self._known.get, self._learn
        return [(name, value) for name, value in headers.items() if (k := known(name)) or (k is None and learn(name))]

    def _learn(self, name: str) -> bool:
        keep = _keeps(name, self._drop)
        if len(self._known) < 1024:  # names come from outside: the memory stays bounded
            self._known[name] = keep
        return keep


# End-to-end headers, in the sender's order and case: the client's to send upstream, and the
# upstream's to send to the client (Content-Encoding stays: the proxy never decompresses).
request_headers = _Filter(_REQUEST_DROP)
response_headers = _Filter(_RESPONSE_DROP)


def is_event_stream(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    """Judged on the upstream's headers, before they are copied."""
    return headers.get("Content-Type", "").startswith("text/event-stream")


def readable_stream(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    """An event stream whose end marker can be read: a compressed one passes through as is."""
    return is_event_stream(headers) and headers.get("Content-Encoding", "identity") == "identity"


def unrelayable(reason: str | None, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
    """Why an upstream response cannot be passed on as HTTP/1.1, or None (the client has already
    refused a status outside 100-599). A phrase for the error message, never the offending bytes."""
    if _CONTROL.search("".join(headers.values())) or _CONTROL.search("".join(headers.keys())):
        return "a header holds a control character"
    if reason and _CONTROL.search(reason):
        return "its status line holds a control character"
    return None
