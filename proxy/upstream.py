"""The upstream side: one pooled ClientSession per process and one attempt at a time.

No retry logic lives here. The session never decompresses (bodies pass byte-identical), keeps
no cookies (aiohttp's default jar would replay one client's Set-Cookie on another client's
request), and adds none of its own User-Agent/Accept/Accept-Encoding/Content-Type headers.
"""

from __future__ import annotations

import aiohttp
from yarl import URL

from .body import RequestBody
from .config import ProxyConfig, Timeouts
from .headers import Headers

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


async def send(session: aiohttp.ClientSession, method: str, url: URL, headers: Headers, body: RequestBody,
               timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """Send one attempt; return once response headers have arrived (the body is still unread)."""
    if body.streamed and body.size is not None:
        headers = [*headers, ("Content-Length", str(body.size))]  # a known length stays known: no chunking
    return await session.request(method, url, headers=headers, data=body.data, allow_redirects=False,
                                 timeout=timeout)


class UrlCache:
    """upstream base + raw path -> URL, parsed once per distinct path (OpenAI paths repeat)."""

    __slots__ = ("_base", "_cache")

    def __init__(self, base: str) -> None:
        self._base = base.rstrip("/")
        self._cache: dict[str, URL] = {}

    def __call__(self, raw_path: str) -> URL:
        url = self._cache.get(raw_path)
        if url is None:
            url = URL(self._base + raw_path, encoded=True)
            if len(self._cache) < 4096:  # ids and query strings would grow it without bound
                self._cache[raw_path] = url
        return url


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
