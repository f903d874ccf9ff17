"""Which headers cross the proxy. Pure functions over header multidicts.

RFC 9110 7.6.1: hop-by-hop headers (and any header the Connection header names) describe one
connection and must not be forwarded. Everything end-to-end, Authorization included, passes as is.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Host is the upstream's (aiohttp sets it from the URL); the length is recomputed per hop.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _filter(headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str]) -> CIMultiDict[str]:
    if "Connection" in headers:
        drop = drop | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in drop or low.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def request_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """End-to-end request headers to send upstream, in the client's order and case."""
    return _filter(headers, _REQUEST_DROP)


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """End-to-end response headers to send to the client; Content-Encoding stays (no decompression)."""
    return _filter(headers, _RESPONSE_DROP)


def is_event_stream(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    return headers.get("Content-Type", "").startswith("text/event-stream")
