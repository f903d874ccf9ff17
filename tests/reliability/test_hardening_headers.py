"""Issue 15, items 5, 6 and 9, over raw sockets from both sides: a malicious client (raw bytes to the
proxy) and a malicious upstream written here (asyncio.start_server, answering with scripted bytes).

- 5: API keys anywhere in a logged path are masked by shape (the `request` log line of a real process);
- 6: header bytes that are not UTF-8 cross the proxy byte-identical, both ways, whatever the framing;
- 9: every Connection header is read: a header named in a second one stays behind, both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from proxy.masking import mask

from ..conftest import CANARY, TEST_KEY, write_config
from .rawhttp import exchange

BOUND = 5.0  # seconds: a guard around each wait, never a measurement
OBS = b"caf\xe9\xff-end"  # obs-text: bytes that are not UTF-8


@dataclass
class RawUpstream:
    """An upstream that records each request head as bytes and answers with `reply(head)`."""

    reply: Callable[[bytes], bytes]
    heads: list[bytes] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:  # keep-alive: one request after another
                head = await reader.readuntil(b"\r\n\r\n")
                length = [v for n, _, v in (x.partition(b":") for x in lines(head)) if n.lower() == b"content-length"]
                await reader.readexactly(int(length[0]) if length else 0)
                self.heads.append(head)
                writer.write(self.reply(head))
                await writer.drain()
        writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Callable[[bytes], bytes]], Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Callable[[bytes], bytes]) -> RawUpstream:
        up = RawUpstream(reply)
        server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
        servers.append(server)
        up.url = "http://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        return up

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def head_only(addr: str, data: bytes) -> bytes:
    """The response head to a request (HEAD: no body follows, so `exchange` cannot tell the end)."""
    host, port = addr.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        async with asyncio.timeout(BOUND):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


def lines(head: bytes) -> list[bytes]:
    """The header lines of a head, without the request or status line."""
    return head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]


# ----------------------------------------------------------------------------- item 6: bytes as sent

async def test_request_header_bytes_reach_the_upstream_unchanged(start_proxy, raw_upstream):
    """Held on main since the aiohttp upstream client went (its serializer dropped these bytes): the
    proxy's own client writes the client's bytes back as they came."""
    up = await raw_upstream(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    proxy = await start_proxy(upstream=up.url)
    body = b'{"a":1}'
    for data in (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Val: " + OBS + b"\r\nX-Utf8: caf\xc3\xa9\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Val: " + OBS + b"\r\nX-Utf8: caf\xc3\xa9\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body):
        reply = await exchange(proxy.url, data, timeout=BOUND)
        assert reply.status == 200
        sent = lines(up.heads[-1])
        assert b"X-Val: " + OBS in sent and b"X-Utf8: caf\xc3\xa9" in sent, sent


async def test_header_names_that_are_not_tokens_are_refused_both_ways(start_proxy, raw_upstream):
    """A name cannot carry such bytes (RFC 9110 5.1: a token): refused, 400 and 502, never rewritten."""
    up = await raw_upstream(lambda head: b"HTTP/1.1 200 OK\r\nX-Up\xe9: v\r\nContent-Length: 2\r\n\r\n{}")
    proxy = await start_proxy(upstream=up.url)
    client_side = await exchange(proxy.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-N\xe9: v\r\n\r\n", timeout=BOUND)
    assert client_side.status == 400 and up.heads == []
    upstream_side = await exchange(proxy.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", timeout=BOUND)
    assert upstream_side.status == 502 and upstream_side.headers["x-proxy-error"] == "invalid_upstream_response"


UPSTREAM_HEAD = b"HTTP/1.1 200 Caf\xe9 \xff OK\r\nX-Up: " + OBS + b"\r\nContent-Type: text/plain\r\n"
BIG = 100_000  # above the 64 KiB read whole before the commit: streamed after it
FRAMINGS = {
    # name: (client request, upstream reply, framing headers the client must see)
    "small body, read whole": (b"GET /v1/files/f/content HTTP/1.1\r\nHost: x\r\n\r\n",
                               UPSTREAM_HEAD + b"Content-Length: 2\r\n\r\n{}", [b"Content-Length: 2"]),
    "chunked, streamed": (b"GET /v1/files/f/content HTTP/1.1\r\nHost: x\r\n\r\n",
                          UPSTREAM_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                          [b"Transfer-Encoding: chunked"]),
    "long body, streamed": (b"GET /v1/files/f/content HTTP/1.1\r\nHost: x\r\n\r\n",
                            UPSTREAM_HEAD + b"Content-Length: %d\r\n\r\n" % BIG + b"x" * BIG,
                            [b"Content-Length: %d" % BIG]),
    "HTTP/1.0 client, streamed": (b"GET /v1/files/f/content HTTP/1.0\r\nHost: x\r\n\r\n",
                                  UPSTREAM_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", []),
    "HEAD": (b"HEAD /v1/files/f/content HTTP/1.1\r\nHost: x\r\n\r\n",
             UPSTREAM_HEAD + b"Content-Length: 7\r\n\r\n", [b"Content-Length: 7"]),
}


@pytest.mark.parametrize("case", list(FRAMINGS))
async def test_response_header_bytes_reach_the_client_unchanged(start_proxy, raw_upstream, case):
    """aiohttp's serializer drops every byte of a header value or reason phrase that is not UTF-8 (`caf-end`)
    and adds Server and a default Content-Type: a streamed answer's head is now written by the proxy,
    as a body read whole already was. The client gets the upstream's lines, the proxy's own
    (x-proxy-attempts, Date where the upstream sent none) and the framing for its connection."""
    request, response, framing = FRAMINGS[case]
    up = await raw_upstream(lambda head: response)
    proxy = await start_proxy(upstream=up.url)
    if request.startswith(b"HEAD"):
        head = await head_only(proxy.url, request)
    else:
        reply = await exchange(proxy.url, request, timeout=BOUND)
        assert not reply.timed_out and reply.body in (b"{}", b"2\r\n{}\r\n0\r\n\r\n", b"x" * BIG), case
        head = reply.raw
    version = request.split(b"\r\n", 1)[0][-3:]  # the client's: 1.1 or 1.0
    assert head.startswith(b"HTTP/" + version + b" 200 Caf\xe9 \xff OK\r\n"), head[:60]
    got = [line for line in lines(head) if not line.startswith(b"Date: ")]
    assert [line for line in got if line.startswith(b"x-proxy-request-id: ")] == got[3:4]  # one, random (issue 17)
    del got[3]
    assert got == [b"X-Up: " + OBS, b"Content-Type: text/plain", b"x-proxy-attempts: 1", *framing], case


async def test_event_stream_head_is_byte_identical_too(start_proxy, raw_upstream):
    """The SSE path adds its X-Accel-Buffering and judges the end marker; the upstream's bytes stay as sent."""
    events = b"data: {}\n\ndata: [DONE]\n\n"
    up = await raw_upstream(lambda head: b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Up: " + OBS
                            + b"\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(events) + events + b"\r\n0\r\n\r\n")
    proxy = await start_proxy(upstream=up.url)
    body = b'{"stream":true}'
    reply = await exchange(proxy.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                           % len(body) + body, timeout=BOUND)
    assert reply.status == 200 and reply.body.endswith(b"0\r\n\r\n") and b"data: [DONE]" in reply.body
    assert b"X-Up: " + OBS in lines(reply.raw) and b"X-Accel-Buffering: no" in lines(reply.raw)


# ----------------------------------------------------------------------------- item 9: two Connection headers

async def test_header_named_in_a_second_connection_header_stays_behind(start_proxy, raw_upstream):
    """RFC 9110 7.6.1: every Connection field lists hop-by-hop headers; only the first was read."""
    up = await raw_upstream(lambda head: b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: x-up-hop\r\n"
                            b"X-Up-Hop: one-hop\r\nX-Up-End: kept\r\nContent-Length: 2\r\n\r\n{}")
    proxy = await start_proxy(upstream=up.url)
    reply = await exchange(proxy.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                           b"Connection: x-client-hop\r\nX-Client-Hop: one-hop\r\nX-Client-End: kept\r\n\r\n",
                           timeout=BOUND)
    sent = [line.lower() for line in lines(up.heads[-1])]
    assert b"x-client-end: kept" in sent and not [s for s in sent if s.startswith((b"x-client-hop", b"connection"))]
    assert reply.status == 200 and reply.headers.get("x-up-end") == "kept"
    assert "x-up-hop" not in reply.headers, reply.raw


# ----------------------------------------------------------------------------- item 5: masking by shape

# A real OpenAI key's shape without its sk- prefix: every one holds T3BlbkFJ (base64 of "OpenAI").
PREFIXLESS = "proj-" + CANARY + "T3BlbkFJ" + "Ab12Cd34"
AZURE_STYLE = "0123456789abcdef0123456789abcdef"  # a bare 32-hex-digit key as a whole path segment
SECRET_PATHS = {
    f"/v1/models/id_{TEST_KEY}": f"/v1/models/id_sk-...{TEST_KEY[-4:]}",
    f"/v1/files/{PREFIXLESS}/content": f"/v1/files/...{PREFIXLESS[-4:]}/content",
    f"/v1/x/{AZURE_STYLE}/y": "/v1/x/...cdef/y",
}
ORDINARY_PATHS = [
    "/v1/files/file-AbCdEf0123456789xyzw/content",
    "/v1/responses/resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "/v1/chat/completions/chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "/v1/batches/batch_67d0b0d8c3c48190a4a5f3b1d7d2e6f3",
    "/v1/models/ft:gpt-4o-mini-2024-07-18:my-org:custom:9xyzABCD",
    "/v1/models/risk-assessment-0123456789abcdef0123",
    "/v1/x/123e4567-e89b-12d3-a456-426614174000",
]


async def test_keys_anywhere_in_a_path_are_masked_in_the_request_log_line(tmp_path, mock, proxy_process):
    """The `request` line of a real process: a key behind `id_`, a key without its sk- prefix, and a
    bare random secret as a path segment are masked; OpenAI's ordinary ids are logged as they are."""
    p = await proxy_process("--config", str(write_config(tmp_path, mock.url)), "--port", "0", "--admin-port", "0")
    for path in [*SECRET_PATHS, *ORDINARY_PATHS]:
        reply = await exchange(p.traffic, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), timeout=BOUND)
        assert reply.status is not None
    seen: list[dict] = []
    while len(seen) < len(SECRET_PATHS) + len(ORDINARY_PATHS):  # the lines in order, each read once
        seen.append(await p.wait_event("request", where=lambda line: all(line is not s for s in seen)))
    assert [line["path"] for line in seen] == [*SECRET_PATHS.values(), *ORDINARY_PATHS]
    assert CANARY not in repr(p.lines)


@pytest.mark.parametrize("text, expected", [
    (f"/v1/models?after=x&key_id={AZURE_STYLE}", "/v1/models?after=x&key_id=...cdef"),  # a query value
    (f"GET /v1/x?token={TEST_KEY}", f"GET /v1/x?token=sk-...{TEST_KEY[-4:]}"),
    ("/v1/x/sess-AbCdEf0123456789AbCdEf0123456789wxyz", "/v1/x/...wxyz"),  # session keys
    (f"/v1/x/{'ab' * 20}", f"/v1/x/{'ab' * 20}"),  # letters only: a word, not a secret
    ("/v1/x/" + "1" * 40, "/v1/x/" + "1" * 40),  # digits only: a number
])
def test_mask_rules_for_queries_and_edge_shapes(text, expected):
    assert mask(text) == expected and mask(expected) == expected
