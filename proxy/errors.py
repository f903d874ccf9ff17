"""Proxy-made errors: the one place that builds them, in the OpenAI error shape.

SDKs parse `{"error": {...}}` and raise their usual exception for the status; `x-proxy-error`
tells a person (and a test) that the proxy, not the upstream, produced the response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from .classify import Category


@dataclass(frozen=True, slots=True)
class ProxyError:
    status: int
    code: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def response(self) -> web.Response:
        body = orjson.dumps({"error": {"message": self.message, "type": "proxy_error",
                                       "code": self.code, "param": None}})
        resp = web.Response(status=self.status, body=body, content_type="application/json")
        resp.headers["x-proxy-error"] = self.code
        resp.headers.update(self.headers)
        return resp


# design.md, "Interfaces": the status and code of each proxy-made error
STATUS_AND_CODE: Mapping[Category, tuple[int, str]] = {
    Category.CONNECT: (502, "upstream_connect_error"),
    Category.NETWORK: (502, "upstream_network_error"),
    Category.TIMEOUT: (504, "upstream_timeout"),
    Category.INVALID_RESPONSE: (502, "invalid_upstream_response"),
    Category.CIRCUIT_OPEN: (503, "circuit_open"),
}


def for_category(category: Category, message: str, headers: Mapping[str, str] | None = None) -> ProxyError:
    status, code = STATUS_AND_CODE[category]
    return ProxyError(status, code, message, headers or {})
