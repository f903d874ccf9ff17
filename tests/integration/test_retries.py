"""Retry policies end to end: the official SDK -> proxy -> scripted mock upstream.

Backoffs are milliseconds (conftest.FAST_DEFAULTS); nothing waits on the wall clock except the
one Retry-After case, whose 150 ms wait is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import openai
import pytest

from proxy.testing import (MockUpstream, Reset, Respond, SSECut, SSEErrorFrame, error, insufficient_quota,
                           rate_limited, request_too_large)
from tests.conftest import TEST_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"


def sdk(proxy, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=max_retries, timeout=30)


def server_error():
    return error(503, "The server is overloaded or not ready yet.", type="server_error")


async def test_503_503_200_succeeds_in_3_attempts(proxy, mock: MockUpstream, recorder):
    mock.script(PATH, server_error(), server_error())
    async with sdk(proxy) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().choices[0].message.content == "Hello from the mock upstream."
    assert raw.headers["x-proxy-attempts"] == "3" and "x-should-retry" not in raw.headers
    assert len(mock.requests_to(PATH)) == 3
    assert [(r.attempt, r.category, r.status, r.reason) for r in recorder.retries] == \
        [(1, "server", 503, "backoff"), (2, "server", 503, "backoff")]
    (req,) = recorder.requests
    assert (req.status, req.category, req.attempts, req.stop_reason) == (200, "ok", 3, None)


async def test_429_retry_after_ms_is_waited(proxy, mock: MockUpstream, recorder):
    mock.script(PATH, rate_limited(retry_after_ms="150"))
    async with sdk(proxy) as client:
        resp = await client.chat.completions.create(**CHAT)
    assert resp.choices[0].message.content
    first, second = mock.requests_to(PATH)
    assert second.arrived - first.arrived >= 0.15
    (retry,) = recorder.retries
    assert (retry.category, retry.delay_s, retry.reason, retry.source) == ("rate_limit", 0.15, "retry_after",
                                                                          "retry-after-ms")


async def test_quota_429_is_passed_through_after_one_attempt(proxy, mock: MockUpstream, recorder):
    mock.script(PATH, insufficient_quota())
    async with sdk(proxy, max_retries=2) as client:  # the SDK would retry a 429 twice on its own
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.response.headers["x-proxy-attempts"] == "1"
    assert "x-proxy-error" not in info.value.response.headers  # the upstream's own answer, unchanged
    assert len(mock.requests_to(PATH)) == 1
    assert (recorder.requests[0].category, recorder.requests[0].stop_reason) == ("quota_exceeded", "not_retryable")


async def test_request_too_large_429_is_not_retried(proxy, mock: MockUpstream, recorder):
    mock.script(PATH, request_too_large())
    async with sdk(proxy) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**CHAT)
    assert len(mock.requests_to(PATH)) == 1
    assert (recorder.requests[0].category, recorder.requests[0].stop_reason) == ("rate_limit", "not_retryable")


@pytest.mark.parametrize("status, exc, category", [
    (400, openai.BadRequestError, "client"),
    (401, openai.AuthenticationError, "authentication"),
    (409, openai.ConflictError, "client"),
])
async def test_client_errors_are_one_attempt(proxy, mock: MockUpstream, recorder, status, exc, category):
    mock.script(PATH, error(status, "nope", type="invalid_request_error"))
    async with sdk(proxy, max_retries=2) as client:
        with pytest.raises(exc) as info:
            await client.chat.completions.create(**CHAT)
    assert len(mock.requests_to(PATH)) == 1  # neither the proxy nor the SDK (409) retried
    assert info.value.response.headers["x-should-retry"] == "false"
    assert recorder.requests[0].category == category


async def test_reset_before_headers_is_retried(proxy, mock: MockUpstream, recorder):
    mock.script(PATH, Reset())
    async with sdk(proxy) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-proxy-attempts"] == "2"
    assert [a.category for a in recorder.attempts] == ["network", "ok"]


async def test_long_retry_after_is_answered_at_once(proxy, mock: MockUpstream, recorder):
    mock.script(PATH, rate_limited(retry_after="600"))  # beyond retry_after_max (2m)
    async with sdk(proxy) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.response.headers["retry-after"] == "600"
    assert info.value.response.headers["x-proxy-attempts"] == "1"
    assert len(mock.requests_to(PATH)) == 1
    assert recorder.requests[0].stop_reason == "deadline"


async def test_body_over_replay_limit_is_sent_once(start_proxy, mock: MockUpstream, recorder):
    proxy = await start_proxy({"defaults": {"retry": {"replay_limit": "64KiB"}}})
    mock.script("/v1/files", server_error())
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 200_000)), purpose="batch")
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(mock.requests_to("/v1/files")) == 1
    (req,) = recorder.requests
    assert (req.stop_reason, req.replayable) == ("not_replayable", False)


async def test_per_route_override(start_proxy, mock: MockUpstream, recorder):
    proxy = await start_proxy({"routes": [
        {"name": "embeddings", "methods": ["POST"], "path": "/v1/embeddings", "retry": {"max_attempts": 5}},
    ]})
    mock.script("/v1/embeddings", *[server_error()] * 4)
    mock.script(PATH, *[server_error()] * 4)
    async with sdk(proxy) as client:
        emb = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hi")
        assert emb.headers["x-proxy-attempts"] == "5"
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.response.headers["x-proxy-attempts"] == "3"
    assert {r.route: r.attempts for r in recorder.requests} == {"embeddings": 5, "default": 3}
    assert recorder.requests[1].stop_reason == "limit"


async def test_sdk_retries_do_not_multiply(proxy, mock: MockUpstream):
    mock.script(PATH, *[server_error()] * 20)
    async with sdk(proxy, max_retries=2) as client:  # the SDK's default
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    assert len(mock.requests_to(PATH)) == 3  # the proxy's max_attempts, not 3 x 3
    assert info.value.response.headers["x-should-retry"] == "false"


async def test_route_without_retries_leaves_the_sdk_alone(start_proxy, mock: MockUpstream):
    proxy = await start_proxy({"defaults": {"retry": {"max_attempts": 1}}})
    mock.script(PATH, *[server_error()] * 20)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=2) as client:
        client = client.with_options(max_retries=2)
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    assert "x-should-retry" not in info.value.response.headers
    assert len(mock.requests_to(PATH)) == 3  # the SDK's own three attempts, one each through the proxy


async def test_upstream_x_should_retry_false_stops_the_proxy(proxy, mock: MockUpstream, recorder):
    mock.script(PATH, error(503, "do not retry", type="server_error", headers={"x-should-retry": "false"}))
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**CHAT)
    assert len(mock.requests_to(PATH)) == 1
    assert recorder.requests[0].stop_reason == "not_retryable"


async def test_budget_exhaustion_under_a_burst(start_proxy, mock: MockUpstream, recorder):
    proxy = await start_proxy({"defaults": {"retry": {"max_attempts": 2,
                                                      "budget": {"ratio": 0.0, "min_per_second": 0.1,
                                                                 "window": "10s"}},
                                             "breaker": {"failure_threshold": 100}}})  # one retry per window
    mock.script(PATH, *[server_error()] * 50)
    async with sdk(proxy) as client:
        results = await asyncio.gather(*[client.chat.completions.create(**CHAT) for _ in range(5)],
                                       return_exceptions=True)
    assert all(isinstance(r, openai.InternalServerError) for r in results)
    assert len(mock.requests_to(PATH)) == 6  # five requests, one retry
    reasons = sorted(r.stop_reason for r in recorder.requests)
    assert reasons == ["budget"] * 4 + ["limit"]


async def test_client_read_timeout_bounds_the_retries(start_proxy, mock: MockUpstream, recorder):
    proxy = await start_proxy({"defaults": {"retry": {"backoff": {"initial": "1s", "max": "1s"}}}},
                              rng=lambda: 0.5)  # every backoff is 500 ms
    mock.script(PATH, *[server_error()] * 5)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + PATH, json=CHAT, headers={"x-stainless-read-timeout": "0.2"}) as r:
            assert r.status == 503
            assert r.headers["x-should-retry"] == "false"
    assert len(mock.requests_to(PATH)) == 1
    assert recorder.requests[0].stop_reason == "deadline"


async def test_proxy_error_message_is_plain_and_secret_free(start_proxy, recorder):
    proxy = await start_proxy(upstream="http://127.0.0.1:9")  # nothing listens on the discard port
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + PATH + "?api_key=sk-proj-leak-in-query", json=CHAT,
                          headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
            body = await r.read()
    assert r.status == 502 and r.headers["x-proxy-error"] == "upstream_connect_error"
    message = json.loads(body)["error"]["message"]
    assert message.startswith("Could not connect to 127.0.0.1: the connection was refused; gave up after 3 attempts")
    assert "sk-" not in body.decode() and "Traceback" not in message and "Errno" not in message


async def test_stream_cut_cleanly_without_done_is_aborted(client, mock: MockUpstream, recorder):
    mock.script(PATH, SSECut(after_events=2, clean=True))
    got = []
    with pytest.raises(openai.APIConnectionError):
        stream = await client.chat.completions.create(**CHAT, stream=True)
        async for chunk in stream:
            got.append(chunk)
    assert len(got) == 2  # the client saw what arrived, then an error: not a silently short answer
    (req,) = recorder.requests
    assert (req.status, req.category, req.aborted) == (200, "invalid_response", True)


async def test_in_band_error_frame_reaches_the_sdk(client, mock: MockUpstream, recorder):
    mock.script(PATH, SSEErrorFrame(after_events=1))
    with pytest.raises(openai.APIError) as info:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        async for _ in stream:
            pass
    assert "The server had an error" in info.value.message
    assert recorder.requests[0].category == "server"


async def test_responses_stream_cut_cleanly_is_aborted(client, mock: MockUpstream, recorder):
    mock.script("/v1/responses", SSECut(after_events=2, clean=True))
    with pytest.raises(openai.APIConnectionError):
        stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
        async for _ in stream:
            pass
    assert recorder.requests[0].category == "invalid_response"


async def test_retry_on_a_prefetched_small_body_is_transparent(proxy, mock: MockUpstream):
    mock.script("/v1/models", Respond(502, b"<html>bad gateway</html>", headers={"Content-Type": "text/html"}))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/models") as r:
            assert r.status == 200 and r.headers["x-proxy-attempts"] == "2"
            assert (await r.json())["object"] == "list"
