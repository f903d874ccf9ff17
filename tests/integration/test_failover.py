"""Failover across named upstreams, through real sockets: the official SDK -> the proxy -> two mock
upstreams (the secondary mounted under an Azure-style /openai/v1 base path, with an injected key).

Nothing waits on the wall clock: breakers run on the fake clock, and `sleep` is recorded, so "no
backoff before a failover" is seen as no sleep at all.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.events import BreakerChange, BreakerState, Failover, RequestFinished
from proxy.logs import WRITER
from proxy.testing import MockUpstream, Reset, error, insufficient_quota
from tests.conftest import ROOT, TEST_KEY

PATH = "/v1/chat/completions"
AZURE_PATH = "/openai/v1/chat/completions"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
SECRET = "azure-canary-7f3a9c2e5b1d4f608e2a"  # the injected key: no output of the proxy may hold it
ENV = "FAILOVER_TEST_SECONDARY_KEY"


@pytest.fixture
async def primary():
    async with MockUpstream() as m:
        yield m


@pytest.fixture
async def secondary():
    async with MockUpstream(base_path="/openai/v1") as m:
        yield m


def failover_config(primary_url: str, secondary_url: str, *, attempts: int = 3, threshold: int = 5,
                    replay_limit: str = "1MiB", **route) -> dict:
    return {
        "upstreams": {"primary": {"url": primary_url},
                      "secondary": {"url": secondary_url + "/openai/v1",
                                    "auth": {"header": "api-key", "value_from_env": ENV}}},
        "defaults": {"retry": {"max_attempts": attempts, "replay_limit": replay_limit},
                     "breaker": {"failure_threshold": threshold, "reset_timeout": "30s"}},
        "routes": [{"name": "chat", "methods": ["POST"], "path": PATH, "upstreams": ["primary", "secondary"], **route}],
    }


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.calls.append(delay)


@pytest.fixture
async def start(start_proxy, primary, secondary, clock, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    sleeps = Sleeps()

    async def go(primary_url: str | None = None, **options):
        proxy = await start_proxy(failover_config(primary_url or primary.url, secondary.url, **options),
                                  clock=clock, sleep=sleeps)
        proxy.sleeps = sleeps
        return proxy
    return go


def sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, organization="org-client", max_retries=0)


async def chat(proxy, **extra):
    async with sdk(proxy) as client:
        return await client.chat.completions.with_raw_response.create(**CHAT, **extra)


def refused_url() -> str:
    """A local port nobody listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def metrics(proxy) -> dict[tuple, float]:
    text = generate_latest(proxy.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# ---- failing over ----------------------------------------------------------------------------------

async def test_a_server_error_fails_over_at_once_to_the_secondary(start, primary, secondary, recorder):
    proxy = await start()
    primary.script(PATH, error(503, "overloaded", type="server_error"))
    raw = await chat(proxy)
    assert raw.http_response.status_code == 200 and raw.parse().choices[0].message.content
    assert raw.headers["x-proxy-upstream"] == "secondary" and raw.headers["x-proxy-attempts"] == "2"
    assert len(primary.requests_to(PATH)) == 1 and len(secondary.requests_to(AZURE_PATH)) == 1
    assert proxy.sleeps.calls == [] and recorder.retries == []  # no backoff between upstreams
    (move,) = recorder.of(Failover)
    assert (move.source, move.target, move.category, move.attempt) == ("primary", "secondary", "server", 1)
    assert [(a.upstream, a.category) for a in recorder.attempts] == [("primary", "server"), ("secondary", "ok")]
    assert recorder.requests[-1].upstream == "secondary"


@pytest.mark.parametrize("fault", ["refused", "reset"])
async def test_transport_errors_fail_over(start, primary, secondary, recorder, fault):
    if fault == "refused":
        proxy = await start(refused_url())
    else:
        proxy = await start()
        primary.script(PATH, Reset())
    raw = await chat(proxy)
    assert raw.http_response.status_code == 200 and raw.headers["x-proxy-upstream"] == "secondary"
    (move,) = recorder.of(Failover)
    assert move.category == ("connect" if fault == "refused" else "network")
    assert proxy.sleeps.calls == []


async def test_quota_fails_over_and_is_never_retried_on_the_same_upstream(start, primary, secondary, recorder):
    proxy = await start()
    primary.script(PATH, insufficient_quota())
    assert (await chat(proxy)).headers["x-proxy-upstream"] == "secondary"
    primary.script(PATH, insufficient_quota())
    secondary.script(AZURE_PATH, insufficient_quota(), insufficient_quota())
    async with sdk(proxy) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-proxy-upstream"] == "secondary"
    assert len(secondary.requests_to(AZURE_PATH)) == 2  # one per request: quota is not retried
    assert recorder.requests[-1].stop_reason == "not_retryable"


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_callers_errors_never_fail_over(start, primary, secondary, recorder, status):
    proxy = await start()
    primary.script(PATH, error(status, "no", type="invalid_request_error"))
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**CHAT)
    assert info.value.status_code == status
    assert info.value.response.headers["x-proxy-upstream"] == "primary"
    assert secondary.received == [] and recorder.of(Failover) == []


async def test_an_open_breaker_skips_the_primary_without_an_attempt(start, primary, secondary, recorder, clock):
    proxy = await start(threshold=1)
    primary.script(PATH, error(503, "down", type="server_error"))
    await chat(proxy)  # opens the primary's breaker; the secondary answers
    assert [(c.breaker, c.upstream, c.new) for c in recorder.of(BreakerChange)] == [
        ("chat", "primary", BreakerState.OPEN)]
    raw = await chat(proxy)
    assert raw.http_response.status_code == 200 and raw.headers["x-proxy-upstream"] == "secondary"
    assert raw.headers["x-proxy-attempts"] == "1"
    assert len(primary.requests_to(PATH)) == 1  # the second request never reached it
    skip = recorder.of(Failover)[-1]
    assert (skip.source, skip.target, skip.category, skip.attempt) == ("primary", "secondary", "circuit_open", 0)
    got = metrics(proxy)
    assert got[("openai_proxy_breaker_state", (("route", "chat"), ("upstream", "primary")))] == 2
    assert got[("openai_proxy_breaker_state", (("route", "chat"), ("upstream", "secondary")))] == 0
    clock.t += 30  # the primary's probe is due: it goes to the primary again
    await chat(proxy)
    assert len(primary.requests_to(PATH)) == 2


async def test_every_breaker_open_is_circuit_open_without_an_upstream_header(start, primary, secondary):
    proxy = await start(threshold=1, attempts=2)
    primary.script(PATH, error(503, "down", type="server_error"))
    secondary.script(AZURE_PATH, error(503, "down", type="server_error"))
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**CHAT)
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**CHAT)
    headers = info.value.response.headers
    assert headers["x-proxy-error"] == "circuit_open" and headers["x-proxy-attempts"] == "0"
    assert "x-proxy-upstream" not in headers and "every upstream (primary, secondary)" in info.value.message


# ---- credentials, base path --------------------------------------------------------------------------

async def test_the_injected_key_reaches_only_the_secondary(start, primary, secondary):
    proxy = await start()
    primary.script(PATH, error(503, "down", type="server_error"))
    await chat(proxy)
    (first,) = primary.requests_to(PATH)
    assert first.headers["Authorization"] == f"Bearer {TEST_KEY}"  # no auth: the client's passes through
    assert first.headers["OpenAI-Organization"] == "org-client" and "api-key" not in first.headers
    (second,) = secondary.requests_to(AZURE_PATH)  # the base path: the client's path after /v1
    assert second.headers["api-key"] == SECRET
    assert "Authorization" not in second.headers and "OpenAI-Organization" not in second.headers
    assert all(TEST_KEY not in value for value in second.headers.values())


async def test_a_base_path_upstream_alone(start_proxy, secondary, monkeypatch):
    """A single Azure-style upstream: the SDK's /v1/... lands under /openai/v1/..., and the mock
    under a base path answers nothing else."""
    monkeypatch.setenv(ENV, SECRET)
    doc = failover_config(secondary.url, secondary.url)
    doc["defaults"]["upstreams"] = ["secondary"]
    del doc["routes"]
    proxy = await start_proxy(doc)
    async with sdk(proxy) as client:
        models = await client.models.list()
        assert [m.id for m in models.data]
        await client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert [r.path for r in secondary.received] == ["/openai/v1/models", "/openai/v1/embeddings"]
    async with MockUpstream(base_path="/openai/v1") as bare:
        async with openai.AsyncOpenAI(base_url=bare.url + "/v1", api_key=TEST_KEY, max_retries=0) as direct:
            with pytest.raises(openai.NotFoundError):
                await direct.models.list()


# ---- what holds across upstreams ------------------------------------------------------------------------

async def test_a_body_streamed_once_never_goes_to_the_secondary(start, primary, secondary, recorder):
    proxy = await start(replay_limit="1KiB")
    primary.script(PATH, error(503, "down", type="server_error"))
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(**big)
    assert info.value.response.headers["x-proxy-upstream"] == "primary"
    assert secondary.received == [] and recorder.of(Failover) == []
    assert recorder.requests[-1].stop_reason == "not_replayable" and not recorder.requests[-1].replayable


@pytest.mark.parametrize("attempts, on_secondary, stop", [(2, 1, "limit"), (3, 2, "limit")])
async def test_max_attempts_counts_every_upstream(start, primary, secondary, recorder, attempts, on_secondary, stop):
    proxy = await start(attempts=attempts)
    primary.script(PATH, error(503, "down", type="server_error"))
    secondary.script(AZURE_PATH, *[error(503, "down", type="server_error")] * 3)
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**CHAT)
    assert len(primary.requests_to(PATH)) == 1 and len(secondary.requests_to(AZURE_PATH)) == on_secondary
    assert recorder.requests[-1].attempts == attempts and recorder.requests[-1].stop_reason == stop
    # backoff only between attempts on the same upstream
    assert len(proxy.sleeps.calls) == on_secondary - 1
    assert [r.upstream for r in recorder.retries] == ["secondary"] * (on_secondary - 1)


async def test_failover_is_logged_and_counted_by_upstream(start, primary, secondary, capsys, leaks):
    proxy = await start()
    primary.script(PATH, error(503, "down", type="server_error"))
    raw = await chat(proxy, extra_headers={"x-request-id": "req-failover-1"})
    WRITER.flush()
    out, err = capsys.readouterr()
    leaks.texts.append(out + err)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    (move,) = [line for line in lines if line["event"] == "failover"]
    assert {k: move[k] for k in ("request_id", "route", "from", "to", "category", "attempt")} == {
        "request_id": "req-failover-1", "route": "chat", "from": "primary", "to": "secondary",
        "category": "server", "attempt": 1}
    (request,) = [line for line in lines if line["event"] == "request"]
    assert request["upstream"] == "secondary" and request["attempts"] == 2
    assert raw.headers["x-proxy-request-id"] == "req-failover-1"
    got = metrics(proxy)

    def attempts(upstream: str, category: str) -> float:
        return got[("openai_proxy_attempts_total", (("category", category), ("route", "chat"), ("upstream", upstream)))]
    assert attempts("primary", "server") == 1 and attempts("secondary", "ok") == 1
    assert attempts("primary", "ok") == 0 and attempts("secondary", "server") == 0
    assert {dict(labels)["upstream"] for name, labels in got if name == "openai_proxy_attempts_total"} == {
        "primary", "secondary"}  # config names only (the unused default route shows no attempts yet)


# ---- config errors ---------------------------------------------------------------------------------------

def check_config(tmp_path: Path, doc: dict, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "failover.yaml"
    path.write_text(yaml.safe_dump(doc))
    full = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_") and k != ENV} | (env or {})
    return subprocess.run([sys.executable, "-m", "proxy", "--config", str(path), "--check-config"], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=60)


def with_route(route: dict) -> dict:
    doc = failover_config("http://127.0.0.1:1", "http://127.0.0.1:2")
    doc["routes"] = [route]
    return doc


@pytest.mark.parametrize("doc, key, words", [
    (with_route({"name": "video", "path": "/v1/videos/{id}", "upstreams": ["primary", "secondary"]}),
     "routes[0].upstreams", "route 'video'"),
    (with_route({"name": "files", "path": "/v1/files/*", "upstreams": ["primary", "secondary"]}),
     "routes[0].upstreams", "prefix path /v1/files/*"),
    (with_route({"name": "chat", "path": PATH, "upstreams": ["primary", "tertiary"]}),
     "routes[0].upstreams[1]", "unknown upstream 'tertiary'"),
    (with_route({"name": "chat", "path": PATH, "upstreams": ["primary", "secondary"],
                 "failover_on": ["server", "client"]}),
     "routes[0].failover_on[1]", "'client' is the caller's error"),
])
def test_check_config_refuses_bad_failover_routes(tmp_path, leaks, doc, key, words):
    done = check_config(tmp_path, doc, {ENV: SECRET})
    leaks.texts.append(done.stdout + done.stderr)
    assert done.returncode == 2 and done.stdout == ""
    assert f"failover.yaml: {key}: " in done.stderr and words in done.stderr and "Traceback" not in done.stderr


def test_check_config_refuses_a_missing_secret(tmp_path, leaks):
    done = check_config(tmp_path, failover_config("http://127.0.0.1:1", "http://127.0.0.1:2"))
    leaks.texts.append(done.stdout + done.stderr)
    assert done.returncode == 2
    assert f"upstreams.secondary.auth.value_from_env: the environment variable {ENV} is not set" in done.stderr


# ---- the canary -------------------------------------------------------------------------------------------

async def test_the_injected_secret_never_leaks(start, primary, secondary, capsys, leaks, tmp_path):
    proxy = await start()
    primary.script(PATH, error(503, "down", type="server_error"))
    await chat(proxy)  # fails over, succeeds
    async with sdk(proxy) as client:
        primary.script(PATH, error(503, "down", type="server_error"))
        secondary.script(AZURE_PATH, error(401, "Incorrect API key provided: " + SECRET, type="invalid_request_error"))
        with pytest.raises(openai.AuthenticationError):  # the secondary's own 401, relayed as it was sent
            await client.chat.completions.create(**CHAT)
        primary.script(PATH, Reset())
        secondary.script(AZURE_PATH, Reset(), Reset())
        with pytest.raises(openai.InternalServerError):  # every attempt reset: a proxy-made 502
            await client.chat.completions.create(**CHAT)
    scraped = generate_latest(proxy.registry).decode()
    checked = check_config(tmp_path, failover_config(primary.url, secondary.url), {ENV: SECRET})
    assert checked.returncode == 0 and "value_from_env: " + ENV in checked.stdout
    WRITER.flush()
    out, err = capsys.readouterr()
    leaks.texts.append(out + err + checked.stdout + checked.stderr)
    sources = {"logs": out + err, "/metrics": scraped, "--check-config": checked.stdout + checked.stderr,
               "error bodies": b"".join(leaks.error_bodies).decode(), "config repr": repr(proxy.config)}
    assert [name for name, text in sources.items() if SECRET in text] == []
    assert any(body for body in leaks.error_bodies)  # a proxy-made error was written, and checked
