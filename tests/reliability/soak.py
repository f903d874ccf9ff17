"""Fault soak: nothing lost, nothing hung, nothing leaked.

Drives a real `python -m proxy` process (and a second one whose upstream is a closed port, for
"connection refused") through the official SDK (`openai.AsyncOpenAI`, max_retries=0) and raw
aiohttp clients at a fixed concurrency, while the in-process mock upstream injects a random fault
(seeded RNG) into a share of the requests: resets before headers and mid-body, slow headers,
stalled streams, 5xx, 429 (rate limit with retry-after-ms, and quota), malformed JSON in a 200,
a Content-Length longer than the body, an in-band SSE error frame, an SSE stream cut without its
end marker. Each fault hits the first attempt only ("transient": a retry may heal it) or every
attempt ("persistent"), through the mock's per-request scripts (`x-mock-script`).

Checked per request and reported as counts:

* every response is complete and byte-correct (hashes, parsed shapes, token streams) or an error
  the client can see: a proxy-made OpenAI error (`x-proxy-error`), a passed-through upstream
  error, an in-band stream error, or an aborted connection; a clean end on a wrong or short body
  is a *silent truncation*;
* no request outlives its deadline (`timeouts.total` + a margin), no client hangs;
* the proxy's open fds and upstream connections return to the baseline, RSS stays within +-10 %
  between the first and the last quarter of the run;
* the proxy's /metrics reconcile with the client's counts (requests by status class, errors by
  category where the client can tell the category);
* the canary API key never appears in the proxies' output, /metrics or proxy-made errors.

    python bench/soak.py --requests 20000 --concurrency 50 --seed 1

exits 0 when every invariant holds, 1 otherwise, and prints the figures (--json FILE writes
them too). tests/reliability/test_soak.py runs a short version through `run_soak`; the code lives
here, beside the tests that share its helpers, and bench/soak.py is its command.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python bench/soak.py` from anywhere
    sys.path.insert(0, str(ROOT))

from proxy.testing import (  # noqa: E402
    HELLO,
    SCRIPT_HEADER,
    CutBody,
    Delay,
    MockUpstream,
    OverLength,
    Reset,
    Respond,
    SSECut,
    SSEErrorFrame,
    Stall,
    Step,
    error,
    insufficient_quota,
    mock_bytes_sha256,
    rate_limited,
)

DEFAULT_KEY = "sk-proj-soak-0000000000000000000000000000wxyz"
MALFORMED = b'{"id":"chatcmpl-broken","object":"chat.completion","choices":[{"index":0,'
TOKENS = "".join(f"tok{i} " for i in range(5))  # the mock's stream text (sse_events=5)
PERSISTENT = 8  # more than any route's max_attempts: every attempt fails

# Timeouts of the soak config: short enough for a quick run, long enough for a loaded 2-core box.
TIMEOUTS = {"connect": "1s", "first_byte": "800ms", "idle": "800ms", "total": "4s"}
TOTAL_S = 4.0
SLOW_S = 1.2  # slow headers / stalls: longer than first_byte and idle

KINDS: dict[str, int] = {  # kind -> weight
    "sdk_chat": 16, "sdk_chat_stream": 13, "sdk_responses_stream": 10, "sdk_upload": 6, "sdk_download": 5,
    "raw_chat": 14, "raw_chat_stream": 10, "raw_download": 14, "raw_upload": 12,
}
STREAMS = frozenset({"sdk_chat_stream", "sdk_responses_stream", "raw_chat_stream"})
CHAT_STREAMS = frozenset({"sdk_chat_stream", "raw_chat_stream"})
DOWNLOADS = frozenset({"sdk_download", "raw_download"})
JSON_BODIES = frozenset({"sdk_chat", "raw_chat", "sdk_upload", "raw_upload"})

FAULTS = (
    "connect_refused", "reset_before_headers", "reset_mid_body", "slow_headers", "stall_mid_stream",
    "http_500", "http_502", "http_503", "http_504", "rate_limited", "quota", "malformed_json",
    "over_length", "sse_error_frame", "sse_cut_no_done",
)

# The proxy's error codes and the categories they stand for (README: "What a client sees").
CODE_CATEGORY = {
    "upstream_connect_error": "connect", "upstream_network_error": "network", "upstream_timeout": "timeout",
    "invalid_upstream_response": "invalid_response", "circuit_open": "circuit_open",
}
# Categories a cut connection may stand for: the client cannot tell which.
ABORT_CATEGORIES = ("network", "timeout", "invalid_response")
ALL_CATEGORIES = ("connect", "network", "timeout", "server", "rate_limit", "quota_exceeded", "authentication",
                  "client", "invalid_response", "circuit_open")


# --------------------------------------------------------------------------- request plan


@dataclasses.dataclass(frozen=True)
class Planned:
    index: int
    kind: str
    fault: str | None
    times: int  # attempts the fault hits
    steps: tuple[Step, ...]
    size: int  # download or upload size in bytes (0 for chat)
    seed: int  # payload bytes

    @property
    def key(self) -> str:
        return f"soak-{self.index}"


def _applicable(kind: str) -> list[str]:
    out = ["connect_refused", "reset_before_headers", "reset_mid_body", "slow_headers", "stall_mid_stream",
           "http_500", "http_502", "http_503", "http_504", "rate_limited", "quota"]
    if kind in JSON_BODIES:
        out.append("malformed_json")
    if kind not in STREAMS:
        out.append("over_length")
    if kind in CHAT_STREAMS:
        out.append("sse_error_frame")
    if kind in STREAMS:
        out.append("sse_cut_no_done")
    return out


def _fault_step(fault: str, kind: str, size: int, rng: random.Random) -> Step | None:
    if fault == "connect_refused":
        return None  # sent to the proxy whose upstream is a closed port
    if fault == "reset_before_headers":
        return Reset()
    if fault == "reset_mid_body":
        if kind in STREAMS:
            return SSECut(after_events=rng.randint(1, 4), clean=False)
        if kind in DOWNLOADS:
            return CutBody(after_bytes=rng.randrange(0, size))
        return CutBody(after_bytes=rng.randint(0, 40))
    if fault == "slow_headers":
        return Delay(rng.uniform(0.05, SLOW_S))  # some within first_byte, some past it
    if fault == "stall_mid_stream":
        if kind in STREAMS:
            return Stall(after_events=rng.randint(1, 4), seconds=SLOW_S)
        pieces = max(1, -(-size // (64 * 1024))) if kind in DOWNLOADS else 1
        return Stall(after_events=rng.randrange(0, pieces), seconds=SLOW_S)
    if fault.startswith("http_"):
        return error(int(fault[5:]))
    if fault == "rate_limited":
        return rate_limited(retry_after_ms=str(rng.randint(1, 20)))
    if fault == "quota":
        return insufficient_quota()
    if fault == "malformed_json":
        return Respond(200, MALFORMED, {"Content-Type": "application/json"})
    if fault == "over_length":
        return OverLength(extra_bytes=rng.randint(1, 4096))
    if fault == "sse_error_frame":
        return SSEErrorFrame(after_events=rng.randint(0, 4))
    if fault == "sse_cut_no_done":
        return SSECut(after_events=rng.randint(0, 4), clean=True)
    raise ValueError(fault)


def plan(n: int, seed: int, fault_rate: float, start: int = 0) -> list[Planned]:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    out = []
    for i in range(start, start + n):
        kind = rng.choices(kinds, weights)[0]
        size = 0
        if kind in DOWNLOADS:
            size = rng.randint(1024, 256 * 1024)
        elif kind in ("sdk_upload", "raw_upload"):
            size = rng.randint(1, 128 * 1024)
        fault, times, steps = None, 0, ()
        if rng.random() < fault_rate:
            fault = rng.choice(_applicable(kind))
            times = 1 if rng.random() < 0.5 else PERSISTENT
            step = _fault_step(fault, kind, size, rng)
            steps = (step,) * times if step is not None else ()
        out.append(Planned(i, kind, fault, times, steps, size, rng.getrandbits(32)))
    return out


def _payload(p: Planned) -> bytes:
    return random.Random(p.seed).randbytes(p.size)


# --------------------------------------------------------------------------- outcomes


@dataclasses.dataclass
class Result:
    outcome: str  # ok | proxy_error | upstream_error | inband_error | malformed_passthrough | aborted | VIOLATION kinds
    status_class: str | None  # 2xx..5xx, aborted, or None (hung)
    category: str | None = None  # the failure category the client can tell, if any
    detail: str = ""
    proxy_error_body: bytes | None = None


VIOLATIONS = ("silent_truncation", "hung", "unexpected")


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


def _passthrough_category(status: int, body: Any) -> str:
    if status >= 500:
        return "server"
    if status in (401, 403):
        return "authentication"
    if status == 429:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and "insufficient_quota" in (err.get("type"), err.get("code")):
            return "quota_exceeded"
        return "rate_limit"
    return "client"


def _error_result(status: int, headers: Any, raw: bytes) -> Result:
    """A >= 400 answer (or a proxy-made one): proxy error or passed-through upstream error."""
    code = headers.get("x-proxy-error")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if code:
        ok_shape = (isinstance(body, dict) and isinstance(body.get("error"), dict)
                    and body["error"].get("code") == code and body["error"].get("type") == "proxy_error")
        if not ok_shape or code not in CODE_CATEGORY:
            return Result("unexpected", _status_class(status), detail=f"bad proxy error {status} {raw[:200]!r}")
        return Result("proxy_error", _status_class(status), CODE_CATEGORY[code], code, proxy_error_body=raw)
    if status < 400:
        return Result("unexpected", _status_class(status), detail=f"status {status}")
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        return Result("unexpected", _status_class(status), detail=f"upstream error body not passed through: {raw[:200]!r}")
    return Result("upstream_error", _status_class(status), _passthrough_category(status, body), str(status))


def _check_sse_chat(body: bytes) -> Result:
    if b'data: {"error"' in body:
        return Result("inband_error", "2xx", "server", "sse error frame")
    frames = [f for f in body.split(b"\n\n") if f]
    if not frames or frames[-1] != b"data: [DONE]":
        return Result("silent_truncation", "2xx", detail=f"stream ended cleanly without [DONE] ({len(body)} bytes)")
    text = ""
    for f in frames[:-1]:
        doc = json.loads(f[len(b"data: "):])
        text += doc["choices"][0]["delta"].get("content") or ""
    if text != TOKENS:
        return Result("silent_truncation", "2xx", detail=f"stream text {text!r}")
    return Result("ok", "2xx")


# --------------------------------------------------------------------------- one request


class Clients:
    def __init__(self, main_url: str, dead_url: str, key: str) -> None:
        self.key = key
        self.urls = {"main": main_url, "dead": dead_url}
        self.sdk = {name: openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
                    for name, url in self.urls.items()}
        self.raw = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def close(self) -> None:
        for c in self.sdk.values():
            await c.close()
        await self.raw.close()


async def _sdk_request(c: openai.AsyncOpenAI, p: Planned) -> Result:
    headers = {SCRIPT_HEADER: p.key}
    messages = [{"role": "user", "content": "hi"}]
    status: int | None = None
    try:
        if p.kind == "sdk_chat":
            raw = await c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages,
                                                                    extra_headers=headers)
            status = raw.status_code
            try:
                completion = raw.parse()
            except ValueError:  # json.JSONDecodeError: the upstream's 200 was not JSON
                body = raw.http_response.content
                if body == MALFORMED:
                    return Result("malformed_passthrough", "2xx")
                return Result("silent_truncation", "2xx", detail=f"unparsable 200 {body[:100]!r}")
            if completion.choices[0].message.content != HELLO:
                return Result("silent_truncation", "2xx", detail="wrong completion")
            return Result("ok", "2xx")
        if p.kind == "sdk_chat_stream":
            stream = await c.chat.completions.create(model="gpt-4o", messages=messages, stream=True,
                                                     extra_headers=headers)
            status = stream.response.status_code
            text, finish = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            if text != TOKENS or finish != "stop":
                return Result("silent_truncation", "2xx", detail=f"sdk stream ended cleanly with {text!r}")
            return Result("ok", "2xx")
        if p.kind == "sdk_responses_stream":
            stream = await c.responses.create(model="gpt-4o", input="hi", stream=True, extra_headers=headers)
            status = stream.response.status_code
            text, last = "", None
            async for event in stream:
                last = event.type
                if event.type == "response.output_text.delta":
                    text += event.delta
            if last != "response.completed" or text != TOKENS:
                return Result("silent_truncation", "2xx", detail=f"responses stream ended cleanly at {last} {text!r}")
            return Result("ok", "2xx")
        if p.kind == "sdk_upload":
            data = _payload(p)
            raw = await c.files.with_raw_response.create(file=("soak.bin", data), purpose="user_data",
                                                         extra_headers=headers)
            status = raw.status_code
            try:
                obj = raw.parse()
            except ValueError:
                body = raw.http_response.content
                if body == MALFORMED:
                    return Result("malformed_passthrough", "2xx")
                return Result("silent_truncation", "2xx", detail=f"unparsable 200 {body[:100]!r}")
            extra = obj.model_extra or {}
            if obj.bytes != len(data) or extra.get("sha256") != hashlib.sha256(data).hexdigest():
                return Result("silent_truncation", "2xx", detail="upload arrived changed")
            return Result("ok", "2xx")
        if p.kind == "sdk_download":
            content = await c.files.content(f"file-size-{p.size}", extra_headers=headers)
            status = content.response.status_code
            body = content.content
            if len(body) != p.size or hashlib.sha256(body).hexdigest() != mock_bytes_sha256(p.size):
                return Result("silent_truncation", "2xx", detail=f"download {len(body)}/{p.size} bytes, wrong hash")
            return Result("ok", "2xx")
        raise ValueError(p.kind)
    except openai.APIStatusError as exc:
        return _error_result(exc.status_code, exc.response.headers, exc.response.content)
    except openai.APIConnectionError as exc:  # APITimeoutError too: the SDK's own timeout is far longer
        return Result("aborted", "aborted", detail=type(exc.__cause__ or exc).__name__)
    except openai.APIError as exc:  # an error event inside a 200 stream
        if status == 200:
            return Result("inband_error", "2xx", "server", "sse error event")
        return Result("unexpected", None, detail=f"{type(exc).__name__}: {exc}")


async def _raw_request(s: aiohttp.ClientSession, base: str, key: str, p: Planned) -> Result:
    headers = {SCRIPT_HEADER: p.key, "Authorization": f"Bearer {key}"}
    if p.kind == "raw_chat":
        method, url, kw = "POST", "/v1/chat/completions", {"json": {"model": "gpt-4o-mini", "messages": []}}
    elif p.kind == "raw_chat_stream":
        method, url, kw = "POST", "/v1/chat/completions", {"json": {"model": "gpt-4o", "messages": [], "stream": True}}
    elif p.kind == "raw_download":
        method, url, kw = "GET", f"/v1/files/file-size-{p.size}/content", {}
    elif p.kind == "raw_upload":
        data = _payload(p)
        headers["Content-Type"] = "application/octet-stream"
        method, url, kw = "POST", f"/v1/soak/upload/{p.index}", {"data": data}
    else:
        raise ValueError(p.kind)
    try:
        resp = await s.request(method, base + url, headers=headers, **kw)
    except aiohttp.ClientError as exc:  # no status line at all
        return Result("aborted", "aborted", detail=f"before status: {type(exc).__name__}")
    async with resp:
        try:
            body = await resp.read()
        except aiohttp.ClientError as exc:
            return Result("aborted", "aborted", detail=type(exc).__name__)
        if resp.status >= 400 or "x-proxy-error" in resp.headers:
            return _error_result(resp.status, resp.headers, body)
        if resp.status != 200:
            return Result("unexpected", _status_class(resp.status), detail=f"status {resp.status}")
        if p.kind == "raw_chat_stream":
            return _check_sse_chat(body)
        if p.kind == "raw_download":
            if len(body) != p.size or hashlib.sha256(body).hexdigest() != mock_bytes_sha256(p.size):
                return Result("silent_truncation", "2xx", detail=f"download {len(body)}/{p.size} bytes, wrong hash")
            return Result("ok", "2xx")
        if body == MALFORMED:
            return Result("malformed_passthrough", "2xx")
        try:
            doc = json.loads(body)
        except ValueError:
            return Result("silent_truncation", "2xx", detail=f"unparsable 200 {body[:100]!r}")
        if p.kind == "raw_chat":
            good = doc.get("choices", [{}])[0].get("message", {}).get("content") == HELLO
        else:
            good = doc.get("body_size") == p.size and doc.get("body_sha256") == hashlib.sha256(data).hexdigest()
        return Result("ok", "2xx") if good else Result("silent_truncation", "2xx", detail="wrong body")


# --------------------------------------------------------------------------- the proxy processes


class ProxyProc:
    """`python -m proxy` with its output read as it comes: event counts, canary hits, tracebacks."""

    def __init__(self, name: str, config: Path, canary: str, keep_output: bool) -> None:
        self.name, self.config, self.canary, self.keep_output = name, config, canary, keep_output
        self.proc: asyncio.subprocess.Process | None = None
        self.traffic = self.admin = ""
        self.events: collections.Counter[str] = collections.Counter()
        self.canary_hits = 0
        self.tracebacks = 0
        self.stderr_lines = 0
        self.output: list[str] = []
        self._listening: asyncio.Future[dict[str, Any]] | None = None
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--config", str(self.config), "--port", "0", "--admin-port", "0",
            cwd=str(ROOT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=1 << 22)
        self._listening = asyncio.get_running_loop().create_future()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [asyncio.create_task(self._read(self.proc.stdout, False)),
                         asyncio.create_task(self._read(self.proc.stderr, True))]
        done, _ = await asyncio.wait([self._listening, *self._readers], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not self._listening.done():
            raise RuntimeError(f"proxy {self.name} did not start: {''.join(self.output)[-2000:]}")
        ev = self._listening.result()
        self.traffic = "http://" + ev["traffic"][0]
        self.admin = "http://" + ev["admin"][0].replace("0.0.0.0", "127.0.0.1")

    async def _read(self, stream: asyncio.StreamReader, is_err: bool) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", "replace")
            if self.canary in text:
                self.canary_hits += 1
            if "Traceback" in text:
                self.tracebacks += 1
            if self.keep_output or is_err:
                self.output.append(text)
            if is_err:
                self.stderr_lines += 1
                continue
            try:
                event = json.loads(text).get("event", "?")
            except ValueError:
                event = "<not json>"
            self.events[event] += 1
            if event == "listening" and self._listening is not None and not self._listening.done():
                self._listening.set_result(json.loads(text))

    async def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code


def _write_config(path: Path, upstream: str, *, failure_threshold: int = 5, breaker_reset: str = "250ms",
                  max_connections: int = 256) -> Path:
    doc = {
        "upstream": {"url": upstream, "max_connections": max_connections},
        "defaults": {
            "timeouts": TIMEOUTS,
            "retry": {"backoff": {"initial": "1ms", "max": "5ms"}},
            "breaker": {"failure_threshold": failure_threshold, "reset_timeout": breaker_reset},
        },
        "log": {"level": "info"},
        "shutdown_grace": "5s",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------- /proc and /metrics


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tcp_connections(pid: int, *, remote_port: int | None = None, local_port: int | None = None) -> int:
    """Sockets of `pid` (not listening) to `remote_port` or on `local_port`, from /proc/<pid>/net/tcp*."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[9] not in inodes or parts[3] == "0A":  # 0A: LISTEN
                    continue
                lport = int(parts[1].rsplit(":", 1)[1], 16)
                rport = int(parts[2].rsplit(":", 1)[1], 16)
                if (remote_port is not None and rport == remote_port) or (local_port is not None and lport == local_port):
                    count += 1
    return count


_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def parse_metrics(text: str) -> dict[str, collections.Counter[tuple[tuple[str, str], ...]]]:
    out: dict[str, collections.Counter[tuple[tuple[str, str], ...]]] = collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m["labels"])))
            out[m["name"]][labels] += float(m["value"])
    return out


def _sum_by(metrics: dict[str, Any], name: str, label: str) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for labels, value in metrics.get(name, {}).items():
        out[dict(labels)[label]] += value
    return out


async def scrape(session: aiohttp.ClientSession, admin: str) -> tuple[str, dict[str, Any]]:
    async with session.get(admin + "/metrics") as r:
        text = await r.text()
    return text, parse_metrics(text)


async def _settle(probe: Callable[[], bool], timeout: float) -> bool:
    """Poll `probe` until true or `timeout` (a deadline, not a sleep used as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class SoakReport:
    requests: int
    concurrency: int
    seed: int
    fault_rate: float
    duration_s: float = 0.0
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    faulted: int = 0
    faulted_recovered: int = 0  # a fault was injected and the client still got a complete, correct answer
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    proxy_error_codes: dict[str, int] = dataclasses.field(default_factory=dict)
    passthrough_statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    abort_details: dict[str, int] = dataclasses.field(default_factory=dict)
    silent_truncations: int = 0
    hung: int = 0
    over_deadline: int = 0
    unexpected: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)
    deadline_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    fds_baseline: int = 0
    fds_after: int = 0
    upstream_conns_baseline: int = 0
    upstream_conns_after: int = 0
    client_conns_after: int = 0
    rss_first_quarter_kib: float = 0.0
    rss_last_quarter_kib: float = 0.0
    rss_change_pct: float = 0.0
    rss_peak_kib: int = 0
    rss_by_tenth_mib: list[float] = dataclasses.field(default_factory=list)  # mean RSS in each tenth of the run
    metrics_requests_total: int = 0
    client_status_classes: dict[str, int] = dataclasses.field(default_factory=dict)
    metrics_status_classes: dict[str, int] = dataclasses.field(default_factory=dict)
    client_error_categories: dict[str, int] = dataclasses.field(default_factory=dict)
    metrics_error_categories: dict[str, int] = dataclasses.field(default_factory=dict)
    metrics_attempts_total: int = 0
    metrics_retries_total: int = 0
    request_log_lines: int = 0
    mock_requests: int = 0
    mock_unused_steps: int = 0
    canary_hits: int = 0
    proxy_tracebacks: int = 0
    proxy_exit_codes: dict[str, int] = dataclasses.field(default_factory=dict)
    mismatches: list[str] = dataclasses.field(default_factory=list)

    def violations(self) -> list[str]:
        v = []
        if self.silent_truncations:
            v.append(f"{self.silent_truncations} silent truncations")
        if self.hung:
            v.append(f"{self.hung} hung clients")
        if self.over_deadline:
            v.append(f"{self.over_deadline} requests outlived their deadline")
        if self.unexpected:
            v.append(f"{self.unexpected} unexpected outcomes")
        if self.fds_after > self.fds_baseline:
            v.append(f"open fds {self.fds_after} > baseline {self.fds_baseline}")
        if self.upstream_conns_after > self.upstream_conns_baseline:
            v.append(f"upstream connections {self.upstream_conns_after} > baseline {self.upstream_conns_baseline}")
        if abs(self.rss_change_pct) > 10:
            v.append(f"RSS changed {self.rss_change_pct:+.1f} % between the first and last quarter")
        if self.canary_hits:
            v.append(f"the API key appeared {self.canary_hits} times in proxy output, metrics or errors")
        if self.proxy_tracebacks:
            v.append(f"{self.proxy_tracebacks} tracebacks in proxy output")
        if any(code != 0 for code in self.proxy_exit_codes.values()):
            v.append(f"proxy exit codes {self.proxy_exit_codes}")
        v.extend(self.mismatches)
        if self.examples and not v:
            v.append("examples recorded without a violation")
        return v

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def render(self) -> str:
        lines = [f"soak: {self.requests} requests, concurrency {self.concurrency}, seed {self.seed}, "
                 f"fault rate {self.fault_rate:.0%}, {self.duration_s:.1f} s ({self.requests / max(self.duration_s, 1e-9):.0f} req/s)"]
        for k, v in self.to_dict().items():
            if k in ("requests", "concurrency", "seed", "fault_rate", "duration_s"):
                continue
            lines.append(f"  {k}: {v}")
        violations = self.violations()
        lines.append("RESULT: " + ("PASS: every invariant holds" if not violations else "FAIL: " + "; ".join(violations)))
        return "\n".join(lines)


async def _drive(items: list[Planned], concurrency: int, clients: Clients, mock: MockUpstream, deadline: float,
                 on_result: Callable[[Planned, Result, float], None]) -> None:
    queue = iter(items)

    async def one(p: Planned) -> None:
        if p.steps:
            mock.script_request(p.key, *p.steps)
        target = "dead" if p.fault == "connect_refused" else "main"
        began = time.monotonic()
        try:
            async with asyncio.timeout(deadline):
                if p.kind.startswith("sdk_"):
                    result = await _sdk_request(clients.sdk[target], p)
                else:
                    result = await _raw_request(clients.raw, clients.urls[target], clients.key, p)
        except TimeoutError:
            result = Result("hung", None, detail=f"no end within {deadline:.1f} s")
        except Exception as exc:  # noqa: BLE001 - anything the classifiers did not expect is a finding
            result = Result("unexpected", None, detail=f"{type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - began
        mock.forget(p.key)  # steps a request did not use (it was not retried) must not stay queued
        on_result(p, result, elapsed)

    async def worker() -> None:
        for p in queue:
            await one(p)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_soak(*, requests: int = 1500, concurrency: int = 50, seed: int = 1, fault_rate: float = 0.3,
                   warmup: int | None = None, key: str = DEFAULT_KEY, workdir: Path | None = None,
                   keep_output: bool = False, progress: Callable[[str], None] | None = None) -> tuple[SoakReport, list[str]]:
    """Run the soak; returns the report and (with keep_output) every line the proxies wrote."""
    say = progress or (lambda msg: None)
    canary = key[8:-4] if len(key) > 16 else key
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="soak-")
        workdir = Path(tmp.name)
    report = SoakReport(requests, concurrency, seed, fault_rate)
    deadline = TOTAL_S + 4.0  # the proxy's timeouts.total + a margin for a loaded machine
    report.deadline_s = deadline
    closed = socket.socket()  # bound, never listening: connecting to it is refused
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    mock = MockUpstream(keepalive_timeout=0.5, keep_received=False)
    await mock.start()
    # the main proxy's breaker opens after 10 consecutive counted failures (30 % faults trip 5 often,
    # and an open breaker would answer instead of the faults under test); the dead one's after 5
    main = ProxyProc("main", _write_config(workdir / "soak-main.yaml", mock.url, failure_threshold=10), canary,
                     keep_output)
    dead = ProxyProc("dead", _write_config(workdir / "soak-dead.yaml", f"http://127.0.0.1:{closed_port}"), canary,
                     keep_output)
    admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))  # no idle fd in the proxy
    try:
        await asyncio.gather(main.start(), dead.start())
        say(f"proxies up: main {main.traffic} (pid {main.pid}), dead {dead.traffic} (pid {dead.pid})")

        # warm-up: every code path once, caches filled; not part of the figures
        # warm-up to a steady state: the bounded caches (4096 paths) fill and the allocator reaches its high-water
        # mark within ~5,000 requests (docs/reliability.md); the RSS quarters are compared after that
        n_warm = warmup if warmup is not None else min(5000, max(50, requests // 4))
        clients = Clients(main.traffic, dead.traffic, key)
        await _drive(plan(n_warm, seed + 1_000_003, fault_rate, start=10**9), concurrency, clients, mock, deadline,
                     lambda p, r, t: None)
        await clients.close()
        await _settle(lambda: tcp_connections(main.pid, remote_port=mock.port) == 0
                      and tcp_connections(main.pid, local_port=int(main.traffic.rsplit(":", 1)[1])) == 0, 15)
        report.fds_baseline = open_fds(main.pid)
        report.upstream_conns_baseline = tcp_connections(main.pid, remote_port=mock.port)
        before = [await scrape(admin, p.admin) for p in (main, dead)]
        say(f"warm-up: {n_warm} requests; baseline {report.fds_baseline} fds, "
            f"{report.upstream_conns_baseline} upstream connections")

        items = plan(requests, seed, fault_rate)
        report.kinds = dict(collections.Counter(p.kind for p in items))
        report.faults = dict(collections.Counter(p.fault for p in items if p.fault))
        report.faulted = sum(1 for p in items if p.fault)
        outcomes: collections.Counter[str] = collections.Counter()
        codes: collections.Counter[str] = collections.Counter()
        statuses: collections.Counter[str] = collections.Counter()
        aborts: collections.Counter[str] = collections.Counter()
        classes: collections.Counter[str] = collections.Counter()
        categories: collections.Counter[str] = collections.Counter()
        latencies: list[float] = []
        done = 0
        rss: list[tuple[int, int]] = []  # (requests done, kib)

        def on_result(p: Planned, r: Result, elapsed: float) -> None:
            nonlocal done
            done += 1
            latencies.append(elapsed)
            outcomes[r.outcome] += 1
            if r.status_class:
                classes[r.status_class] += 1
            if r.category:
                categories[r.category] += 1
            if r.outcome == "proxy_error":
                codes[r.detail] += 1
                if r.proxy_error_body and canary.encode() in r.proxy_error_body:
                    report.canary_hits += 1
            elif r.outcome == "upstream_error":
                statuses[r.detail] += 1
            elif r.outcome == "aborted":
                aborts[r.detail] += 1
            if r.outcome == "ok" and p.fault:
                report.faulted_recovered += 1
            if elapsed > deadline:
                report.over_deadline += 1
            if r.outcome in VIOLATIONS or r.outcome == "silent_truncation":
                if len(report.examples) < 20:
                    report.examples.append(f"#{p.index} {p.kind} fault={p.fault}x{p.times}: {r.outcome} {r.detail}")
            if done % max(1, requests // 10) == 0:
                say(f"  {done}/{requests} done")

        stop_sampling = asyncio.Event()

        async def sample() -> None:
            while not stop_sampling.is_set():
                with contextlib.suppress(OSError):
                    rss.append((done, rss_kib(main.pid)))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_sampling.wait(), 0.05)

        mock_before = mock.arrivals
        clients = Clients(main.traffic, dead.traffic, key)
        sampler = asyncio.create_task(sample())
        began = time.monotonic()
        await _drive(items, concurrency, clients, mock, deadline, on_result)
        report.duration_s = time.monotonic() - began
        stop_sampling.set()
        await sampler
        await clients.close()
        report.mock_requests = mock.arrivals - mock_before
        report.mock_unused_steps = sum(len(q) for q in mock._keyed.values())

        # resources back to the baseline: idle pooled connections are closed by the mock's keep-alive timeout
        await _settle(lambda: open_fds(main.pid) <= report.fds_baseline
                      and tcp_connections(main.pid, remote_port=mock.port) <= report.upstream_conns_baseline, 20)
        report.fds_after = open_fds(main.pid)
        report.upstream_conns_after = tcp_connections(main.pid, remote_port=mock.port)
        report.client_conns_after = tcp_connections(main.pid, local_port=int(main.traffic.rsplit(":", 1)[1]))

        quarter = requests / 4
        first = [k for n, k in rss if n <= quarter] or [rss[0][1]]
        last = [k for n, k in rss if n >= requests - quarter] or [rss[-1][1]]
        report.rss_first_quarter_kib = round(statistics.mean(first), 1)
        report.rss_last_quarter_kib = round(statistics.mean(last), 1)
        report.rss_change_pct = round(100 * (report.rss_last_quarter_kib / report.rss_first_quarter_kib - 1), 2)
        report.rss_peak_kib = max(k for _, k in rss)
        for tenth in range(10):
            lo, hi = requests * tenth / 10, requests * (tenth + 1) / 10
            part = [k for n, k in rss if lo <= n <= hi]
            report.rss_by_tenth_mib.append(round(statistics.mean(part) / 1024, 1) if part else 0.0)

        after = [await scrape(admin, p.admin) for p in (main, dead)]
        for text, _ in after:
            if canary in text:
                report.canary_hits += 1
        req_class: collections.Counter[str] = collections.Counter()
        err_cat: collections.Counter[str] = collections.Counter()
        for (_, m0), (_, m1) in zip(before, after):
            req_class.update(_sum_by(m1, "openai_proxy_requests_total", "status_class"))
            req_class.subtract(_sum_by(m0, "openai_proxy_requests_total", "status_class"))
            err_cat.update(_sum_by(m1, "openai_proxy_errors_total", "category"))
            err_cat.subtract(_sum_by(m0, "openai_proxy_errors_total", "category"))
            for name, attr in (("openai_proxy_attempts_total", "metrics_attempts_total"),
                               ("openai_proxy_retries_total", "metrics_retries_total")):
                delta = sum(m1.get(name, {}).values()) - sum(m0.get(name, {}).values())
                setattr(report, attr, getattr(report, attr) + int(delta))
        report.outcomes = dict(outcomes)
        report.proxy_error_codes = dict(codes)
        report.passthrough_statuses = dict(statuses)
        report.abort_details = dict(aborts)
        report.silent_truncations = outcomes["silent_truncation"]
        report.hung = outcomes["hung"]
        report.unexpected = outcomes["unexpected"]
        report.client_status_classes = dict(classes)
        report.metrics_status_classes = {k: int(v) for k, v in req_class.items() if v}
        report.metrics_requests_total = int(sum(req_class.values()))
        report.client_error_categories = dict(categories)
        report.metrics_error_categories = {k: int(v) for k, v in err_cat.items() if v}
        lat = sorted(latencies)
        report.latency_p50_ms = round(1000 * lat[len(lat) // 2], 1)
        report.latency_p99_ms = round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)
        report.latency_max_ms = round(1000 * lat[-1], 1)
        _reconcile(report)
    finally:
        await admin.close()
        codes_out = {}
        for p in (main, dead):
            if p.proc is not None:
                codes_out[p.name] = await p.stop()
        report.proxy_exit_codes = codes_out
        await mock.close()
        closed.close()
        if tmp is not None:
            tmp.cleanup()
    report.request_log_lines = main.events["request"] + dead.events["request"]
    report.canary_hits += main.canary_hits + dead.canary_hits
    report.proxy_tracebacks = main.tracebacks + dead.tracebacks
    say(report.render())
    return report, main.output + dead.output


def _reconcile(r: SoakReport) -> None:
    """The proxy's counters against what the clients saw."""
    if r.metrics_requests_total != r.requests:
        r.mismatches.append(f"openai_proxy_requests_total grew by {r.metrics_requests_total}, {r.requests} were sent")
    for cls in sorted(set(r.client_status_classes) | set(r.metrics_status_classes)):
        c, m = r.client_status_classes.get(cls, 0), r.metrics_status_classes.get(cls, 0)
        if c != m:
            r.mismatches.append(f"status class {cls}: clients saw {c}, metrics say {m}")
    aborted = r.client_status_classes.get("aborted", 0)
    spare = 0
    for cat in ALL_CATEGORIES:
        c, m = r.client_error_categories.get(cat, 0), r.metrics_error_categories.get(cat, 0)
        if cat in ABORT_CATEGORIES:
            if m < c:
                r.mismatches.append(f"errors{{category={cat}}}: clients saw {c}, metrics say {m}")
            spare += m - c
        elif c != m:
            r.mismatches.append(f"errors{{category={cat}}}: clients saw {c}, metrics say {m}")
    if spare != aborted:
        r.mismatches.append(f"{aborted} aborted responses, but {spare} network/timeout/invalid_response errors "
                            "beyond those the clients could name")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    report, _ = asyncio.run(run_soak(requests=args.requests, concurrency=args.concurrency, seed=args.seed,
                                     fault_rate=args.fault_rate, progress=lambda m: print(m, flush=True)))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 1 if report.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
