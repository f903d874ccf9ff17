"""proxy.client and proxy.upstream.Pool: the proxy's keep-alive HTTP/1.1 upstream client,
against real servers on 127.0.0.1.

Servers: the mock upstream (scripted faults), a small aiohttp app that reports raw headers and
which connection carried each request, and raw asyncio servers for what aiohttp will not send
(stale connections, HTTP/1.0, broken framing). Every wait is on an event; the only clocks are
the timeouts under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from yarl import URL

from proxy.classify import Category, UpstreamUnreachable, classify_exception, failure_detail
from proxy.client import Response
from proxy.upstream import Pool
from proxy.testing import (
    MODELS_BODY,
    CutBody,
    MockUpstream,
    Stall,
    WaitGate,
    mock_bytes,
    mock_bytes_sha256,
)

MiB = 1024 * 1024
T = aiohttp.ClientTimeout(total=10, sock_connect=2, sock_read=5)
CHAT = "/v1/chat/completions"
SSE_REQUEST = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}'
SECRET = "sk-secret-canary"


def url(base: str, path: str) -> URL:
    return URL(base + path, encoded=True)


async def until(predicate: Callable[[], bool], turns: int = 100_000) -> None:
    """Yield to the loop (it polls sockets on every turn) until `predicate` holds."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def chunks(data: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in data:
        yield chunk


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(base: str, max_connections: int = 8, **kw: Any) -> Pool:
        c = Pool(base, max_connections=max_connections, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


# --------------------------------------------------------------------------- an aiohttp app


class App:
    """/echo reports the raw request; /head and /204 answer without a body; /gate waits."""

    def __init__(self) -> None:
        self.peers: list[int] = []  # client port of each request: one value per connection
        self.gate = asyncio.Event()
        self.inflight = 0
        self.max_inflight = 0
        self.arrived = asyncio.Condition()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_get("/head", self._head)  # allow_head: HEAD too
        app.router.add_route("GET", "/204", self._no_content)
        app.router.add_route("GET", "/gate", self._gate)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self.gate.set()
        for _ in range(2):
            await asyncio.sleep(0)
        assert self._runner is not None
        await self._runner.cleanup()

    async def _seen(self, request: web.Request) -> None:
        self.peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        async with self.arrived:
            self.arrived.notify_all()

    async def _echo(self, request: web.Request) -> web.Response:
        await self._seen(request)
        try:
            body = await request.read()
        except ConnectionError:  # the client broke its request off
            return web.Response(status=400)
        return web.json_response({
            "method": request.method, "target": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
        })

    async def _head(self, request: web.Request) -> web.Response:
        await self._seen(request)
        return web.Response(body=b"h" * 100, content_type="text/plain")

    async def _no_content(self, request: web.Request) -> web.Response:
        await self._seen(request)
        return web.Response(status=204)

    async def _gate(self, request: web.Request) -> web.Response:
        await self._seen(request)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await self.gate.wait()
        finally:
            self.inflight -= 1
        return web.Response(text="passed")

    async def wait_for(self, n: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.peers) >= n)


@pytest.fixture
async def app() -> AsyncIterator[App]:
    a = App()
    await a.start()
    yield a
    await a.close()


# --------------------------------------------------------------------------- raw servers

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """asyncio.start_server with a per-connection script; counts and closes its connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        s = RawServer(handler)
        await s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        await s.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in fields:
        return head, await reader.readexactly(int(fields["content-length"]))
    body = b""
    if fields.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
    return head, body


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


# --------------------------------------------------------------------------- round trips


async def test_post_json_round_trip_keeps_header_order_and_case(app: App, clients) -> None:
    c = clients(app.url)
    given = [("Authorization", "Bearer " + SECRET), ("content-type", "application/json"),
             ("X-Stainless-Lang", "python"), ("accept", "*/*"), ("x-Dup", "1"), ("X-dup", "2")]
    body = b'{"model":"gpt-4o","input":"hi"}'
    resp = await c.request("POST", url(app.url, "/echo?api-version=1&key=" + SECRET), given, body, T)
    assert isinstance(resp, Response)
    assert (resp.status, resp.reason) == (200, "OK")
    assert resp.headers["Content-Type"].startswith("application/json")
    echo = json.loads(await resp.read())
    resp.release()
    port = URL(app.url).port
    assert echo["method"] == "POST"
    assert echo["target"] == "/echo?api-version=1&key=" + SECRET
    assert echo["headers"] == [["Host", f"127.0.0.1:{port}"], *map(list, given), ["Content-Length", str(len(body))]]
    assert echo["sha256"] == hashlib.sha256(body).hexdigest()
    assert resp.content_length == len(await resp.read())


async def test_get_sends_no_body_framing_and_host_is_the_urls(app: App, clients) -> None:
    c = clients(app.url)
    given = [("host", "example.test"), ("Transfer-Encoding", "chunked"), ("content-length", "9")]
    resp = await c.request("GET", url(app.url, "/echo"), given, None, T)
    echo = json.loads(await resp.read())
    assert echo["headers"] == [["Host", f"127.0.0.1:{URL(app.url).port}"]]  # no length, no UA/Accept
    resp = await c.request("POST", url(app.url, "/echo"), [], b"", T)
    echo = json.loads(await resp.read())
    assert echo["headers"][1:] == [["Content-Length", "0"]]


async def test_keep_alive_reuses_one_connection(app: App, clients) -> None:
    c = clients(app.url)
    for i in range(10):
        method, data = ("POST", b"x" * i) if i % 2 else ("GET", None)
        resp = await c.request(method, url(app.url, "/echo"), [], data, T)
        assert resp.status == 200
        await resp.read()
        resp.release()
    assert len(set(app.peers)) == 1 and len(app.peers) == 10
    assert (c.connections_made, c.open_connections, c.idle_connections, c.in_use) == (1, 1, 1, 0)


async def test_head_has_no_body_and_the_connection_is_reused(app: App, clients) -> None:
    c = clients(app.url)
    resp = await c.request("HEAD", url(app.url, "/head"), [], None, T)
    assert resp.status == 200 and resp.content_length == 100
    assert await resp.read() == b""
    resp.release()
    resp = await c.request("GET", url(app.url, "/head"), [], None, T)
    assert await resp.read() == b"h" * 100
    resp.release()
    assert len(set(app.peers)) == 1 and c.connections_made == 1


async def test_204_then_reuse(app: App, clients) -> None:
    c = clients(app.url)
    resp = await c.request("GET", url(app.url, "/204"), [], None, T)
    assert resp.status == 204 and await resp.content.readany() == b""
    resp.release()
    resp = await c.request("GET", url(app.url, "/204"), [], None, T)
    assert resp.status == 204
    resp.release()
    assert len(set(app.peers)) == 1 and c.connections_made == 1


async def test_interim_1xx_response_is_skipped(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK_RESPONSE)
        await reader.read()

    server = await raw(serve)
    resp = await clients(server.url).request("GET", url(server.url, "/"), [], None, T)
    assert resp.status == 200 and await resp.read() == b"ok"


# --------------------------------------------------------------------------- the pool


async def test_stale_pooled_connection_is_retried_for_an_idempotent_bytes_body(raw, clients) -> None:
    bodies: list[tuple[int, bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        _, body = await read_request(reader)
        bodies.append((n, body))
        writer.write(OK_RESPONSE)
        await read_request(reader)  # the next request on this connection: hang up unanswered
        writer.transport.abort()

    server = await raw(serve)
    c = clients(server.url)
    for body in (b"first", b"second"):
        resp = await c.request("PUT", url(server.url, "/v1/x"), [], body, T)
        assert resp.status == 200 and await resp.read() == b"ok"
    assert bodies == [(1, b"first"), (2, b"second")]  # resent whole on a fresh connection
    assert server.connections == 2 and c.connections_made == 2 and c.open_connections == 1


async def test_a_resent_request_keeps_the_total_timeout(raw, clients) -> None:
    """The stale connection's failure ends the first exchange (and its timer): the resend on a fresh
    connection must still end at `total`, not at the far longer first-byte timeout."""
    gone = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(OK_RESPONSE)
            await read_request(reader)
            writer.transport.abort()  # the pooled connection, closed unanswered
        else:
            await gone.wait()  # the fresh one never answers

    server = await raw(serve)
    c = clients(server.url)
    resp = await c.request("GET", url(server.url, "/v1/x"), [], None, T)
    assert await resp.read() == b"ok"
    short = aiohttp.ClientTimeout(total=0.3, sock_connect=60, sock_read=60)
    try:
        async with asyncio.timeout(20) as guard:
            with pytest.raises(asyncio.TimeoutError):
                await c.request("GET", url(server.url, "/v1/x"), [], None, short)
        assert not guard.expired() and server.connections == 2
    finally:
        gone.set()


async def test_stale_pooled_connection_never_resends_a_post(raw, clients) -> None:
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        _, body = await read_request(reader)
        bodies.append(body)
        writer.write(OK_RESPONSE)
        await read_request(reader)
        writer.transport.abort()

    server = await raw(serve)
    c = clients(server.url)
    resp = await c.request("POST", url(server.url, "/v1/x"), [], b"first", T)
    assert await resp.read() == b"ok"
    with pytest.raises(aiohttp.ServerDisconnectedError):  # the route's retry policy decides, not the pool
        await c.request("POST", url(server.url, "/v1/x"), [], b"second", T)
    assert bodies == [b"first"]


async def test_stale_pooled_connection_never_resends_a_streamed_body(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK_RESPONSE)
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server = await raw(serve)
    c = clients(server.url)
    resp = await c.request("POST", url(server.url, "/v1/x"), [], b"first", T)
    assert await resp.read() == b"ok"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await c.request("POST", url(server.url, "/v1/x"), [], chunks(iter([b"a" * 1000] * 50)), T)
    assert server.connections == 1 and c.open_connections == 0 and c.in_use == 0


async def test_pool_limit_queues_requests_and_total_bounds_the_wait(app: App, clients) -> None:
    c = clients(app.url, max_connections=2)

    async def get() -> bytes:
        resp = await c.request("GET", url(app.url, "/gate"), [], None, T)
        try:
            return await resp.read()
        finally:
            resp.release()

    tasks = [asyncio.create_task(get()) for _ in range(5)]
    await app.wait_for(2)
    assert c.open_connections == 2 and c.in_use == 2
    with pytest.raises(asyncio.TimeoutError) as info:  # waiting for a slot counts against total
        await c.request("GET", url(app.url, "/gate"), [], None, aiohttp.ClientTimeout(total=0.05))
    assert not isinstance(info.value, aiohttp.ServerTimeoutError)
    app.gate.set()
    assert await asyncio.gather(*tasks) == [b"passed"] * 5
    assert app.max_inflight == 2 and len(set(app.peers)) == 2
    assert (c.connections_made, c.open_connections, c.in_use) == (2, 2, 0)


async def test_connect_timeout_bounds_the_wait_for_a_slot(app: App, clients) -> None:
    c = clients(app.url, max_connections=1)
    busy = asyncio.create_task(c.request("GET", url(app.url, "/gate"), [], None, T))
    await app.wait_for(1)
    with pytest.raises(aiohttp.ConnectionTimeoutError):
        await c.request("GET", url(app.url, "/gate"), [], None, aiohttp.ClientTimeout(total=5, connect=0.05))
    app.gate.set()
    resp = await busy
    assert await resp.read() == b"passed"
    assert (c.open_connections, c.in_use, c._queued) == (1, 0, 0)


async def test_cancelled_waiters_leak_no_slot(app: App, clients) -> None:
    c = clients(app.url, max_connections=2)

    async def get() -> bytes:
        resp = await c.request("GET", url(app.url, "/gate"), [], None, T)
        return await resp.read()

    tasks = [asyncio.create_task(get()) for _ in range(8)]
    await app.wait_for(2)
    for task in tasks[2::2]:  # three of the six waiting in the pool give up
        task.cancel()
    app.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for r in results if r == b"passed"] == [b"passed"] * 5
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 3
    assert (c.open_connections, c.in_use, c._queued) == (2, 0, 0)


async def test_a_slot_freed_for_a_cancelled_waiter_is_passed_on(raw, clients) -> None:
    finish = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            await finish.wait()
            finish.clear()
            writer.write(b"ok")

    server = await raw(serve)
    c = clients(server.url, max_connections=1)
    first = await c.request("GET", url(server.url, "/"), [], None, T)
    waiter = asyncio.create_task(c.request("GET", url(server.url, "/"), [], None, T))
    patient = asyncio.create_task(c.request("GET", url(server.url, "/"), [], None, T))
    await until(lambda: c._queued == 2)
    first.close()  # body unread: dropped; its slot goes to the first waiter...
    waiter.cancel()  # ...which gives up before it runs, passing the slot on to the next
    with pytest.raises(asyncio.CancelledError):
        await waiter
    resp = await patient  # connected on the slot it was passed
    finish.set()
    assert await resp.read() == b"ok"
    resp.close()  # a no-op: the whole body had arrived, so the connection was back in the pool
    assert (c.open_connections, c.idle_connections, server.connections, c._queued) == (1, 1, 2, 0)

    second = await c.request("GET", url(server.url, "/"), [], None, T)
    waiter = asyncio.create_task(c.request("GET", url(server.url, "/"), [], None, T))
    await until(lambda: c._queued == 1)
    finish.set()  # the body ends: the connection goes back to the pool and the slot to the waiter...
    assert await second.read() == b"ok"
    waiter.cancel()  # ...which is cancelled before it can run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (c.open_connections, c.idle_connections, c.in_use, c._queued) == (1, 1, 0, 0)
    third = await c.request("GET", url(server.url, "/"), [], None, T)  # the slot was not lost
    finish.set()
    assert await third.read() == b"ok"
    assert (server.connections, c.connections_made) == (2, 2)


async def test_idle_connections_expire_after_keepalive_timeout(raw, clients) -> None:
    gone = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK_RESPONSE)
        assert await reader.read() == b""  # until the client hangs up
        gone.set()

    server = await raw(serve)
    c = clients(server.url, keepalive_timeout=0.05)
    resp = await c.request("GET", url(server.url, "/"), [], None, T)
    assert await resp.read() == b"ok" and c.idle_connections == 1
    await asyncio.wait_for(gone.wait(), 5)
    assert (c.open_connections, c.idle_connections) == (0, 0)


async def test_upstream_closing_an_idle_connection_frees_its_slot(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK_RESPONSE)
        await writer.drain()
        writer.close()

    server = await raw(serve)
    c = clients(server.url, max_connections=1)
    resp = await c.request("GET", url(server.url, "/"), [], None, T)
    assert await resp.read() == b"ok"
    await until(lambda: c.open_connections == 0)
    resp = await c.request("GET", url(server.url, "/"), [], None, T)
    assert await resp.read() == b"ok" and server.connections == 2


async def test_connection_close_and_http10_responses_are_not_reused(raw, clients) -> None:
    answers = [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", OK_RESPONSE, OK_RESPONSE]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(answers.pop(0))

    server = await raw(serve)
    c = clients(server.url)
    for _ in range(4):
        resp = await c.request("GET", url(server.url, "/"), [], None, T)
        assert await resp.read() == b"ok"
        resp.release()
    assert server.connections == 3 and c.connections_made == 3  # the last two share one
    assert c.open_connections == 1


async def test_read_until_close_body(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await writer.drain()
        writer.write(b"world")
        writer.close()

    server = await raw(serve)
    c = clients(server.url)
    resp = await c.request("GET", url(server.url, "/"), [], None, T)
    assert resp.content_length is None and await resp.read() == b"hello world"
    resp.release()
    assert c.open_connections == 0


# --------------------------------------------------------------------------- connect failures


async def test_connect_refused(clients) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = clients(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamUnreachable) as info:
        await c.request("GET", url(f"http://127.0.0.1:{port}", "/v1/x?key=" + SECRET), [], None, T)
    assert isinstance(info.value.os_error, ConnectionRefusedError)
    assert classify_exception(info.value) is Category.CONNECT
    assert failure_detail(info.value) == "the connection was refused"
    assert f"127.0.0.1:{port}" in str(info.value) and SECRET not in str(info.value)
    assert c.open_connections == 0


async def test_connect_timeout(clients) -> None:
    """A listener whose accept queue is full (backlog 0, never accepting): SYNs go unanswered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        loop = asyncio.get_running_loop()
        fillers: list[socket.socket] = []
        try:
            for _ in range(4):  # fill the queue: stop at the first connect that does not complete
                s = socket.socket()
                s.setblocking(False)
                fillers.append(s)
                try:
                    await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 0.2)
                except TimeoutError:
                    break
            else:
                pytest.skip("this kernel accepts every connection: cannot make a connect hang")
            c = clients(f"http://127.0.0.1:{port}")
            timeout = aiohttp.ClientTimeout(total=5, sock_connect=0.1)
            with pytest.raises(aiohttp.ConnectionTimeoutError) as info:
                await c.request("GET", url(f"http://127.0.0.1:{port}", "/?key=" + SECRET), [], None, timeout)
            assert classify_exception(info.value) is Category.CONNECT and SECRET not in str(info.value)
            assert c.open_connections == 0
        finally:
            for s in fillers:
                s.close()


async def test_dns_failure(clients, monkeypatch: pytest.MonkeyPatch) -> None:
    c = clients("https://api.openai.invalid/v1")

    async def fail(*args: Any, **kw: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fail)
    with pytest.raises(UpstreamUnreachable) as info:
        await c.request("GET", URL("https://api.openai.invalid/v1/models"), [], None, T)
    assert failure_detail(info.value) == "its host name could not be resolved"
    assert classify_exception(info.value) is Category.CONNECT
    assert c.open_connections == 0


# --------------------------------------------------------------------------- timeouts


async def test_slow_headers_raise_socket_timeout(mock: MockUpstream, clients) -> None:
    mock.script("/v1/models", WaitGate("never"))
    c = clients(mock.url)
    with pytest.raises(aiohttp.SocketTimeoutError) as info:
        await c.request("GET", url(mock.url, "/v1/models"), [], None,
                        aiohttp.ClientTimeout(total=5, sock_read=0.1))
    assert classify_exception(info.value) is Category.TIMEOUT
    await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)  # the connection was dropped
    assert c.open_connections == 0


async def test_total_timeout_while_waiting_for_headers(mock: MockUpstream, clients) -> None:
    mock.script("/v1/models", WaitGate("never"))
    c = clients(mock.url)
    with pytest.raises(asyncio.TimeoutError) as info:
        await c.request("GET", url(mock.url, "/v1/models"), [], None, aiohttp.ClientTimeout(total=0.1, sock_read=5))
    assert not isinstance(info.value, aiohttp.ServerTimeoutError)
    assert c.open_connections == 0


async def sse(c: Pool, mock: MockUpstream, timeout: aiohttp.ClientTimeout = T) -> Response:
    resp = await c.request("POST", url(mock.url, CHAT), [("Content-Type", "application/json")], SSE_REQUEST, timeout)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    return resp


async def test_idle_timeout_after_set_read_timeout(mock: MockUpstream, clients) -> None:
    mock.script(CHAT, Stall(after_events=1, gate="go"))
    c = clients(mock.url)
    resp = await sse(c, mock)
    resp.set_read_timeout(0.1)
    try:
        assert b"tok0" in await resp.content.readany()
        with pytest.raises(aiohttp.SocketTimeoutError):
            await resp.content.readany()
    finally:
        resp.close()
    assert c.open_connections == 0


async def test_sock_read_restarts_on_every_chunk() -> None:
    """Ten frames 30 ms apart under a 200 ms sock_read: the stream outlasts the timeout, no gap does."""
    async with MockUpstream(sse_events=10, sse_interval=0.03) as mock:
        c = Pool(mock.url, max_connections=1)
        try:
            resp = await sse(c, mock, aiohttp.ClientTimeout(total=10, sock_read=0.2))
            body = await resp.read()
            assert body.count(b"tok") == 10 and body.endswith(b"data: [DONE]\n\n")
        finally:
            await c.close()


async def test_total_timeout_during_the_body(mock: MockUpstream, clients) -> None:
    mock.script(CHAT, Stall(after_events=1, gate="go"))
    c = clients(mock.url)
    resp = await sse(c, mock, aiohttp.ClientTimeout(total=0.3, sock_read=5))
    try:
        assert b"tok0" in await resp.content.readany()
        with pytest.raises(asyncio.TimeoutError) as info:
            await resp.content.readany()
        assert not isinstance(info.value, aiohttp.ServerTimeoutError)  # total, not sock_read
        assert classify_exception(info.value) is Category.TIMEOUT
    finally:
        resp.close()
    await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)
    assert c.open_connections == 0


# --------------------------------------------------------------------------- bodies


async def test_cut_body_raises_payload_error(mock: MockUpstream, clients) -> None:
    mock.script("/v1/files/file-size-300000/content", CutBody(after_bytes=70_000))
    c = clients(mock.url)
    resp = await c.request("GET", url(mock.url, "/v1/files/file-size-300000/content"), [], None, T)
    assert resp.content_length == 300_000
    with pytest.raises(aiohttp.ClientPayloadError) as info:
        await resp.read()
    assert classify_exception(info.value) is Category.INVALID_RESPONSE
    assert c.open_connections == 0


async def test_bad_chunking_raises_payload_error(raw, clients) -> None:
    proceed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await proceed.wait()
        writer.write(b"zz\r\n")  # not a chunk size
        await reader.read()

    server = await raw(serve)
    c = clients(server.url)
    resp = await c.request("GET", url(server.url, "/"), [], None, T)
    assert await resp.content.readany() == b"hello"
    proceed.set()
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.content.readany()
    resp.close()
    assert c.open_connections == 0


async def test_bad_chunking_in_the_first_packet(raw, clients) -> None:
    """Head and broken body in one read: the parser fails before the response is delivered."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        await reader.read()

    server = await raw(serve)
    c = clients(server.url)
    with pytest.raises(aiohttp.ClientResponseError) as info:  # as with a ClientSession
        await c.request("GET", url(server.url, "/"), [], None, T)
    assert classify_exception(info.value) is Category.INVALID_RESPONSE
    assert c.open_connections == 0


async def test_unparsable_status_line(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 OK-ish " + SECRET.encode() + b"\r\n\r\n")
        await reader.read()

    server = await raw(serve)
    c = clients(server.url)
    with pytest.raises(aiohttp.ClientResponseError) as info:
        await c.request("GET", url(server.url, "/v1/x?key=" + SECRET), [("Authorization", SECRET)], None, T)
    assert classify_exception(info.value) is Category.INVALID_RESPONSE
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert c.open_connections == 0


async def test_disconnect_mid_headers_carries_no_header_values(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Echo: " + SECRET.encode() + b"\r\n")
        await writer.drain()
        writer.close()

    server = await raw(serve)
    c = clients(server.url)
    with pytest.raises(aiohttp.ServerDisconnectedError) as info:
        await c.request("GET", url(server.url, "/"), [], None, T)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert classify_exception(info.value) is Category.NETWORK


async def test_chunked_response(mock: MockUpstream, clients) -> None:
    c = clients(mock.url)
    resp = await sse(c, mock)
    assert resp.content_length is None and resp.headers["Transfer-Encoding"] == "chunked"
    body = await resp.read()
    assert body.startswith(b"data: ") and body.endswith(b"data: [DONE]\n\n") and body.count(b"tok") == 5
    resp = await sse(c, mock)  # the connection came back clean
    await resp.read()
    assert c.connections_made == 1


async def test_sse_arrives_chunk_by_chunk(mock: MockUpstream, clients) -> None:
    mock.script(CHAT, Stall(after_events=1, gate="second"))
    c = clients(mock.url)
    resp = await sse(c, mock)
    first = await resp.content.readany()  # before the server may send anything more
    assert b"tok0" in first and b"tok1" not in first
    mock.gate("second").set()
    rest = await resp.read()
    assert b"tok1" in rest and rest.endswith(b"data: [DONE]\n\n")
    resp.release()
    assert c.idle_connections == 1


async def test_release_before_the_body_is_read_drops_the_connection(mock: MockUpstream, clients) -> None:
    c = clients(mock.url)
    # 64 MiB: more than loopback socket buffers can hold, so the mock is still writing when we leave
    resp = await c.request("GET", url(mock.url, f"/v1/files/file-size-{64 * MiB}/content"), [], None, T)
    resp.release()  # most of it still to come: not reusable
    with pytest.raises(aiohttp.ClientConnectionError):
        await resp.content.readany()
    await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)
    assert (c.open_connections, c.idle_connections) == (0, 0)


async def test_a_cut_connection_frees_its_slot_before_the_response_is_closed(mock: MockUpstream, clients) -> None:
    """The slot goes with the exchange: the upstream cutting it frees the slot, read or not."""
    mock.script("/v1/files/file-size-300000/content", CutBody(after_bytes=70_000))
    c = clients(mock.url, max_connections=1)
    resp = await c.request("GET", url(mock.url, "/v1/files/file-size-300000/content"), [], None, T)
    conn = resp.conn
    assert conn is not None
    await until(lambda: conn.transport is None)  # the upstream cut it; nobody read or closed it
    assert c.open_connections == 0
    other = await c.request("GET", url(mock.url, "/v1/models"), [], None, T)
    assert await other.read() == MODELS_BODY
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # what did arrive is not passed off as the whole body


async def test_gzip_body_passes_byte_identical(mock: MockUpstream, clients) -> None:
    c = clients(mock.url)
    resp = await c.request("GET", url(mock.url, "/v1/models"), [("Accept-Encoding", "gzip")], None, T)
    assert resp.headers["Content-Encoding"] == "gzip"
    body = await resp.read()
    assert body == gzip.compress(MODELS_BODY, mtime=0) and resp.content_length == len(body)


async def test_slow_reader_does_not_buffer_the_whole_body(mock: MockUpstream, clients) -> None:
    size = 20 * MiB
    path = f"/v1/files/file-size-{size}/content"
    c = clients(mock.url)
    resp = await c.request("GET", url(mock.url, path), [], None, T)
    digest = hashlib.sha256(await resp.content.readany())
    proto = resp.conn
    assert proto is not None
    await until(lambda: proto.paused)  # flow control stopped the socket...
    assert resp._size < MiB  # ...with a bounded buffer (high water 128 KiB)
    while chunk := await resp.content.readany():
        digest.update(chunk)
    assert digest.hexdigest() == mock_bytes_sha256(size)
    resp.release()
    assert c.idle_connections == 1


@pytest.mark.parametrize("known_length", [True, False], ids=["content-length", "chunked"])
async def test_streamed_upload_20mib(mock: MockUpstream, clients, known_length: bool) -> None:
    size = 20 * MiB
    headers = [("Content-Type", "application/octet-stream")]
    if known_length:
        headers.append(("Content-Length", str(size)))
    c = clients(mock.url)
    resp = await c.request("POST", url(mock.url, "/v1/upload-echo"), headers, chunks(mock_bytes(size)), T)
    echo = json.loads(await resp.read())
    assert (echo["body_size"], echo["body_sha256"]) == (size, mock_bytes_sha256(size))
    sent = dict(echo["headers"])
    if known_length:
        assert sent["Content-Length"] == str(size) and "Transfer-Encoding" not in sent
    else:
        assert sent["Transfer-Encoding"] == "chunked" and "Content-Length" not in sent
    assert c.connections_made == 1 and c.idle_connections == 1


async def test_large_bytes_body(app: App, clients) -> None:
    body = b"".join(mock_bytes(3 * MiB))
    c = clients(app.url)
    resp = await c.request("PUT", url(app.url, "/echo"), [], body, T)
    echo = json.loads(await resp.read())
    assert (echo["size"], echo["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


async def test_streamed_body_is_held_to_its_content_length(app: App, clients) -> None:
    c = clients(app.url)
    parts = [b"", b"abc", b"", b"defgh"]  # empty chunks are skipped (one would end a chunked body)
    resp = await c.request("POST", url(app.url, "/echo"), [], chunks(iter(parts)), T)
    echo = json.loads(await resp.read())
    assert echo["size"] == 8 and ["Transfer-Encoding", "chunked"] in echo["headers"]
    resp = await c.request("POST", url(app.url, "/echo"), [("Content-Length", "5")], chunks(iter(parts)), T)
    echo = json.loads(await resp.read())  # more than announced: exactly Content-Length bytes go
    assert (echo["size"], echo["sha256"]) == (5, hashlib.sha256(b"abcde").hexdigest())
    with pytest.raises(aiohttp.ClientConnectionError):  # fewer than announced: the request is broken
        await c.request("POST", url(app.url, "/echo"), [("Content-Length", "50")], chunks(iter(parts)), T)
    assert (c.open_connections, c.in_use) == (0, 0)  # that connection is dropped


async def test_failing_request_body_iterator(mock: MockUpstream, clients) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"part"
        raise ValueError("the client went away")

    c = clients(mock.url)
    with pytest.raises(aiohttp.ClientConnectionError) as info:
        await c.request("POST", url(mock.url, "/v1/upload-echo"), [], body(), T)
    assert isinstance(info.value.__cause__, ValueError)
    assert c.open_connections == 0


# --------------------------------------------------------------------------- cancellation


async def test_cancel_while_waiting_for_headers(mock: MockUpstream, clients) -> None:
    mock.script("/v1/models", WaitGate("never"))
    c = clients(mock.url)
    task = asyncio.create_task(c.request("GET", url(mock.url, "/v1/models"), [], None, T))
    await mock.wait_for_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)  # the server saw the disconnect
    assert (c.open_connections, c.in_use, c.idle_connections) == (0, 0, 0)


async def test_cancel_mid_body(mock: MockUpstream, clients) -> None:
    mock.script(CHAT, Stall(after_events=1, gate="never"))
    c = clients(mock.url)
    got_first = asyncio.Event()

    async def relay() -> None:
        resp = await sse(c, mock)
        try:
            await resp.content.readany()
            got_first.set()
            await resp.content.readany()
        finally:
            resp.close()  # as relay.deliver does on every path out

    task = asyncio.create_task(relay())
    await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)
    assert (c.open_connections, c.in_use) == (0, 0)


async def test_cancel_during_streamed_upload(mock: MockUpstream, clients) -> None:
    started = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        started.set()
        await asyncio.Event().wait()  # the client stalls mid-upload
        yield b"never"

    c = clients(mock.url)
    task = asyncio.create_task(c.request("POST", url(mock.url, "/v1/upload-echo"), [], body(), T))
    await started.wait()
    await mock.wait_for_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)
    assert c.open_connections == 0


async def test_close_fails_responses_in_use(mock: MockUpstream) -> None:
    mock.script(CHAT, Stall(after_events=1, gate="never"))
    c = Pool(mock.url, max_connections=1)
    resp = await sse(c, mock)
    await resp.content.readany()
    reading = asyncio.create_task(resp.content.readany())
    waiting = asyncio.create_task(c.request("GET", url(mock.url, "/v1/models"), [], None, T))
    await until(lambda: c._queued == 1)
    await c.close()
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await reading
    with pytest.raises(aiohttp.ClientConnectionError):
        await waiting
    resp.close()
    with pytest.raises(RuntimeError):
        await c.request("GET", url(mock.url, "/v1/models"), [], None, T)


# --------------------------------------------------------------------------- heads


async def test_obs_text_header_bytes_survive_both_ways(raw, clients) -> None:
    """Decoded as aiohttp decodes (UTF-8, surrogateescape): both clients give the same strings,
    and the bytes come back with .encode("utf-8", "surrogateescape"), on requests too."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))  # a GET: no body
        writer.write(b"HTTP/1.1 200 OK\r\nX-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    server = await raw(serve)
    sent = b"d\xe9j\xe0".decode("utf-8", "surrogateescape")  # as aiohttp's server parses a client's bytes
    resp = await clients(server.url).request("GET", url(server.url, "/"), [("X-Obs", sent)], None, T)
    assert resp.headers["X-Latin"].encode("utf-8", "surrogateescape") == b"caf\xe9"
    assert resp.headers["X-Utf8"] == "caf\u00e9"
    assert b"\r\nX-Obs: d\xe9j\xe0\r\n" in seen[0]


@pytest.mark.parametrize("header", [("X-Evil", "a\r\nX-Injected: 1"), ("X-Evil", "a\nb"), ("X-Evil", "nul\x00"),
                                    ("X-Evil\r\nX-Injected", "1")])
async def test_control_characters_in_request_headers_are_refused(app: App, clients, header) -> None:
    c = clients(app.url)
    with pytest.raises(ValueError):
        await c.request("GET", url(app.url, "/echo"), [header], None, T)
    assert (c.open_connections, app.peers) == (0, [])  # nothing was sent


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 9000 + b"\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
                                  b"HTTP/1.1 200 OK\r\nX-Endless: " + b"e" * (2 * MiB)],
                         ids=["a field over 8190 bytes", "over 128 fields", "a head over 1 MiB"])
async def test_oversized_response_heads_are_invalid(raw, clients, head: bytes) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(head)
        await reader.read()

    server = await raw(serve)
    c = clients(server.url)
    with pytest.raises(aiohttp.ClientResponseError) as info:
        await c.request("GET", url(server.url, "/"), [], None, T)
    assert classify_exception(info.value) is Category.INVALID_RESPONSE
    assert c.open_connections == 0


async def test_head_response_without_a_length_is_complete_at_its_headers(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        await reader.read()

    server = await raw(serve)
    c = clients(server.url)
    resp = await c.request("HEAD", url(server.url, "/"), [], None, T)
    assert resp.status == 200 and await resp.read() == b""
    assert c.in_use == 0  # no length: not reusable, so dropped rather than pooled


async def test_bytes_after_a_complete_response_spoil_only_the_connection(raw, clients) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(OK_RESPONSE + b"HTTP/1.1 200 OK\r\n")  # the start of a response nobody asked for

    server = await raw(serve)
    c = clients(server.url)
    for _ in range(2):
        resp = await c.request("GET", url(server.url, "/"), [], None, T)
        assert await resp.read() == b"ok"
    assert server.connections == 2 and c.idle_connections == 0


async def test_upload_waits_while_the_socket_buffer_is_full(raw, clients) -> None:
    """pause_writing/resume_writing: a slow upstream holds the upload; it is not buffered whole."""
    size = 32 * MiB
    reading = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reading.wait()
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(len(body))), len(body)))
        await reader.read()

    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for chunk in mock_bytes(size):
            pulled += len(chunk)
            yield chunk

    server = await raw(serve)
    c = clients(server.url)
    task = asyncio.create_task(c.request("POST", url(server.url, "/"), [("Content-Length", str(size))], body(), T))
    await until(lambda: pulled > 0)
    for _ in range(200):
        await asyncio.sleep(0)
    assert pulled < 16 * MiB  # the socket is full and nobody reads: the iterator is not drained
    reading.set()
    resp = await task
    assert await resp.read() == str(size).encode()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return crt, key


@pytest.fixture
async def tls_app(cert: tuple[Path, Path]) -> AsyncIterator[App]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*cert)
    a = App()
    await a.start(ssl_context=server_ctx)
    yield a
    await a.close()


async def test_tls_unverified_certificate_is_refused(tls_app: App, clients) -> None:
    c = clients(tls_app.url)
    with pytest.raises(UpstreamUnreachable) as info:
        await c.request("GET", url(tls_app.url, "/echo"), [], None, T)
    assert classify_exception(info.value) is Category.CONNECT
    assert failure_detail(info.value) == "its TLS certificate could not be verified"
    assert c.open_connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_tls_with_a_trusting_context(tls_app: App, clients, cert: tuple[Path, Path], host: str) -> None:
    base = tls_app.url.replace("127.0.0.1", host)
    c = clients(base, ssl_context=ssl.create_default_context(cafile=str(cert[0])))
    for _ in range(2):
        resp = await c.request("POST", url(base, "/echo"), [], b"tls", T)
        echo = json.loads(await resp.read())
        assert echo["sha256"] == hashlib.sha256(b"tls").hexdigest()
        assert ["Host", f"{host}:{URL(base).port}"] in echo["headers"]
    assert c.connections_made == 1


# --------------------------------------------------------------------------- uvloop (production's loop)


def test_under_uvloop() -> None:
    """The same client on uvloop's transports: reuse, streaming, stale retry, cancellation."""

    async def scenario() -> None:
        async with MockUpstream() as mock:
            mock.script(CHAT, Stall(after_events=1, gate="go"))
            c = Pool(mock.url, max_connections=4)
            try:
                resp = await sse(c, mock)
                assert b"tok0" in await resp.content.readany()
                mock.gate("go").set()
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
                resp = await c.request("POST", url(mock.url, "/v1/upload-echo"), [], chunks(mock_bytes(3 * MiB)), T)
                echo = json.loads(await resp.read())
                assert echo["body_sha256"] == mock_bytes_sha256(3 * MiB)
                assert c.connections_made == 1
                mock.script("/v1/models", WaitGate("never"))
                task = asyncio.create_task(c.request("GET", url(mock.url, "/v1/models"), [], None, T))
                await mock.wait_for_requests(3)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.wait_for(mock.received[2].cancelled.wait(), 5)
                assert c.open_connections == 0
            finally:
                await c.close()

        bodies: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            bodies.append((await read_request(reader))[1])
            writer.write(OK_RESPONSE)
            await read_request(reader)
            writer.transport.abort()

        server = RawServer(serve)
        await server.start()
        c = Pool(server.url, max_connections=4)
        try:
            for body in (b"one", b"two"):
                resp = await c.request("PUT", url(server.url, "/"), [], body, T)
                assert await resp.read() == b"ok"
            assert bodies == [b"one", b"two"] and server.connections == 2
        finally:
            await c.close()
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
