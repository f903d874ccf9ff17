"""The upstream side: one pooled client per process and one attempt at a time.

Two interchangeable clients (`upstream.client`): `fast` (proxy.fastclient: keep-alive HTTP/1.1
on aiohttp's protocol and C parser, ~40 % of ClientSession's CPU per request) and `aiohttp`
(ClientSession). No retry logic lives here. Neither decompresses (bodies pass byte-identical),
keeps cookies (aiohttp's default jar would replay one client's Set-Cookie on another client's
request), follows redirects, or adds User-Agent/Accept/Accept-Encoding/Content-Type headers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from .body import RequestBody
from .config import ProxyConfig, Timeouts
from .fastclient import FastClient, FastResponse
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


class SessionClient:
    """ClientSession behind the same two calls as FastClient."""

    __slots__ = ("_session",)

    def __init__(self, config: ProxyConfig) -> None:
        self._session = create_session(config)

    async def request(self, method: str, url: URL, headers: Headers, data: bytes | AsyncIterator[bytes] | None,
                      timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        return await self._session.request(method, url, headers=headers, data=data, allow_redirects=False,
                                           timeout=timeout)

    async def close(self) -> None:
        await self._session.close()


UpstreamClient = FastClient | SessionClient
UpstreamResponse = FastResponse | aiohttp.ClientResponse


def create_client(config: ProxyConfig) -> UpstreamClient:
    """Inside the running loop (the app's cleanup_ctx): both clients bind to it."""
    if config.upstream.client == "fast":
        return FastClient(config.upstream.url, max_connections=config.upstream.max_connections)
    return SessionClient(config)


def client_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    """sock_read starts as first_byte; relay switches it to idle once headers arrive."""
    return aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.first_byte)


async def send(client: UpstreamClient, method: str, url: URL, headers: Headers, body: RequestBody,
               timeout: aiohttp.ClientTimeout) -> UpstreamResponse:
    """Send one attempt; return once response headers have arrived (the body is still unread)."""
    if body.streamed and body.size is not None:
        headers = [*headers, ("Content-Length", str(body.size))]  # a known length stays known: no chunking
    return await client.request(method, url, headers, body.data, timeout)


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


def switch_to_idle_timeout(resp: UpstreamResponse, idle: float) -> None:
    """After the headers, "no bytes for `idle`" replaces "no headers for `first_byte`".

    aiohttp has one sock_read value per request; its ResponseHandler exposes a read_timeout
    setter and start_timeout() (used by aiohttp itself), so the switch costs no extra timer.
    """
    if isinstance(resp, FastResponse):
        resp.set_read_timeout(idle)
        return
    conn = resp.connection
    if conn is None or conn.protocol is None:
        return  # the body has been read whole already
    proto = conn.protocol
    proto.read_timeout = idle
    proto.start_timeout()
