"""Faults scripted by the client over HTTP headers (x-mock-faults, x-mock-key): the grammar, the mock
answering it directly, the proxy's retries consuming one list, and the mock run as its own command
(`python -m proxy.testing`), exactly as an application in another language would use them."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from proxy.events import RequestFinished
from proxy.testing import (FAULT_GRAMMAR, FAULTS_HEADER, KEY_HEADER, MAX_FAULT_STEPS, SCRIPT_HEADER, CutBody, Delay,
                           FaultSyntaxError, MockUpstream, Reset, SSECut, SSEErrorFrame, error, insufficient_quota,
                           main, parse_faults, rate_limited, request_too_large)
from tests.conftest import ROOT, TEST_KEY, Recorder, RunningProxy

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"
HELLO = "Hello from the mock upstream."


def faults(value: str, key: str | None = None) -> dict[str, str]:
    """The headers a client sends to script its own request (and, with a key, the retries of it)."""
    return {FAULTS_HEADER: value, **({KEY_HEADER: key} if key is not None else {})}


def sdk(base_url: str, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=TEST_KEY, max_retries=max_retries, timeout=30)


def assert_transport_error(exc: BaseException) -> None:
    """The SDK saw a broken transfer (httpx's RemoteProtocolError, possibly wrapped), not an end."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    assert names & {"RemoteProtocolError", "ReadError", "APIConnectionError"}, repr(exc)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post_status(session: aiohttp.ClientSession, mock: MockUpstream, headers: dict[str, str]) -> int:
    async with session.post(mock.url + PATH, json=CHAT, headers=headers) as r:
        await r.read()
        return r.status


# ------------------------------------------------------------------ the grammar


@pytest.mark.parametrize("value, steps", [
    ("ok", [None]),
    ("500, 503,ok", [error(500), error(503), None]),
    ("429", [rate_limited()]),
    ("quota", [insufficient_quota()]),
    ("too_large", [request_too_large()]),
    ("rate_limit", [rate_limited()]),
    ("rate_limit:0.25", [rate_limited(retry_after="1", retry_after_ms="250")]),
    ("rate_limit:2", [rate_limited(retry_after="2", retry_after_ms="2000")]),
    ("reset", [Reset()]),
    ("delay:1.5", [Delay(1.5)]),
    ("cut:3", [SSECut(3)]),
    ("cut_body:10", [CutBody(10)]),
    ("sse_error:2", [SSEErrorFrame(2)]),
    (" OK , Reset ", [None, Reset()]),  # words are case-insensitive, spaces around tokens are free
])
def test_tokens_map_onto_the_existing_steps(value: str, steps: list[object]) -> None:
    assert parse_faults(value) == steps


@pytest.mark.parametrize("status, kind, code", [
    (400, "invalid_request_error", None),
    (401, "invalid_request_error", "invalid_api_key"),
    (403, "request_forbidden", "unsupported_country_region_territory"),
    (404, "invalid_request_error", "model_not_found"),
    (422, "invalid_request_error", None),
    (500, "server_error", None),
    (599, "server_error", None),
])
def test_status_tokens_are_openai_error_bodies(status: int, kind: str, code: str | None) -> None:
    (step,) = parse_faults(str(status))
    assert step.status == status  # type: ignore[union-attr]
    assert (step.body["error"]["type"], step.body["error"]["code"]) == (kind, code)  # type: ignore[index,union-attr]


@pytest.mark.parametrize("value, token", [
    ("", ""), ("500,,ok", ""), ("500,", ""), ("oops", "oops"), ("200", "200"), ("5000", "5000"), ("50", "50"),
    ("500:1", "500:1"), ("delay", "delay"), ("delay:-1", "delay:-1"), ("delay:1e3", "delay:1e3"),
    ("delay:inf", "delay:inf"), ("ok:1", "ok:1"), ("reset:now", "reset:now"), ("cut:x", "cut:x"),
    ("cut:1.5", "cut:1.5"), ("rate_limit:", "rate_limit:"), ("cut :1", "cut :1"),
    ("cut_body:9999999999", "cut_body:9999999999"),
    ("ok; 500", "ok; 500"), ("500, 500 ok", "500 ok"),
])
def test_malformed_tokens_are_named(value: str, token: str) -> None:
    with pytest.raises(FaultSyntaxError) as info:
        parse_faults(value)
    assert info.value.token == token
    assert f"bad token {token!r}" in str(info.value) and FAULT_GRAMMAR in str(info.value)


def test_a_list_is_bounded() -> None:
    assert len(parse_faults(",".join(["ok"] * MAX_FAULT_STEPS))) == MAX_FAULT_STEPS
    with pytest.raises(FaultSyntaxError, match=f"at most {MAX_FAULT_STEPS}"):
        parse_faults(",".join(["ok"] * (MAX_FAULT_STEPS + 1)))


# ------------------------------------------------------------------ the mock, directly


async def test_a_key_consumes_the_list_in_order(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    statuses = [await post_status(session, mock, faults("500, quota, ok, 503", "k1")) for _ in range(5)]
    assert statuses == [500, 429, 200, 503, 200]  # used up: the normal answer from then on
    assert [rec.step for rec in mock.received] == [error(500), insufficient_quota(), None, error(503), None]
    assert await post_status(session, mock, faults("500, quota, ok, 503", "k2")) == 500  # keys are independent
    assert await post_status(session, mock, faults("502", "k1")) == 502  # a new list for a key starts afresh
    assert await post_status(session, mock, faults("502", "k1")) == 200


async def test_without_a_key_only_the_first_step_applies(mock: MockUpstream,
                                                         session: aiohttp.ClientSession) -> None:
    assert [await post_status(session, mock, faults("503, ok")) for _ in range(3)] == [503, 503, 503]
    assert await post_status(session, mock, {KEY_HEADER: "no-faults"}) == 200  # a key alone does nothing


async def test_keys_are_bounded_least_recently_used_dropped(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(fault_keys=2) as mock:
        assert await post_status(session, mock, faults("500, ok", "a")) == 500
        assert await post_status(session, mock, faults("500, ok", "b")) == 500
        assert await post_status(session, mock, faults("500, ok", "a")) == 200  # a was used last: b is older
        assert await post_status(session, mock, faults("500, ok", "c")) == 500  # drops b
        assert await post_status(session, mock, faults("500, ok", "b")) == 500  # forgotten: starts again
        assert await post_status(session, mock, faults("500, ok", "c")) == 200  # kept
        async with session.post(mock.url + PATH, json=CHAT, headers=faults("500", "x" * 257)) as r:
            assert r.status == 400 and "x-mock-key: at most 256" in (await r.json())["error"]["message"]
    with pytest.raises(ValueError):
        MockUpstream(fault_keys=0)


async def test_a_malformed_header_is_a_400_naming_the_token(mock: MockUpstream) -> None:
    async with sdk(mock.url + "/v1") as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(**CHAT, extra_headers=faults("500, delay:soon, ok", "k"))
    assert info.value.code == "invalid_mock_faults"
    assert "bad token 'delay:soon'" in info.value.message and "Traceback" not in info.value.message
    (rec,) = mock.received
    assert rec.step.status == 400  # type: ignore[union-attr]
    assert rec.finished.is_set() and rec.body_size > 0  # an orderly answer, the body read


async def test_header_faults_come_before_the_in_process_scripts(mock: MockUpstream,
                                                                session: aiohttp.ClientSession) -> None:
    mock.script(PATH, error(502))
    mock.script_request("s", error(504))
    assert await post_status(session, mock, faults("ok")) == 200  # the path script is left alone
    assert await post_status(session, mock, {**faults("503", "k"), SCRIPT_HEADER: "s"}) == 503
    assert await post_status(session, mock, {**faults("503", "k"), SCRIPT_HEADER: "s"}) == 504  # used up
    assert await post_status(session, mock, {}) == 502


async def test_stream_and_body_faults_directly(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    async with sdk(mock.url + "/v1") as client:
        got = []
        with pytest.raises(Exception) as info:
            stream = await client.chat.completions.create(**CHAT, stream=True, extra_headers=faults("cut:2"))
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        assert_transport_error(info.value)
        assert got == ["tok0 ", "tok1 "]
        with pytest.raises(openai.APIError, match="The server had an error"):
            stream = await client.chat.completions.create(**CHAT, stream=True, extra_headers=faults("sse_error:1"))
            async for _ in stream:
                pass
    async with session.post(mock.url + PATH, json=CHAT, headers=faults("cut_body:10")) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_status(session, mock, faults("reset"))
    assert [rec.step for rec in mock.received] == [SSECut(2), SSEErrorFrame(1), CutBody(10), Reset()]


# ------------------------------------------------------------------ through the proxy, with the SDK


async def test_500_500_ok_through_the_proxy_is_a_success(proxy: RunningProxy, mock: MockUpstream,
                                                         recorder: Recorder) -> None:
    async with sdk(proxy.base_url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            **CHAT, extra_headers=faults("500, 500, ok", "req-1"))
    assert raw.parse().choices[0].message.content == HELLO
    assert raw.headers["x-proxy-attempts"] == "3"
    assert [rec.headers[KEY_HEADER] for rec in mock.requests_to(PATH)] == ["req-1"] * 3  # forwarded as is
    assert [(a.category, a.status) for a in recorder.attempts] == [("server", 500), ("server", 500), ("ok", 200)]


async def test_without_a_key_every_retry_sees_the_first_step(proxy: RunningProxy, mock: MockUpstream,
                                                             recorder: Recorder) -> None:
    async with sdk(proxy.base_url) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT, extra_headers=faults("500, ok"))
    assert info.value.response.headers["x-proxy-attempts"] == "3"
    assert len(mock.requests_to(PATH)) == 3
    assert recorder.requests[0].stop_reason == "limit"


async def test_quota_through_the_proxy_is_not_retried(proxy: RunningProxy, mock: MockUpstream,
                                                      recorder: Recorder) -> None:
    async with sdk(proxy.base_url, max_retries=2) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT, extra_headers=faults("quota, ok", "req-q"))
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(mock.requests_to(PATH)) == 1
    assert recorder.requests[0].category == "quota_exceeded"


async def test_rate_limit_hint_and_reset_are_retried(proxy: RunningProxy, mock: MockUpstream,
                                                     recorder: Recorder) -> None:
    async with sdk(proxy.base_url) as client:
        resp = await client.chat.completions.create(**CHAT, extra_headers=faults("rate_limit:0.02, reset, ok", "r"))
    assert resp.choices[0].message.content == HELLO
    assert [(r.category, r.delay_s, r.source) for r in recorder.retries][0] == ("rate_limit", 0.02, "retry-after-ms")
    assert [a.category for a in recorder.attempts] == ["rate_limit", "network", "ok"]


async def test_delay_past_first_byte_is_a_timeout_then_retried(start_proxy, mock: MockUpstream,
                                                               recorder: Recorder) -> None:
    proxy = await start_proxy({"defaults": {"timeouts": {"first_byte": "100ms"}}})
    async with sdk(proxy.base_url) as client:
        resp = await client.chat.completions.create(**CHAT, extra_headers=faults("delay:30, ok", "slow"))
    assert resp.choices[0].message.content == HELLO
    assert [a.category for a in recorder.attempts] == ["timeout", "ok"]
    first = mock.requests_to(PATH)[0]
    await asyncio.wait_for(first.cancelled.wait(), 5)  # the proxy gave up on it; the mock saw it leave


async def test_a_cut_stream_through_the_proxy_reaches_the_client_broken(proxy: RunningProxy, mock: MockUpstream,
                                                                         recorder: Recorder) -> None:
    got = []
    async with sdk(proxy.base_url) as client:
        with pytest.raises(openai.APIConnectionError):
            stream = await client.chat.completions.create(**CHAT, stream=True, extra_headers=faults("cut:2", "c"))
            async for chunk in stream:
                got.append(chunk)
    assert len(got) == 2  # what arrived, then an error: never a silently short answer
    (req,) = await recorder.wait_for(RequestFinished)
    assert req.aborted and req.attempts == 1


async def test_a_malformed_header_through_the_proxy_is_not_retried(proxy: RunningProxy, mock: MockUpstream) -> None:
    async with sdk(proxy.base_url) as client:
        with pytest.raises(openai.BadRequestError, match="bad token 'cut:many'"):
            await client.chat.completions.create(**CHAT, extra_headers=faults("cut:many", "m"))
    assert len(mock.requests_to(PATH)) == 1


# ------------------------------------------------------------------ the command


async def spawn_mock(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``python -m proxy.testing`` and return it with the URL from its one printed line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.testing", *args, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    match = re.fullmatch(r"mock upstream listening on (http://127\.0\.0\.1:(\d+))\n", line)
    if match is None:
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"unexpected first line {line!r}; stderr: {err.decode()}")
    assert match[2] != "0"
    return proc, match[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_command_serves_header_faults_and_stops_on_a_signal(start_proxy, recorder: Recorder,
                                                                      sig: int) -> None:
    proc, url = await spawn_mock("--host", "127.0.0.1", "--port", "0", "--sse-events", "3", "--sse-interval", "0")
    try:
        async with sdk(url + "/v1") as client:  # an SDK pointed straight at it
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(**CHAT, extra_headers=faults("503"))
            stream = await client.chat.completions.create(**CHAT, stream=True)
            assert [c.choices[0].delta.content async for c in stream] == ["tok0 ", "tok1 ", "tok2 "]
        proxy = await start_proxy(upstream=url)  # the proxy pointed at it
        async with sdk(proxy.base_url) as client:
            raw = await client.chat.completions.with_raw_response.create(
                **CHAT, extra_headers=faults("500, ok", "through-the-proxy"))
        assert raw.parse().choices[0].message.content == HELLO and raw.headers["x-proxy-attempts"] == "2"
    finally:
        if proc.returncode is None:
            proc.send_signal(sig)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out == b"" and err == b""  # one line in all (read above), no traceback


def test_the_command_reports_a_busy_port_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"openai-resilience-proxy-mock: cannot listen on 127.0.0.1:{port}") and "\n" == err[-1]
    for bad in (["--port", "70000"], ["--port", "-1"], ["--sse-events", "many"], ["--sse-interval", "nan"]):
        with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(sys.stdout):
            main(bad)
        assert info.value.code == 2
    capsys.readouterr()
