"""The response to the client as bytes on the wire: a body read whole is written in one piece by
the proxy itself (relay.send_complete), so what aiohttp's Response would have added is checked
here: the client's HTTP version, Content-Length, Date, and the keep-alive choice."""

from __future__ import annotations

import asyncio

from proxy.testing import Raw, Respond
from tests.conftest import RunningProxy
from tests.reliability.rawhttp import parse_reply

PATH = "/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[]}'


def post(version: str = "1.1", *extra: str) -> bytes:
    head = [f"POST {PATH} HTTP/{version}", "Host: x", "Content-Type: application/json",
            f"Content-Length: {len(BODY)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + BODY


async def converse(proxy: RunningProxy, *requests: bytes) -> tuple[list[tuple[int | None, dict, bytes]], bool]:
    """Send each request on one connection after the previous answer; (answers, closed by the proxy)."""
    reader, writer = await _connect(proxy)
    answers = []
    buf = b""
    try:
        for req in requests:
            writer.write(req)
            while True:
                status, headers, body, complete = parse_reply(buf)
                if complete:
                    head_len = buf.index(b"\r\n\r\n") + 4
                    buf = buf[head_len + len(body):]
                    answers.append((status, headers, body))
                    break
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                if not chunk:
                    return answers, True
                buf += chunk
        closed = await asyncio.wait_for(reader.read(1), 0.2) == b"" if answers else False
    except asyncio.TimeoutError:
        closed = False  # still open: nothing more came
    finally:
        writer.close()
    return answers, closed


async def _connect(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def until_closed(proxy: RunningProxy, request: bytes) -> bytes:
    """Everything the proxy sends on a fresh connection until it closes it (which it must, within 5 s)."""
    reader, writer = await _connect(proxy)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_keep_alive_http11_answers_on_one_connection(proxy, mock):
    mock.script(PATH, Respond(200, {"n": 1}), Respond(200, {"n": 2}))
    answers, closed = await converse(proxy, post(), post())
    assert [(s, b) for s, _, b in answers] == [(200, b'{"n":1}'), (200, b'{"n":2}')]
    for _, headers, body in answers:
        assert headers["content-length"] == str(len(body))
        assert "connection" not in headers
        assert headers["x-proxy-attempts"] == "1"
    assert not closed


async def test_connection_close_is_answered_and_honoured(proxy, mock):
    mock.script(PATH, Respond(200, {"n": 1}))
    answers, closed = await converse(proxy, post("1.1", "Connection: close"))
    (status, headers, body), = answers
    assert (status, headers["connection"], body) == (200, "close", b'{"n":1}')
    assert closed


async def test_http10_client_gets_http10_and_its_keep_alive_choice(proxy, mock):
    mock.script(PATH, Respond(200, {"n": 1}), Respond(200, {"n": 2}), Respond(200, {"n": 3}))
    raw = await until_closed(proxy, post("1.0"))  # HTTP/1.0 without keep-alive: the proxy closes
    assert raw.startswith(b"HTTP/1.0 200 ")
    assert parse_reply(raw)[2] == b'{"n":1}'
    answers, closed = await converse(proxy, post("1.0", "Connection: keep-alive"), post("1.0", "Connection: keep-alive"))
    assert [(s, h["connection"], b) for s, h, b in answers] == [(200, "keep-alive", b'{"n":2}'),
                                                              (200, "keep-alive", b'{"n":3}')]
    assert not closed


async def test_date_is_the_upstreams_or_added_once(proxy, mock):
    mock.script(PATH, Respond(200, {"n": 1}))  # the mock (aiohttp) sends its own Date
    (status, headers, _), = (await converse(proxy, post()))[0]
    assert status == 200 and headers["date"].endswith(" GMT")
    # an upstream without Date: the proxy adds one (RFC 9110 6.6.1), still one header
    mock.script(PATH, Raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
    raw = await until_closed(proxy, post("1.1", "Connection: close"))
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert head.count(b"\r\ndate: ") == 1 and raw.endswith(b"\r\n\r\n{}")
    assert b"content-type: application/json" in head  # nothing the upstream sent is replaced


async def test_head_and_204_keep_their_empty_bodies(proxy, mock):
    mock.script("/v1/models", Respond(204, None))
    raw = await until_closed(proxy, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 204 ") and raw.endswith(b"\r\n\r\n")
    assert b"content-length" not in raw.lower()


async def test_proxy_made_errors_on_the_wire(start_proxy):
    dead = await start_proxy({"defaults": {"retry": {"max_attempts": 1}}}, upstream="http://127.0.0.1:9")
    answers, closed = await converse(dead, post(), post())
    assert len(answers) == 2 and not closed  # the connection stays usable after a proxy-made error
    for status, headers, body in answers:
        assert status == 502 and headers["content-type"] == "application/json"
        assert headers["x-proxy-error"] == "upstream_connect_error" and headers["x-proxy-attempts"] == "1"
        assert headers["content-length"] == str(len(body)) and b'"type":"proxy_error"' in body
        assert headers["date"].endswith(" GMT")
    raw = await until_closed(dead, b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 502 ") and raw.endswith(b"\r\n\r\n")  # no body after a HEAD


async def _closed_after(proxy: RunningProxy, first: bytes, trickle: bytes = b"") -> float:
    """Send `first`, then one byte of `trickle` per 50 ms; seconds until the proxy closes."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await _connect(proxy)
    writer.write(first)

    async def dribble() -> None:
        for byte in trickle:
            await asyncio.sleep(0.05)
            writer.write(bytes([byte]))

    task = asyncio.ensure_future(dribble())
    try:
        while await asyncio.wait_for(reader.read(65536), 5):
            pass  # a response, if any; the close is what counts
        return loop.time() - began
    finally:
        task.cancel()
        writer.close()


async def test_idle_and_trickling_connections_are_closed(start_proxy, mock):
    proxy = await start_proxy(keepalive_timeout=0.3)
    # idle after a request: closed once the keep-alive time has passed
    mock.script(PATH, Respond(200, {"n": 1}))
    assert 0.25 < await _closed_after(proxy, post()) < 3
    # a client that never finishes its headers (slowloris) is cut just the same
    assert 0.25 < await _closed_after(proxy, b"POST /v1/chat/completions HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100) < 3
