"""Shared fixtures: the mock upstream, a proxy in this process or as a real subprocess, SDK clients.

Test configs use millisecond timeouts and backoffs; nothing waits on the wall clock, and every
wait is on an event (a request arriving, a log line, a gate).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from proxy.logs import WRITER
from proxy import config as cfg
from proxy.app import TrafficServer, standard_observers
from proxy.errors import ProxyError
from proxy.logs import configure as configure_logs
from proxy.events import AttemptFinished, Event, RequestFinished, RetryScheduled
from proxy.testing import MockUpstream

ROOT = Path(__file__).resolve().parents[1]
TEST_KEY = "sk-proj-test-0000000000000000000000000000abcd"  # the canary: no output may ever hold it
CANARY = TEST_KEY[8:-4]  # its secret middle: masking may keep "sk-" and the last four, never this

# Fast but not flaky: first_byte/idle long enough for a loaded CI machine, short where a test needs it.
FAST_DEFAULTS: dict[str, Any] = {
    "timeouts": {"connect": "2s", "first_byte": "10s", "idle": "10s", "total": "30s"},
    "retry": {"backoff": {"initial": "1ms", "max": "5ms"}},
}


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def write_config(tmp_path: Path, upstream: str, extra: dict[str, Any] | None = None) -> Path:
    doc: dict[str, Any] = {"upstream": {"url": upstream}, "defaults": FAST_DEFAULTS}
    doc = _deep_merge(doc, extra or {})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class FakeClock:
    """A monotonic clock that moves only when a test sets `t`: breakers, budgets and deadlines
    run on it, so an open period or a window passes without waiting."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as m:
        yield m


class LeakCheck:
    """Everything a test made the proxy write, checked for the canary key when the test ends."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.registries: list[CollectorRegistry] = []
        self.error_bodies: list[bytes] = []

    def check(self, out: str, err: str) -> None:
        sources = {"stdout": out, "stderr": err}
        for i, text in enumerate(self.texts):
            sources[f"proxy process output {i}"] = text
        for i, registry in enumerate(self.registries):
            sources[f"/metrics {i}"] = generate_latest(registry).decode()
        for i, body in enumerate(self.error_bodies):
            sources[f"proxy-made error body {i}"] = body.decode()
        leaked = [name for name, text in sources.items() if CANARY in text]
        assert not leaked, f"the API key leaked into: {leaked}"


@pytest.fixture(autouse=True)
def leaks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[LeakCheck]:
    """Every test passes through this: nothing it made the proxy write may contain the key.

    Integration and reliability tests also have their captured stdout/stderr checked (a test that
    captures with `capsys` instead adds what it captured to `leaks.texts` itself); subprocesses'
    output is added to `texts` by the tests that start them."""
    check = LeakCheck()
    where = str(request.path)
    captured = ("integration" in where or "reliability" in where) and "capsys" not in request.fixturenames
    capfd = request.getfixturevalue("capfd") if captured else None
    original = ProxyError.parts  # every proxy-made error body is built here, whichever path writes it

    def spy(self: ProxyError, extra: Any = None) -> tuple[list[tuple[str, str]], bytes]:
        headers, body = original(self, extra)
        check.error_bodies.append(body)
        return headers, body

    monkeypatch.setattr(ProxyError, "parts", spy)
    yield check
    out = err = ""
    if capfd is not None:
        WRITER.flush()
        out, err = capfd.readouterr()
        sys.stdout.write(out)  # keep it visible in pytest's report of a failing test
        sys.stderr.write(err)
    check.check(out, err)


@dataclass
class RunningProxy:
    url: str  # http://127.0.0.1:PORT
    server: TrafficServer
    config: cfg.ProxyConfig
    registry: CollectorRegistry

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


class Recorder:
    """An observer that keeps every event, for assertions on attempts, retries and stop reasons."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, kind: type, n: int = 1, timeout: float = 10) -> list[Any]:
        """Wait (on the events themselves, no polling) until `n` events of `kind` were seen."""
        async def wait() -> list[Any]:
            while len(found := self.of(kind)) < n:
                self._changed.clear()
                await self._changed.wait()
            return found
        return await asyncio.wait_for(wait(), timeout)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def requests(self) -> list[RequestFinished]:
        return self.of(RequestFinished)

    @property
    def retries(self) -> list[RetryScheduled]:
        return self.of(RetryScheduled)

    @property
    def attempts(self) -> list[AttemptFinished]:
        return self.of(AttemptFinished)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def start_proxy(tmp_path: Path, mock: MockUpstream, recorder: Recorder, leaks: LeakCheck) -> AsyncIterator[ProxyFactory]:
    """Start the traffic app in this event loop on an ephemeral port; upstream defaults to the mock.

    Every event goes to `recorder`; `options` inject the forwarder's clock, rng or sleep."""
    servers: list[TrafficServer] = []

    async def start(extra: dict[str, Any] | None = None, upstream: str | None = None, **options: Any) -> RunningProxy:
        path = write_config(tmp_path, upstream or mock.url, extra or {})
        config = cfg.load(str(path))
        configure_logs(config.log.level, config.log.format)
        registry = CollectorRegistry()
        leaks.registries.append(registry)
        observers = [*standard_observers(config, registry), recorder]
        server = TrafficServer(config, observers, shutdown_timeout=2.0, **options)
        await server.setup()
        servers.append(server)
        await server.listen("127.0.0.1", 0)
        host, port = server.addresses[0][:2]
        return RunningProxy(f"http://{host}:{port}", server, config, registry)

    yield start
    for server in servers:
        await server.cleanup()


@pytest.fixture
async def proxy(start_proxy: ProxyFactory) -> RunningProxy:
    return await start_proxy()


@pytest.fixture
async def client(proxy: RunningProxy) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK pointed at the proxy, its own retries off so each test counts exactly."""
    c = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0, timeout=30)
    yield c
    await c.close()


@dataclass
class ProxyProcess:
    """`python -m proxy` as a real process; ports come from its own `listening` log line."""

    proc: asyncio.subprocess.Process
    traffic: str = ""
    admin: str = ""
    lines: list[dict[str, Any]] = field(default_factory=list)
    output: str = ""

    async def wait_event(self, event: str, timeout: float = 20,
                         where: Callable[[dict[str, Any]], bool] = lambda line: True) -> dict[str, Any]:
        """The first log line of `event` (that `where` accepts), read so far or arriving next."""
        def hit(line: dict[str, Any]) -> bool:
            return line.get("event") == event and where(line)

        async def read() -> dict[str, Any]:
            for line in self.lines:
                if hit(line):
                    return line
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"proxy exited before logging {event!r}; stderr: {await self._err()}")
                line = json.loads(raw)
                self.lines.append(line)
                if hit(line):
                    return line
        return await asyncio.wait_for(read(), timeout)

    async def _err(self) -> str:
        assert self.proc.stderr is not None
        try:
            return (await asyncio.wait_for(self.proc.stderr.read(), 5)).decode()
        except asyncio.TimeoutError:
            return "<no stderr>"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def finish(self, timeout: float = 20) -> tuple[int, str, str]:
        """Wait for exit; returns (code, rest of stdout, stderr). Kept in `output` for the leak check."""
        if self.proc.returncode is not None and self.output:
            return self.proc.returncode, "", ""
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.output += out.decode() + err.decode()
        return self.proc.returncode or 0, out.decode(), err.decode()


async def spawn_proxy(*args: str, env: dict[str, str] | None = None, wait_listening: bool = True) -> ProxyProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, env=full_env, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    p = ProxyProcess(proc)
    if wait_listening:
        ev = await p.wait_event("listening")
        p.traffic = "http://" + ev["traffic"][0]
        p.admin = "http://" + ev["admin"][0].replace("0.0.0.0", "127.0.0.1")
    return p


@pytest.fixture
async def proxy_process(leaks: LeakCheck) -> AsyncIterator[Callable[..., Awaitable[ProxyProcess]]]:
    procs: list[ProxyProcess] = []

    async def start(*args: str, **kw: Any) -> ProxyProcess:
        p = await spawn_proxy(*args, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.returncode is None:
            p.proc.kill()
        await p.finish()
        leaks.texts.append(json.dumps(p.lines) + p.output)
