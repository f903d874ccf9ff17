"""Request ids (issue 17, item 2): one id per client request, sent back as x-proxy-request-id, the
`request_id` of its `request` and `retry` log lines, and quoted in every proxy-made error message.

Through the official SDK and the mock upstream, and raw sockets for what no client library sends.
Log lines are the proxy's real JSON lines on stdout (captured with capfd, then handed to the leak check).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import openai
import pytest

from proxy.testing import MockUpstream, Reset, Respond, WaitGate, error
from tests.conftest import TEST_KEY
from tests.reliability.rawhttp import exchange

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"
GENERATED = re.compile(r"[0-9a-f]{32}")


def sdk(proxy: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0, timeout=30)


def log_lines(capfd: pytest.CaptureFixture[str], leaks: Any) -> list[dict[str, Any]]:
    """The proxy's JSON log lines written so far (kept for the leak check, which reads capfd too)."""
    from proxy.logs import WRITER
    WRITER.flush()
    out = capfd.readouterr().out
    leaks.texts.append(out)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_generated_id_is_returned_and_is_the_log_lines_id(proxy, capfd, leaks):
    async with sdk(proxy) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
        stream = await client.chat.completions.with_raw_response.create(**CHAT, stream=True)
        async for _ in stream.parse():
            pass
    ids = [raw.headers["x-proxy-request-id"], stream.headers["x-proxy-request-id"]]
    assert all(GENERATED.fullmatch(i) for i in ids) and ids[0] != ids[1]
    requests = [line for line in log_lines(capfd, leaks) if line["event"] == "request"]
    assert [line["request_id"] for line in requests] == ids
    assert requests[0]["upstream_request_id"] != ids[0]  # the upstream's own x-request-id stays apart


async def test_retry_lines_share_their_requests_id_under_concurrency(start_proxy, mock: MockUpstream, capfd, leaks):
    """16 requests at once, request i failing i % 3 times first: every retry line names the request
    it belongs to, and each request's retry count is the one its own script caused."""
    proxy = await start_proxy({"defaults": {"breaker": {"failure_threshold": 100},
                                            "retry": {"budget": {"min_per_second": 1000.0}}}})
    n = 16
    for i in range(n):
        mock.script_request(f"k{i}", *[error(503)] * (i % 3), WaitGate("go"))
    async with sdk(proxy) as client:
        async def one(i: int) -> tuple[int, str]:
            raw = await client.chat.completions.with_raw_response.create(
                **CHAT, extra_headers={"x-mock-script": f"k{i}"})
            return i, raw.headers["x-proxy-request-id"]
        calls = asyncio.gather(*(one(i) for i in range(n)))
        try:
            async with asyncio.timeout(20):
                await mock.wait_for_requests(sum(i % 3 + 1 for i in range(n)), PATH)  # every final attempt waits
        finally:
            mock.gate("go").set()
        sent = dict(await calls)
    lines = log_lines(capfd, leaks)
    retries = [line["request_id"] for line in lines if line["event"] == "retry"]
    requests = {line["request_id"]: line for line in lines if line["event"] == "request"}
    assert len(set(sent.values())) == n and set(requests) == set(sent.values())
    for i, rid in sent.items():
        assert retries.count(rid) == i % 3 == requests[rid]["attempts"] - 1, i


@pytest.mark.parametrize("header", ["x-request-id", "x-client-request-id"])
async def test_a_clients_safe_id_is_echoed_and_logged(proxy, capfd, leaks, header):
    mine = "trace-01HZX:span_7.a"
    async with sdk(proxy) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT, extra_headers={header: mine})
    assert raw.headers["x-proxy-request-id"] == mine
    (line,) = [line for line in log_lines(capfd, leaks) if line["event"] == "request"]
    assert line["request_id"] == mine


async def test_x_request_id_wins_over_x_client_request_id(proxy):
    async with sdk(proxy) as client:
        raw = await client.chat.completions.with_raw_response.create(
            **CHAT, extra_headers={"x-request-id": "outer", "x-client-request-id": "inner"})
    assert raw.headers["x-proxy-request-id"] == "outer"


@pytest.mark.parametrize("value", [
    b"a" * 129,  # too long
    b"two words",
    b'quote"}{"event":"forged',  # would forge a JSON log field in a naive writer
    b"<script>alert(1)</script>",
    b"caf\xc3\xa9",  # not ASCII
    b"tab\there",  # a tab is legal inside a header value
    b"",
    TEST_KEY.encode(),  # shaped like an API key: echoed, it would sit in bodies and logs
])
async def test_a_hostile_client_id_is_replaced(proxy, capfd, leaks, value):
    reply = await _post_with_id(proxy, value)
    assert reply.status == 200 and GENERATED.fullmatch(reply.headers["x-proxy-request-id"])
    (line,) = [line for line in log_lines(capfd, leaks) if line["event"] == "request"]
    assert line["request_id"] == reply.headers["x-proxy-request-id"]


@pytest.mark.parametrize("value", [b"line\rbreak", b"folded\r\n next"])
async def test_a_cr_or_folded_id_never_reaches_the_handler(proxy, mock: MockUpstream, value):
    """Pins what aiohttp's parser does before any id exists: a CR or an obs-fold in a header is a
    malformed request (RFC 9112 5.2), answered 400 without echoing anything (passes before the fix too)."""
    reply = await _post_with_id(proxy, value)
    assert (reply.status, reply.headers["x-proxy-error"]) == (400, "invalid_http_request")
    assert b"next" not in reply.raw and b"break" not in reply.raw and mock.received == []


async def _post_with_id(proxy: Any, value: bytes) -> Any:
    body = json.dumps(CHAT).encode()
    return await exchange(proxy.url, b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + value
                          + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                          + b"\r\nConnection: close\r\n\r\n" + body)


async def test_proxy_made_errors_quote_the_id(proxy, mock: MockUpstream):
    mock.script(PATH, *[Reset()] * 5)  # more than the default attempts: the proxy gives up itself
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**CHAT, extra_headers={"x-request-id": "job-42"})
    response = info.value.response
    assert response.headers["x-proxy-error"] == "upstream_network_error"
    assert response.headers["x-proxy-request-id"] == "job-42"
    assert info.value.message.endswith("(request id job-42)")
    async with sdk(proxy) as client:  # an id the proxy made is quoted the same way
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**CHAT)
    rid = info.value.response.headers["x-proxy-request-id"]
    assert GENERATED.fullmatch(rid) and info.value.message.endswith(f"(request id {rid})")


@pytest.mark.parametrize("request_line, code", [
    (b"GET /v1/../../etc HTTP/1.1", "invalid_request_target"),  # refused before routing
    (b"TRACE /v1/models HTTP/1.1", "method_not_allowed"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100", "request_body_timeout"),  # a body that stalls
])
async def test_refusals_before_the_upstream_carry_the_id(start_proxy, request_line, code):
    proxy = await start_proxy({"defaults": {"timeouts": {"idle": "100ms"}}})
    reply = await exchange(proxy.url, request_line + b"\r\nHost: x\r\nX-Client-Request-Id: r-7\r\n\r\n")
    assert reply.headers["x-proxy-error"] == code and reply.headers["x-proxy-request-id"] == "r-7"
    assert json.loads(reply.body)["error"]["message"].endswith("(request id r-7)")


async def test_a_bodiless_error_answer_carries_the_id_header(proxy, mock: MockUpstream):
    mock.script(PATH, *[Reset()] * 5, method="HEAD")
    reply = await exchange(proxy.url, b"HEAD " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Request-Id: h-1\r\n"
                           b"Connection: close\r\n\r\n")
    assert reply.headers["x-proxy-error"] == "upstream_network_error" and reply.headers["x-proxy-request-id"] == "h-1"


async def test_circuit_open_refusal_quotes_the_id(start_proxy, mock: MockUpstream):
    proxy = await start_proxy({"defaults": {"breaker": {"failure_threshold": 1}, "retry": {"max_attempts": 1}}})
    mock.script(PATH, Reset())
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(**CHAT)  # the failure that opens the breaker
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**CHAT, extra_headers={"x-request-id": "after-open"})
    assert info.value.response.headers["x-proxy-error"] == "circuit_open"
    assert info.value.response.headers["x-proxy-request-id"] == "after-open"
    assert info.value.message.endswith("(request id after-open)")


async def test_an_upstream_proxys_id_is_replaced_not_doubled(proxy, mock: MockUpstream):
    """Two proxies in a chain (a sidecar in front of a gateway): the client gets the nearer one's id only."""
    mock.script(PATH, Respond(200, {"object": "chat.completion", "choices": []}, {"x-proxy-request-id": "far"}))
    reply = await exchange(proxy.url, b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Request-Id: near\r\n"
                           b"Connection: close\r\n\r\n")
    assert reply.status == 200 and b"far" not in reply.raw and reply.headers["x-proxy-request-id"] == "near"
