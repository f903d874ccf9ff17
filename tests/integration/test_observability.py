"""Logs and metrics after scripted traffic: exact counts, masked secrets, bounded labels."""

from __future__ import annotations

import json
import random
import string

import aiohttp
import openai
import pytest
from prometheus_client import generate_latest

from proxy.logs import WRITER
from proxy.testing import Respond, error, insufficient_quota
from tests.conftest import CANARY, TEST_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"


BY_UPSTREAM = {"openai_proxy_attempts_total", "openai_proxy_breaker_state", "openai_proxy_breaker_transitions_total"}


def value(proxy, name: str, **labels: str) -> float:
    if name in BY_UPSTREAM:  # labelled by upstream too: a route of one upstream has "default"
        labels = {"upstream": "default", **labels}
    v = proxy.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def log_lines(capfd) -> list[dict]:
    WRITER.flush()
    out, err = capfd.readouterr()
    # hand it back so the leak check at teardown still sees everything
    print(out, end="")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_counters_after_scripted_traffic(proxy, mock, capfd):
    mock.script(PATH, error(503, "overloaded", type="server_error"), error(503, "overloaded", type="server_error"),
                Respond(200, {"id": "chatcmpl-1", "object": "chat.completion"}), insufficient_quota(),
                error(400, "bad", type="invalid_request_error"))
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT)  # 503, 503, 200
        for exc in (openai.RateLimitError, openai.BadRequestError):
            with pytest.raises(exc):
                await client.chat.completions.create(**CHAT)
    r = "chat_completions"
    assert value(proxy, "openai_proxy_requests_total", route=r, status_class="2xx") == 1
    assert value(proxy, "openai_proxy_requests_total", route=r, status_class="4xx") == 2
    assert value(proxy, "openai_proxy_attempts_total", route=r, category="server") == 2
    assert value(proxy, "openai_proxy_attempts_total", route=r, category="ok") == 1
    assert value(proxy, "openai_proxy_attempts_total", route=r, category="quota_exceeded") == 1
    assert value(proxy, "openai_proxy_attempts_total", route=r, category="client") == 1
    assert value(proxy, "openai_proxy_retries_total", route=r, category="server") == 2
    assert value(proxy, "openai_proxy_errors_total", route=r, category="quota_exceeded") == 1
    assert value(proxy, "openai_proxy_errors_total", route=r, category="client") == 1
    assert value(proxy, "openai_proxy_errors_total", route=r, category="server") == 0
    assert value(proxy, "openai_proxy_retry_stops_total", route=r, reason="not_retryable") == 2
    assert value(proxy, "openai_proxy_request_duration_seconds_count", route=r, outcome="ok") == 1
    assert value(proxy, "openai_proxy_request_duration_seconds_count", route=r, outcome="error") == 2
    assert value(proxy, "openai_proxy_in_flight_requests", route=r) == 0
    assert value(proxy, "openai_proxy_breaker_state", route=r) == 0

    lines = log_lines(capfd)
    requests = [line for line in lines if line["event"] == "request"]
    retries = [line for line in lines if line["event"] == "retry"]
    assert len(requests) == 3 and len(retries) == 2
    first = requests[0]
    assert {k: first[k] for k in ("route", "method", "path", "status", "category", "attempts", "stop_reason")} == \
        {"route": r, "method": "POST", "path": PATH, "status": 200, "category": "ok", "attempts": 3,
         "stop_reason": None}
    assert first["client_sdk"].startswith("python/") and first["level"] == "info" and "timestamp" in first
    assert first["duration_ms"] >= first["ttfb_ms"] >= 0 and first["bytes_out"] == len(raw.http_response.content) > 0
    assert [(x["attempt"], x["category"], x["upstream_status"], x["reason"]) for x in retries] == \
        [(1, "server", 503, "backoff"), (2, "server", 503, "backoff")]
    assert [x["category"] for x in requests[1:]] == ["quota_exceeded", "client"]


async def test_upstream_request_id_and_client_ids_are_logged(proxy, mock, capfd):
    mock.script(PATH, Respond(200, {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                                     "choices": []}, headers={"x-request-id": "req_abc"}))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + PATH, json=CHAT, headers={"x-client-request-id": "corr-1",
                                                                "X-Stainless-Lang": "js",
                                                                "X-Stainless-Package-Version": "7.57.0"}) as resp:
            await resp.read()
    (req,) = [line for line in log_lines(capfd) if line["event"] == "request"]
    assert (req["upstream_request_id"], req["client_request_id"], req["client_sdk"]) == ("req_abc", "corr-1",
                                                                                          "js/7.57.0")


async def test_ratelimit_headroom_gauges(proxy, mock):
    mock.script(PATH, Respond(200, {"ok": True}, headers={"x-ratelimit-remaining-requests": "59",
                                                           "x-ratelimit-remaining-tokens": "149984"}))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + PATH, json=CHAT) as resp:
            await resp.read()
    assert value(proxy, "openai_proxy_ratelimit_remaining_requests", route="chat_completions") == 59
    assert value(proxy, "openai_proxy_ratelimit_remaining_tokens", route="chat_completions") == 149984


async def test_breaker_gauge_and_event(start_proxy, mock, capfd):
    proxy = await start_proxy({"defaults": {"retry": {"max_attempts": 1}, "breaker": {"failure_threshold": 2}}})
    mock.script(PATH, *[error(500, "x", type="server_error")] * 2)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(proxy.url + PATH, json=CHAT) as resp:
                await resp.read()
    assert value(proxy, "openai_proxy_breaker_state", route="chat_completions") == 2
    assert value(proxy, "openai_proxy_errors_total", route="chat_completions", category="circuit_open") == 1
    assert value(proxy, "openai_proxy_retry_stops_total", route="chat_completions", reason="breaker") == 1
    (ev,) = [line for line in log_lines(capfd) if line["event"] == "breaker"]
    assert (ev["breaker"], ev["old"], ev["new"], ev["level"]) == ("chat_completions", "closed", "open", "warning")


async def test_unmatched_paths_keep_label_cardinality_bounded(proxy, mock):
    def series() -> set[str]:
        return {line.split(" ")[0] for line in generate_latest(proxy.registry).decode().splitlines()
                if line and not line.startswith("#")}

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/v1/first") as resp:
            await resp.read()
    before = series()  # the default route's series exist from its first request
    async with aiohttp.ClientSession() as s:
        for _ in range(99):
            junk = "".join(random.choices(string.ascii_lowercase + string.digits, k=12))
            async with s.get(f"{proxy.url}/v1/{junk}/{junk}?q={junk}") as resp:
                await resp.read()
    after = series()
    assert after == before  # no path ever becomes a label
    assert value(proxy, "openai_proxy_requests_total", route="default", status_class="2xx") == 100
    assert not any(CANARY in s or "/v1/" in s for s in after)


async def test_secrets_never_leak(start_proxy, mock, proxy_process, tmp_path, capfd):
    """The canary key in Authorization, in query strings and echoed in a 401 message: the autouse
    leak check then scans stdout, stderr, /metrics and proxy-made error bodies of this test."""
    message = f"Incorrect API key provided: {TEST_KEY}. You can find your API key at https://platform.openai.com."
    proxy = await start_proxy({"log": {"level": "debug"}})
    from tests.conftest import write_config
    path = write_config(tmp_path, mock.url, {"log": {"level": "debug"}})
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    for base in (proxy.url, p.traffic):
        mock.script(PATH, error(401, message, type="invalid_request_error", code="invalid_api_key"))
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=TEST_KEY, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                await client.chat.completions.create(**CHAT)
        assert TEST_KEY in info.value.message  # the upstream's own body reaches the client unchanged
        async with aiohttp.ClientSession() as s:
            for q in (f"key={TEST_KEY}", f"api_key={TEST_KEY}", f"api-key={TEST_KEY}"):
                async with s.get(f"{base}/v1/models?{q}", headers={"Authorization": f"Bearer {TEST_KEY}",
                                                                    "api-key": TEST_KEY}) as resp:
                    await resp.read()
    # a proxy-made error on a path with the key in its query
    dead = await start_proxy(upstream="http://127.0.0.1:9")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{dead.url}/v1/models?key={TEST_KEY}", headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
            assert r.status == 502
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + "/metrics") as r:
            assert CANARY not in await r.text()
    p.signal()
    await p.finish()
    out = "\n".join(json.dumps(x) for x in p.lines) + p.output
    assert '"event": "request"' in out or '"event":"request"' in out  # it did log the requests


async def test_admin_metrics_endpoint_serves_the_contract(proxy_process, tmp_path, mock):
    from tests.conftest import write_config
    path = write_config(tmp_path, mock.url)
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    async with aiohttp.ClientSession() as s:
        async with s.post(p.traffic + PATH, json=CHAT) as r:
            await r.read()
        async with s.get(p.admin + "/metrics") as r:
            text = await r.text()
    for name in ("openai_proxy_requests_total", "openai_proxy_errors_total", "openai_proxy_attempts_total",
                 "openai_proxy_retries_total", "openai_proxy_retry_stops_total", "openai_proxy_breaker_state",
                 "openai_proxy_request_duration_seconds", "openai_proxy_in_flight_requests"):
        assert f"# TYPE {name}" in text, name
    assert 'openai_proxy_requests_total{route="chat_completions",status_class="2xx"} 1.0' in text
