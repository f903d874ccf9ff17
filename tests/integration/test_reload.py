"""Hot reload: SIGHUP and the file watch re-read the config; a valid one serves the next request while
in-flight ones finish on the old, an invalid one changes nothing. Real processes and real signals,
except where a test needs to look inside (breakers kept or not)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import openai
import yaml
from prometheus_client import generate_latest

from proxy import config as cfg
from proxy.events import BreakerChange, BreakerState
from proxy.testing import MockUpstream, Respond, Stall

from ..conftest import TEST_KEY, write_config

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _metrics(admin: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/metrics") as r:
            return await r.text()


def _value(text: str, series: str) -> float:
    """The sum of every sample whose name and labels start with `series` (`name{a="b"`)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


async def _chats(base: str, n: int) -> list[int]:
    """`n` requests, each on a new connection (so the kernel spreads them over workers)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async def one() -> int:
            async with s.post(base + "/v1/chat/completions", json=CHAT) as r:
                await r.read()
                return r.status
        return await asyncio.gather(*[one() for _ in range(n)])


async def test_a_reload_during_50_streams_loses_none(tmp_path, mock, proxy_process):
    """50 streams are mid-body on the old upstream when the config moves to another: every one ends
    whole on the old, and the next request goes to the new."""
    async with MockUpstream() as second:
        path = write_config(tmp_path, mock.url)
        p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
        mock.script("/v1/chat/completions", *[Stall(after_events=2, gate="go")] * 50)
        client = openai.AsyncOpenAI(base_url=p.traffic + "/v1", api_key=TEST_KEY, max_retries=0, timeout=30)

        async def stream() -> list[str]:
            chunks = await client.chat.completions.create(stream=True, **CHAT)
            return [c.choices[0].delta.content or "" async for c in chunks if c.choices]

        streams = [asyncio.ensure_future(stream()) for _ in range(50)]
        await mock.wait_for_requests(50, "/v1/chat/completions")
        write_config(tmp_path, second.url)
        p.signal(signal.SIGHUP)
        line = await p.wait_event("config_reloaded")
        assert line["changed"] == ["upstream"] and line["restart_required"] == []
        mock.gate("go").set()
        done = await asyncio.gather(*streams)
        assert all(len(chunks) == mock.sse_events for chunks in done)  # each stream whole, none cut
        await client.chat.completions.create(**CHAT)
        await client.close()
        assert len(second.requests_to("/v1/chat/completions")) == 1
        assert len(mock.requests_to("/v1/chat/completions")) == 50
        text = await _metrics(p.admin)
        assert _value(text, 'openai_proxy_config_reloads_total{result="ok"}') == 1
        assert _value(text, 'openai_proxy_requests_total{route="chat_completions",status_class="2xx"}') == 51
        assert _value(text, 'openai_proxy_requests_total{route="chat_completions",status_class="aborted"}') == 0


async def test_an_invalid_file_changes_nothing(tmp_path, mock, proxy_process):
    async with MockUpstream() as second:
        path = write_config(tmp_path, mock.url)
        p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
        write_config(tmp_path, second.url, {"defaults": {"retry": {"max_attempts": 0}}})
        p.signal(signal.SIGHUP)
        line = await p.wait_event("config_reload_failed")
        assert line["level"] == "error" and line["trigger"] == "SIGHUP"
        assert str(path) in line["error"] and "defaults.retry.max_attempts" in line["error"]
        path.write_text("upstream: [unclosed\n")
        p.signal(signal.SIGHUP)
        line = await p.wait_event("config_reload_failed", where=lambda ln: "YAML" in ln["error"])
        assert str(path) in line["error"] and "line 2, column 1" in line["error"]
        assert await _chats(p.traffic, 3) == [200] * 3
        assert len(mock.requests_to("/v1/chat/completions")) == 3 and not second.received  # still the old one
        text = await _metrics(p.admin)
        assert _value(text, 'openai_proxy_config_reloads_total{result="failed"}') == 2
        assert _value(text, 'openai_proxy_config_reloads_total{result="ok"}') == 0
        assert not any(line["event"] == "config_reloaded" for line in p.lines)


async def test_a_reload_reaches_every_worker(tmp_path, mock, proxy_process):
    """--workers 2: the supervisor checks the file once and each worker applies it (its own line);
    a route new in the file is counted in the summed /metrics."""
    async with MockUpstream() as second:
        path = write_config(tmp_path, mock.url)
        p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0", "--workers", "2")
        pids = set(next(line for line in p.lines if line["event"] == "startup")["pids"])
        routes = [{"name": "chat_again", "methods": ["POST"], "path": "/v1/chat/completions"}]
        write_config(tmp_path, second.url, {"routes": routes})
        p.signal(signal.SIGHUP)
        seen: set[int] = set()

        def both(line: dict) -> bool:
            seen.add(line["pid"])
            return seen == pids
        await p.wait_event("config_reloaded", where=both)
        assert await _chats(p.traffic, 20) == [200] * 20  # new connections: both workers serve them
        assert len(second.requests_to("/v1/chat/completions")) == 20 and not mock.received
        text = await _metrics(p.admin)
        assert _value(text, 'openai_proxy_requests_total{route="chat_again",status_class="2xx"}') == 20
        assert _value(text, 'openai_proxy_config_reloads_total{result="ok"}') == 1
        # a worker restarted after the reload starts on the reloaded config, not the one from the start
        os.kill(sorted(pids)[0], signal.SIGKILL)
        await p.wait_event("worker_started", where=lambda line: line["pid"] not in pids)
        assert await _chats(p.traffic, 20) == [200] * 20
        assert len(second.requests_to("/v1/chat/completions")) == 40 and not mock.received


async def test_a_listen_change_waits_for_a_restart(tmp_path, mock, proxy_process):
    path = write_config(tmp_path, mock.url)
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    doc = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**doc, "listen": {"host": "127.0.0.2"}, "log": {"level": "debug"}}))
    p.signal(signal.SIGHUP)
    line = await p.wait_event("config_reloaded")
    assert line["level"] == "warning"
    assert line["restart_required"] == ["listen.host", "log.level"] == line["changed"]
    assert await _chats(p.traffic, 1) == [200]  # the old address still serves


def _configmap(root: Path, version: str, text: str) -> None:
    """Kubernetes' ConfigMap volume layout: config.yaml -> ..data/config.yaml, ..data -> a timestamped
    directory; an update writes a new directory and swaps ..data in one rename."""
    (root / version).mkdir()
    (root / version / "config.yaml").write_text(text)
    (root / "..data_tmp").symlink_to(version)
    os.replace(root / "..data_tmp", root / "..data")
    if not (root / "config.yaml").is_symlink():
        (root / "config.yaml").symlink_to("..data/config.yaml")


async def test_the_file_watch_follows_a_configmap_update(tmp_path, mock, proxy_process):
    async with MockUpstream() as second:
        doc = yaml.safe_load(write_config(tmp_path, mock.url).read_text())
        doc["reload"] = {"watch": True, "interval": "20ms"}
        volume = tmp_path / "volume"
        volume.mkdir()
        _configmap(volume, "..v1", yaml.safe_dump(doc))
        p = await proxy_process("--config", str(volume / "config.yaml"), "--port", "0", "--admin-port", "0")
        assert await _chats(p.traffic, 1) == [200] and len(mock.received) == 1
        _configmap(volume, "..v2", yaml.safe_dump({**doc, "upstream": {"url": second.url}}))
        line = await p.wait_event("config_reloaded")
        assert line["changed"] == ["upstream"]
        assert await _chats(p.traffic, 1) == [200] and len(second.received) == 1
        assert not any(ln["event"] == "config_reload_failed" for ln in p.lines)


async def _open_breaker(client: openai.AsyncOpenAI, mock: MockUpstream) -> None:
    """One 500 on a route with failure_threshold 1 and max_attempts 1: its breaker opens."""
    mock.script("/v1/chat/completions", Respond(500, {"error": {"message": "boom"}}))
    try:
        await client.chat.completions.create(**CHAT)
        raise AssertionError("the scripted 500 did not reach the client")
    except openai.InternalServerError:
        pass


async def test_breakers_and_budgets_survive_a_reload_unless_their_settings_change(tmp_path, mock, start_proxy,
                                                                                    recorder):
    breaker = {"failure_threshold": 1, "reset_timeout": "1h"}
    extra = {"defaults": {"retry": {"max_attempts": 1}, "breaker": breaker}}
    proxy = await start_proxy(extra)
    server = proxy.server
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
    await _open_breaker(client, mock)
    route = server.forwarder.runtime.routes.match("POST", "/v1/chat/completions").policy

    def reload(more: dict) -> None:
        server.reload(cfg.load(str(write_config(tmp_path, mock.url, {**extra, **more}))))

    reload({"routes": [{"name": "chat_completions", "methods": ["POST"], "path": "/v1/chat/completions"},
                       {"name": "extra", "path": "/v1/extra"}]})
    kept = server.forwarder.runtime.routes.match("POST", "/v1/chat/completions").policy
    assert kept is not route and kept.breaker is route.breaker and kept.budget is route.budget
    try:
        await client.chat.completions.create(**CHAT)
        raise AssertionError("the open breaker was reset by a reload")
    except openai.InternalServerError as exc:
        assert exc.response.headers["x-proxy-error"] == "circuit_open"
    assert len(mock.received) == 1
    # the route's breaker settings change: a new breaker, closed; its budget is kept
    state = 'openai_proxy_breaker_state{route="chat_completions",upstream="default"}'
    assert _value(generate_latest(proxy.registry).decode(), state) == 2
    reload({"defaults": {**extra["defaults"], "breaker": {**breaker, "failure_threshold": 2}}})
    fresh = server.forwarder.runtime.routes.match("POST", "/v1/chat/completions").policy
    assert fresh.breaker is not route.breaker and fresh.budget is route.budget
    # the dashboards see the fresh breaker: closed, with a breaker line saying so (no stuck alert)
    assert _value(generate_latest(proxy.registry).decode(), state) == 0
    (change,) = [c for c in recorder.of(BreakerChange) if c.new is BreakerState.CLOSED]
    assert (change.breaker, change.old) == ("chat_completions", BreakerState.OPEN)
    await client.chat.completions.create(**CHAT)
    assert len(mock.received) == 2
    # a route new in the config is counted under its own name
    reload({"routes": [{"name": "renamed_chat", "path": "/v1/chat/completions"}]})
    await client.chat.completions.create(**CHAT)
    await client.close()
    text = generate_latest(proxy.registry).decode()
    assert _value(text, 'openai_proxy_requests_total{route="renamed_chat",status_class="2xx"}') == 1
    assert _value(text, 'openai_proxy_requests_total{route="chat_completions",status_class="5xx"}') == 2


async def test_a_reload_keeps_each_unchanged_upstreams_pool_and_counts_a_new_one(tmp_path, mock, start_proxy):
    """Failover's named upstreams: a pool is kept while its upstream's settings stay, a new upstream
    gets a pool and its own metric series, and a removed one's pool stops pooling."""
    async with MockUpstream() as second, MockUpstream() as third:
        def upstreams(names: list[str]) -> dict:
            urls = {"primary": mock.url, "secondary": second.url, "third": third.url}
            return {"upstreams": {n: {"url": urls[n]} for n in names},
                    "routes": [{"name": "chat", "methods": ["POST"], "path": "/v1/chat/completions",
                                "upstreams": names}]}

        proxy = await start_proxy(upstreams(["primary", "secondary"]))
        server = proxy.server
        before = dict(server.forwarder.runtime.pools)
        server.reload(cfg.load(str(write_config(tmp_path, mock.url, upstreams(["primary", "third"])))))
        after = server.forwarder.runtime.pools
        assert after["primary"] is before["primary"] and "secondary" not in after
        mock.script("/v1/chat/completions", Respond(503, {"error": {"message": "down"}}))
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
        reply = await client.chat.completions.with_raw_response.create(**CHAT)
        await client.close()
        assert reply.headers["x-proxy-upstream"] == "third" and len(third.received) == 1
        text = generate_latest(proxy.registry).decode()
        assert _value(text, 'openai_proxy_attempts_total{category="ok",route="chat",upstream="third"}') == 1
        assert _value(text, 'openai_proxy_attempts_total{category="server",route="chat",upstream="primary"}') == 1


async def test_the_watch_picks_up_a_rotated_secret_file(tmp_path, mock, proxy_process):
    """A Kubernetes Secret mounted as a file is rotated in place: the watch reloads, the upstream gets
    the new key, and the line says `credentials` changed without showing either key."""
    old_key, new_key = "rotate-canary-0123456789abcdef-old", "rotate-canary-0123456789abcdef-new"
    volume = tmp_path / "secret"
    volume.mkdir()
    _configmap(volume, "..v1", old_key)  # the same layout: key file -> ..data/key
    (volume / "key").symlink_to("..data/config.yaml")
    doc = {"upstreams": {"azure": {"url": mock.url, "auth": {"header": "api-key",
                                                             "value_from_file": str(volume / "key")}}},
           "routes": [{"name": "chat", "methods": ["POST"], "path": "/v1/chat/completions", "upstreams": ["azure"]}],
           "reload": {"watch": True, "interval": "20ms"}}
    path = write_config(tmp_path, mock.url, doc)
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    assert await _chats(p.traffic, 1) == [200]
    _configmap(volume, "..v2", new_key)
    line = await p.wait_event("config_reloaded")
    assert line["changed"] == ["credentials"]
    assert await _chats(p.traffic, 1) == [200]
    assert [r.headers["api-key"] for r in mock.received] == [old_key, new_key]
    p.signal(signal.SIGTERM)
    _, out, err = await p.finish()
    assert old_key[14:] not in out + err + str(p.lines) and new_key[14:] not in out + err + str(p.lines)


async def test_a_breaker_starts_afresh_when_its_upstream_url_moves(tmp_path, mock, start_proxy):
    """Same upstream name, another server: the open breaker judged the old one, so it is not kept."""
    extra = {"defaults": {"retry": {"max_attempts": 1}, "breaker": {"failure_threshold": 1, "reset_timeout": "1h"}}}
    async with MockUpstream() as second:
        proxy = await start_proxy(extra)
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
        await _open_breaker(client, mock)
        proxy.server.reload(cfg.load(str(write_config(tmp_path, second.url, extra))))
        await client.chat.completions.create(**CHAT)  # not circuit_open: the new server is asked
        await client.close()
        assert len(second.received) == 1
