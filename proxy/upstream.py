"""The upstream side: one pooled ClientSession per process and one attempt at a time.

No retry logic lives here. The session never decompresses (bodies pass byte-identical), keeps
no cookies (aiohttp's default jar would replay one client's Set-Cookie on another client's
request), and adds none of its own User-Agent/Accept/Accept-Encoding/Content-Type headers.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .body import RequestBody
from .config import ProxyConfig, Timeouts

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def create_session(config: ProxyConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.upstream.max_connections, limit_per_host=0, keepalive_timeout=60,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
        trust_env=False,
    )


def client_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    """sock_read starts as first_byte; relay switches it to idle once headers arrive."""
    return aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.first_byte)


def base_url(url: str) -> str:
    return url.rstrip("/")


async def send(session: aiohttp.ClientSession, method: str, base: str, raw_path: str,
               headers: CIMultiDict[str], body: RequestBody,
               timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """Send one attempt; return once response headers have arrived (the body is still unread)."""
    if body.streamed and body.size is not None:
        headers = headers.copy()
        headers["Content-Length"] = str(body.size)  # keep a known length: no chunked upload
    kwargs: dict[str, Any] = {}
    if body.data is not None:
        kwargs["data"] = body.data
    return await session.request(
        method, URL(base + raw_path, encoded=True), headers=headers, allow_redirects=False,
        timeout=timeout, **kwargs,
    )


def switch_to_idle_timeout(resp: aiohttp.ClientResponse, idle: float) -> None:
    """After the headers, "no bytes for `idle`" replaces "no headers for `first_byte`".

    aiohttp has one sock_read value per request; its ResponseHandler exposes a read_timeout
    setter and start_timeout() (used by aiohttp itself), so the switch costs no extra timer.
    """
    conn = resp.connection
    if conn is None or conn.protocol is None:
        return  # the body has been read whole already
    proto = conn.protocol
    proto.read_timeout = idle
    proto.start_timeout()
