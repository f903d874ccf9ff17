"""A fake OpenAI server ("mock upstream") for the proxy's tests and benchmarks.

Why it exists: the proxy's behaviour under faults (resets, truncated bodies, stalled streams,
rate limits) can only be tested against an upstream that misbehaves on cue.  This one is:

* deterministic: fixed timestamps, ids derived from arrival order, generated binary bodies;
* scriptable per request: ``mock.script("/v1/chat/completions", Reset(), Delay(0.05))``, or per
  client request (retries included) with ``mock.script_request(key, ...)`` and an
  ``x-mock-script: key`` request header, so concurrent requests each get their own faults;
* scriptable by the client itself, from any language and through a proxy: an
  ``x-mock-faults: 500, 500, ok`` header (grammar: ``FAULT_GRAMMAR``) with ``x-mock-key: <id>``
  makes the attempts carrying that key see 500, 500, then the normal answer;
* runnable on its own: ``python -m proxy.testing --port 8081`` (``main``) prints its URL and
  serves until SIGTERM/SIGINT, for testing applications that are not written in Python;
* observable: every request is recorded in ``mock.received`` as soon as its headers arrive,
  with events telling whether the mock finished its answer or was cancelled by the peer;
* streaming all the way: request and response bodies of any size are hashed or generated
  chunk by chunk, never held whole;
* background Responses: a ``POST /v1/responses`` with ``background: true`` and ``stream: true``
  keeps its events (``sequence_number`` 0, 1, ...) under its id, and
  ``GET /v1/responses/{id}?stream=true&starting_after=N`` streams them again from N + 1, as OpenAI
  resumes a broken stream.  The steps that cut a stream (``SSECut``, ``CutBody``) cut either; a
  request and its resumes share their headers, so ``script_request(key, SSECut(3), SSECut(2))`` or
  ``x-mock-faults: cut:3, cut:2`` cuts the first stream after 3 events and the first resume after 2.

Tests synchronise on events (``wait_for_requests``, ``gate``, ``Received.finished`` /
``Received.cancelled``), never on sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import gzip
import hashlib
import itertools
import json
import math
import re
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import HttpVersion11, MultipartReader, StreamReader, web
from multidict import CIMultiDict

__all__ = [
    "FAULTS_HEADER",
    "FAULT_GRAMMAR",
    "KEY_HEADER",
    "MODELS_BODY",
    "SCRIPT_HEADER",
    "CutBody",
    "Delay",
    "FaultSyntaxError",
    "MockUpstream",
    "OverLength",
    "Raw",
    "Received",
    "Reset",
    "Respond",
    "SSECut",
    "SSEErrorFrame",
    "SetCookie",
    "Stall",
    "HoldEnd",
    "Step",
    "WaitGate",
    "error",
    "insufficient_quota",
    "main",
    "mock_bytes",
    "mock_bytes_sha256",
    "parse_faults",
    "rate_limited",
    "request_too_large",
]

CHUNK = 64 * 1024
CREATED = 1_700_000_000  # every timestamp is this, so bodies are byte-for-byte reproducible
HELLO = "Hello from the mock upstream."
_JSON_KEEP = 16 * 1024 * 1024  # JSON endpoints parse at most this much; the rest is only hashed
_FIELD_KEEP = 64 * 1024  # multipart text fields kept for parsing; file parts are only hashed


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


MODELS_BODY: bytes = _json(
    {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": CREATED, "owned_by": "system"}
            for name in ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "sora-2")
        ],
    }
)
"""The uncompressed ``GET /v1/models`` body; gzip answers are ``gzip.compress(MODELS_BODY, mtime=0)``."""

_SSE_ERROR_FRAME = b"data: " + _json(
    {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
) + b"\n\n"

# One 64 KiB block of pseudo-random bytes; mock_bytes() stamps each copy with its index.
_BLOCK = hashlib.shake_256(b"openai-resilience-proxy mock upstream").digest(CHUNK)


def mock_bytes(n: int) -> Iterator[bytes]:
    """Yield ``n`` deterministic bytes in 64 KiB chunks, cheaply, for downloads of any size.

    Each block carries its index in the first 8 bytes, so a proxy that reorders, repeats or
    drops a chunk changes the sha256 even though the rest of every block is the same.
    """
    for index, offset in enumerate(range(0, n, CHUNK)):
        block = index.to_bytes(8, "big") + _BLOCK[8:]
        yield block[: min(CHUNK, n - offset)]


def mock_bytes_sha256(n: int) -> str:
    """The sha256 hex digest of ``b"".join(mock_bytes(n))``, computed without joining."""
    digest = hashlib.sha256()
    for chunk in mock_bytes(n):
        digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- scripted steps


@dataclass(frozen=True)
class Respond:
    """Answer with exactly this status/body/headers instead of the endpoint's normal reply."""

    status: int
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Reset:
    """Read the request body, then abort the connection before any response byte."""


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` before the normal response (timeouts, hedging, slow upstreams)."""

    seconds: float


@dataclass(frozen=True)
class WaitGate:
    """Hold the normal response until the test sets ``mock.gate(name)``."""

    name: str


@dataclass(frozen=True)
class CutBody:
    """Send headers with the full Content-Length, then only ``after_bytes`` bytes, then abort."""

    after_bytes: int


@dataclass(frozen=True)
class Stall:
    """After ``after_events`` frames, pause (``seconds``, or until ``gate`` is set), then finish.

    With both given, the pause ends at whichever comes first.
    """

    after_events: int
    seconds: float | None = None
    gate: str | None = None


@dataclass(frozen=True)
class HoldEnd:
    """Send the whole body (an event stream's end marker included), then hold the response open
    before its end (``seconds``, or until ``gate`` is set): the window in which an SDK that has read
    ``data: [DONE]`` closes its connection while the proxy still waits for the upstream's end."""

    seconds: float | None = None
    gate: str | None = None


@dataclass(frozen=True)
class SSEErrorFrame:
    """A 200 stream that sends an OpenAI error frame after ``after_events`` frames, then ends."""

    after_events: int


@dataclass(frozen=True)
class SSECut:
    """After ``after_events`` frames, end cleanly without the end marker, or abort (clean=False)."""

    after_events: int
    clean: bool = False


@dataclass(frozen=True)
class SetCookie:
    """A normal response carrying ``Set-Cookie: value`` (the proxy must not leak it across clients)."""

    value: str


@dataclass(frozen=True)
class OverLength:
    """Announce a Content-Length ``extra_bytes`` longer than the body, send the body, then close cleanly.

    Unlike CutBody (an abort, RST), the connection ends with an orderly FIN: a peer that trusts a
    clean close would take the short body as complete.  Applies to known-length answers only; an
    event stream is sent as usual.
    """

    extra_bytes: int = 1


@dataclass(frozen=True)
class Raw:
    """Read the request body, then write ``data`` to the socket as is: no status line or headers of
    the mock's own (garbage instead of HTTP, enormous headers, a body that never ends).

    Then ``then``: "close" (orderly FIN), "reset" (abort) or "hold" (keep the connection open until
    ``gate`` is set or ``seconds`` pass, whichever comes first, then abort; a peer that leaves
    first sets ``Received.cancelled``).
    """

    data: bytes
    then: str = "close"
    seconds: float | None = None
    gate: str | None = None

    def __post_init__(self) -> None:
        if self.then not in ("close", "reset", "hold"):
            raise ValueError(f"Raw.then must be 'close', 'reset' or 'hold', got {self.then!r}")


Step = (Respond | Reset | Delay | WaitGate | CutBody | Stall | HoldEnd | SSEErrorFrame | SSECut | SetCookie
        | OverLength | Raw)

SCRIPT_HEADER = "x-mock-script"
"""A request carrying this header takes its steps from ``mock.script_request(<value>, ...)`` first."""


def error(
    status: int,
    message: str = "The server had an error while processing your request. Sorry about that!",
    type: str = "server_error",  # noqa: A002 - mirrors the OpenAI field name
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Respond:
    """An OpenAI-shaped error answer, so the SDK raises its typed exception for ``status``."""
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return Respond(status, body, headers)


def rate_limited(*, retry_after: str | None = None, retry_after_ms: str | None = None) -> Respond:
    """A 429 as OpenAI sends it for RPM limits, with the retry hints the proxy must honour."""
    headers = {}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    if retry_after_ms is not None:
        headers["retry-after-ms"] = retry_after_ms
    message = (
        "Rate limit reached for gpt-4o in organization org-mock on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 20ms."
    )
    return error(429, message, "requests", "rate_limit_exceeded", headers)


def insufficient_quota() -> Respond:
    """A 429 that must not be retried: the account is out of credit."""
    message = "You exceeded your current quota, please check your plan and billing details."
    return error(429, message, "insufficient_quota", "insufficient_quota")


def request_too_large() -> Respond:
    """A 429 that must not be retried: the request alone exceeds the TPM limit."""
    message = (
        "Request too large for gpt-4o in organization org-mock on tokens per min (TPM): "
        "Limit 30000, Requested 31756. The input or output tokens must be reduced in order "
        "to run successfully."
    )
    return error(429, message, "tokens", "rate_limit_exceeded")


# --------------------------------------------------------------------------- faults over HTTP headers

FAULTS_HEADER = "x-mock-faults"
"""``x-mock-faults: 500, 500, ok``: faults scripted by the client itself, from any language."""

KEY_HEADER = "x-mock-key"
"""Requests with the same ``x-mock-key`` (a client request and its retries) consume one fault list in order."""

MAX_FAULT_STEPS = 100  # steps in one header; a longer list is a 400
MAX_KEY_LENGTH = 256  # characters of an x-mock-key; with fault_keys, this bounds the mock's memory
_COUNT = re.compile(r"[0-9]{1,9}")  # events, bytes: plain digits, no sign, bounded so int() is cheap
_SECONDS = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6})?")  # no sign, exponent, inf or nan
FAULT_GRAMMAR = ("ok | <status 400-599> | quota | too_large | rate_limit[:<seconds>] | reset | delay:<seconds> "
                 "| cut:<events> | cut_body:<bytes> | sse_error:<events>")
"""The tokens of ``x-mock-faults``, comma-separated; quoted in the mock's 400 for a malformed header."""


class FaultSyntaxError(ValueError):
    """A malformed ``x-mock-faults`` header; ``token`` is the offending step, named in the mock's 400."""

    def __init__(self, token: str, reason: str) -> None:
        self.token = token
        shown = token if len(token) <= 60 else token[:57] + "..."
        super().__init__(f"{FAULTS_HEADER}: bad token {shown!r}: {reason}; expected a comma-separated list of "
                         f"{FAULT_GRAMMAR}")


# Status tokens other than 429 (rate_limited) and 5xx (error()'s server_error): OpenAI's own shapes.
_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request (a fault injected by the mock upstream).", "invalid_request_error", None),
    401: ("Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
          "invalid_request_error", "invalid_api_key"),
    403: ("Country, region, or territory not supported", "request_forbidden",
          "unsupported_country_region_territory"),
    404: ("The model `gpt-mock` does not exist or you do not have access to it.", "invalid_request_error",
          "model_not_found"),
}


def _status_fault(token: str, status: int) -> Respond:
    """A status token: the error an SDK would get from OpenAI with that status."""
    if not 400 <= status <= 599:
        raise FaultSyntaxError(token, "a status must be 400-599 (use ok for the normal answer)")
    if status == 429:
        return rate_limited()
    if status >= 500:
        return error(status)
    message, kind, code = _STATUS_ERRORS.get(
        status, (f"Request failed with status {status} (a fault injected by the mock upstream).",
                 "invalid_request_error", None))
    return error(status, message, kind, code)


def _rate_limit_fault(seconds: str | None) -> Respond:
    """``rate_limit:0.5``: both hints OpenAI sends, ``retry-after-ms`` exact, ``retry-after`` rounded up."""
    if seconds is None:
        return rate_limited()
    value = float(seconds)
    return rate_limited(retry_after=str(math.ceil(value)), retry_after_ms=str(round(value * 1000)))


# word -> (argument: None, "seconds" or a count's unit; argument optional?; builder)
_FAULT_WORDS: dict[str, tuple[str | None, bool, Callable[[str | None], Step | None]]] = {
    "ok": (None, False, lambda _: None),
    "reset": (None, False, lambda _: Reset()),
    "quota": (None, False, lambda _: insufficient_quota()),
    "too_large": (None, False, lambda _: request_too_large()),
    "rate_limit": ("seconds", True, _rate_limit_fault),
    "delay": ("seconds", False, lambda arg: Delay(float(cast(str, arg)))),
    "cut": ("events", False, lambda arg: SSECut(int(cast(str, arg)))),
    "cut_body": ("bytes", False, lambda arg: CutBody(int(cast(str, arg)))),
    "sse_error": ("events", False, lambda arg: SSEErrorFrame(int(cast(str, arg)))),
}


def _fault(token: str) -> Step | None:
    """One token of the grammar as the existing step it stands for (None: the normal answer)."""
    word, colon, arg = token.partition(":")
    word = word.lower()
    if word[:1].isdigit():
        if colon or not re.fullmatch(r"[0-9]{3}", word):
            raise FaultSyntaxError(token, "a status is three digits, like 503")
        return _status_fault(token, int(word))
    if word not in _FAULT_WORDS:
        raise FaultSyntaxError(token, "unknown fault" if token else "an empty step (an empty header, or a stray comma)")
    unit, optional, build = _FAULT_WORDS[word]
    if not colon:
        if unit is not None and not optional:
            raise FaultSyntaxError(token, f"{word} needs an argument: {word}:<{unit}>")
        return build(None)
    if unit is None:
        raise FaultSyntaxError(token, f"{word} takes no argument")
    if not (_SECONDS if unit == "seconds" else _COUNT).fullmatch(arg):
        kind = "a number of seconds like 2 or 0.5" if unit == "seconds" else "a whole number"
        raise FaultSyntaxError(token, f"{word}:<{unit}> takes {kind}")
    return build(arg)


def parse_faults(value: str) -> list[Step | None]:
    """Parse an ``x-mock-faults`` value strictly: one step (None = the normal answer) per comma-separated token.

    Raises FaultSyntaxError naming the first bad token, so a typo is a clear 400, never a silent ``ok``.
    """
    tokens = [token.strip() for token in value.split(",")]
    if len(tokens) > MAX_FAULT_STEPS:
        raise FaultSyntaxError(tokens[MAX_FAULT_STEPS],
                               f"step {MAX_FAULT_STEPS + 1} of {len(tokens)}: at most {MAX_FAULT_STEPS} in one header")
    return [_fault(token) for token in tokens]


# --------------------------------------------------------------------------- records


@dataclass
class Received:
    """One request as the mock saw it; appended when its headers arrive, before the body is read.

    ``path``/``query_string`` are the raw request target, exactly as sent.  ``body_size`` and
    ``body_sha256`` are filled once the body has been read (before the response starts).
    """

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body_size: int = 0
    body_sha256: str = ""
    arrived: float = field(default_factory=time.monotonic)
    step: Step | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


@dataclass
class _Reply:
    """A response to send: pieces are written (and flushed) one ``write`` each."""

    pieces: Iterable[bytes]
    length: int | None  # Content-Length, or None for a chunked event stream
    status: int = 200
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    tail: tuple[bytes, ...] = ()  # a stream's end marker, which SSECut/SSEErrorFrame leave out

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> _Reply:
        body = _json(obj)
        return cls([body], len(body), status, CIMultiDict({"Content-Type": "application/json"}))

    @classmethod
    def sse(cls, frames: list[bytes], tail: tuple[bytes, ...]) -> _Reply:
        headers = CIMultiDict({"Content-Type": "text/event-stream; charset=utf-8"})
        headers["Cache-Control"] = "no-cache"
        return cls(frames, None, 200, headers, tail)


@dataclass
class _Exchange:
    """Per-request state shared by the helpers of one handler run."""

    request: web.Request
    rec: Received
    n: int  # 1-based arrival number, used in generated ids
    budget: int | None = None  # CutBody: bytes still allowed out
    written: int = 0  # pieces written so far
    aborted: bool = False  # the mock itself aborted: a later CancelledError is not the peer's doing


class _HashingContent:
    """Stands in for ``request.content`` under MultipartReader so the raw body is hashed as it streams.

    MultipartReader pushes look-ahead bytes back with ``unread_data``; keeping that pushback
    here (rather than in aiohttp's deprecated ``StreamReader.unread_data``) hashes each wire
    byte exactly once and keeps DeprecationWarnings out of the tests.
    """

    def __init__(self, content: StreamReader) -> None:
        self._content = content
        self._pushback = b""
        self._digest = hashlib.sha256()
        self.size = 0

    def _fresh(self, data: bytes) -> bytes:
        self._digest.update(data)
        self.size += len(data)
        return data

    def _take(self, n: int) -> bytes:
        data, self._pushback = self._pushback[:n], self._pushback[n:]
        return data

    async def read(self, n: int = -1) -> bytes:
        if self._pushback:
            return self._take(n if n >= 0 else len(self._pushback))
        return self._fresh(await self._content.read(n))

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        if (end := self._pushback.find(b"\n")) >= 0:
            return self._take(end + 1)
        head = self._take(len(self._pushback))
        return head + self._fresh(await self._content.readline(max_line_length=max_line_length))

    def unread_data(self, data: bytes) -> None:
        self._pushback = bytes(data) + self._pushback

    def at_eof(self) -> bool:
        return not self._pushback and self._content.at_eof()

    async def drain(self) -> None:
        while await self.read(CHUNK):
            pass

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(pattern), handler)
    for method, pattern, handler in (
        ("POST", r"/v1/chat/completions", "_chat"),
        ("POST", r"/v1/completions", "_completions"),
        ("POST", r"/v1/responses", "_responses"),
        ("GET", r"/v1/responses/(?P<ident>[^/]+)", "_response_get"),
        ("POST", r"/v1/embeddings", "_embeddings"),
        ("GET", r"/v1/models", "_models"),
        ("POST", r"/v1/files", "_file_upload"),
        ("GET", r"/v1/files/(?P<ident>[^/]+)/content", "_file_content"),
        ("POST", r"/v1/uploads", "_upload_create"),
        ("POST", r"/v1/uploads/(?P<ident>[^/]+)/parts", "_upload_part"),
        ("POST", r"/v1/uploads/(?P<ident>[^/]+)/complete", "_upload_complete"),
        ("POST", r"/v1/images/edits", "_image_edit"),
        ("POST", r"/v1/videos", "_video_create"),
        ("GET", r"/v1/videos/(?P<ident>[^/]+)", "_video_get"),
        ("GET", r"/v1/videos/(?P<ident>[^/]+)/content", "_video_content"),
    )
)


def _sized(ident: str, prefix: str) -> int:
    """``file-size-3145728`` -> 3145728: tests pick a download size through the id."""
    match = re.fullmatch(re.escape(prefix) + r"(\d+)", ident)
    return int(match[1]) if match else 1024


def _event(data: Any, name: str | None = None) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + _json(data) + b"\n\n"


# --------------------------------------------------------------------------- the server


class MockUpstream:
    """A fake api.openai.com on localhost; see the module docstring."""

    def __init__(self, *, sse_events: int = 5, sse_interval: float = 0.0, keepalive_timeout: float = 75.0,
                 keep_received: bool = True, fault_keys: int = 10_000, base_path: str = "",
                 background_keep: int = 10_000) -> None:
        """``keepalive_timeout``: idle keep-alive connections are closed after this many seconds (a
        short one lets a test see a client's pooled connections go away).  ``keep_received=False``
        records nothing in ``received`` (a long soak would hold every request); counts still work.
        ``fault_keys``: the most ``x-mock-key`` positions remembered; the least recently used goes first.
        ``base_path`` (e.g. ``/openai/v1``, as Azure OpenAI's v1 endpoint): the API is served under it
        (``/openai/v1/chat/completions``) and every other path is a 404; ``received`` keeps the paths as sent."""
        if fault_keys < 1:
            raise ValueError(f"fault_keys must be at least 1, got {fault_keys}")
        if base_path and (not base_path.startswith("/") or base_path.endswith("/")):
            raise ValueError(f"base_path must start with '/' and not end with one, got {base_path!r}")
        self.base_path = base_path
        self.sse_events = sse_events
        self.sse_interval = sse_interval
        self.keepalive_timeout = keepalive_timeout
        self.keep_received = keep_received
        self.received: list[Received] = []
        self.arrivals = 0  # requests seen, recorded or not
        self.active = 0  # requests being handled right now
        self.peak_active = 0  # the most handled at once since start (or the last reset_peak())
        self._keyed: dict[str, collections.deque[Step]] = {}
        self.fault_keys = fault_keys
        # x-mock-key -> (digest of its x-mock-faults value, steps already taken); bounded, LRU order
        self._fault_positions: collections.OrderedDict[str, tuple[bytes, int]] = collections.OrderedDict()
        self.url = ""
        self.port = 0
        self._scripts: dict[tuple[str, str | None], collections.deque[Step]] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._arrivals = asyncio.Condition()
        self._uploads: dict[str, dict[str, Any]] = {}
        # background responses: id -> (every event of its stream, the final Response); bounded, LRU order
        self._background: collections.OrderedDict[str, tuple[list[bytes], dict[str, Any]]] = collections.OrderedDict()
        self.background_keep = background_keep
        self._inflight: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._closing = False

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the base URL."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a peer disconnect cancels the handler, which sets `cancelled`.
        # auto_decompress=False: a gzip request body is recorded byte-identical.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, auto_decompress=False, access_log=None, shutdown_timeout=1.0,
            keepalive_timeout=self.keepalive_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        return self.url

    async def close(self) -> None:
        """Stop listening; handlers still parked on a gate or stall are cancelled, not awaited."""
        # Let accepts already under way finish first: asyncio 3.11 leaks (ResourceWarning) a
        # socket whose accept completes after the listener closed.  Two loop turns: poll, attach.
        for _ in range(2):
            await asyncio.sleep(0)
        self._closing = True  # handlers cancelled from here on were not left by their peer
        for task in list(self._inflight):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- test controls

    def script(self, path: str, *steps: Step, method: str | None = None) -> None:
        """Queue ``steps`` for requests to ``path`` ("*" = any); each request consumes one.

        A request takes the first non-empty queue of: (path, method), (path, any method),
        ("*", method), ("*", any method).  With every queue empty it gets the normal answer.
        """
        key = (path, method.upper() if method else None)
        self._scripts.setdefault(key, collections.deque()).extend(steps)

    def script_request(self, key: str, *steps: Step) -> None:
        """Queue ``steps`` for the requests carrying ``x-mock-script: key``, one step per request.

        A client's request and the proxy's retries of it carry the same header, so
        ``script_request(key, Reset())`` fails the first attempt only, and
        ``script_request(key, *[Reset()] * 9)`` fails up to nine.  These queues come before the
        path queues of ``script``; once a key's queue is empty its requests get the normal answer.
        """
        self._keyed.setdefault(key, collections.deque()).extend(steps)

    def forget(self, key: str) -> int:
        """Drop what is left of ``key``'s queue (its request is over); returns how many steps were unused."""
        queue = self._keyed.pop(key, None)
        return len(queue) if queue else 0

    def reset_peak(self) -> None:
        self.peak_active = self.active

    def requests_to(self, path: str) -> list[Received]:
        """The recorded requests whose path (without query) is ``path``, in arrival order."""
        return [rec for rec in self.received if rec.path == path]

    async def wait_for_requests(self, n: int, path: str | None = None) -> None:
        """Return once at least ``n`` requests (to ``path``, if given) have arrived."""
        async with self._arrivals:
            await self._arrivals.wait_for(
                lambda: len(self.received if path is None else self.requests_to(path)) >= n
            )

    def gate(self, name: str) -> asyncio.Event:
        """The named event that WaitGate/Stall steps wait on; created on first use."""
        return self._gates.setdefault(name, asyncio.Event())

    def _next_step(self, method: str, path: str, script: str | None = None) -> Step | None:
        if script is not None and (keyed := self._keyed.get(script)):
            step = keyed.popleft()
            if not keyed:
                del self._keyed[script]
            return step
        for key in ((path, method), (path, None), ("*", method), ("*", None)):
            queue = self._scripts.get(key)
            if queue:
                return queue.popleft()
        return None

    def _header_step(self, headers: Mapping[str, str]) -> tuple[bool, Step | None]:
        """The step the request's ``x-mock-faults`` header gives it: (False, None) when it gives none.

        Without ``x-mock-key`` the first step applies; with one, each attempt takes the next step,
        and once the list is used up the request falls through to the in-process scripts.  A
        malformed header gives a 400 naming the bad token.  The same key with a different list starts
        that list afresh.
        """
        value = headers.get(FAULTS_HEADER)
        if value is None:
            return False, None
        try:
            steps = parse_faults(value)
        except FaultSyntaxError as exc:
            return True, error(400, str(exc), "invalid_request_error", "invalid_mock_faults")
        key = headers.get(KEY_HEADER)
        if key is None:
            return True, steps[0]
        if len(key) > MAX_KEY_LENGTH:
            message = f"{KEY_HEADER}: at most {MAX_KEY_LENGTH} characters, got {len(key)}"
            return True, error(400, message, "invalid_request_error", "invalid_mock_key")
        digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        seen, taken = self._fault_positions.pop(key, (digest, 0))
        if seen != digest:
            taken = 0
        self._fault_positions[key] = (digest, min(taken + 1, len(steps)))  # re-inserted last: the most recently used
        while len(self._fault_positions) > self.fault_keys:
            self._fault_positions.popitem(last=False)
        if taken >= len(steps):
            return False, None
        return True, steps[taken]

    # ----------------------------------------------------------------- request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        from_header, step = self._header_step(request.headers)
        if not from_header:
            step = self._next_step(request.method, path, request.headers.get(SCRIPT_HEADER))
        rec = Received(request.method, path, query, CIMultiDict(request.headers), step=step)
        self.arrivals += 1
        if self.keep_received:
            async with self._arrivals:
                self.received.append(rec)
                self._arrivals.notify_all()
        ex = _Exchange(request, rec, self.arrivals)
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            return await self._serve(ex)
        except asyncio.CancelledError:
            self._peer_gone(ex)
            raise
        except ConnectionError:
            # A read or write failed because the peer went away; nothing more can be sent,
            # and returning (rather than raising) keeps aiohttp from logging a traceback.
            self._peer_gone(ex)
            return web.Response(status=500)
        finally:
            self.active -= 1
            self._inflight.discard(task)

    def _peer_gone(self, ex: _Exchange) -> None:
        if not ex.aborted and not self._closing:
            ex.rec.cancelled.set()

    def _api_path(self, path: str) -> str | None:
        """The OpenAI path (/v1/...) a request path stands for under ``base_path``; None: outside it."""
        if not self.base_path:
            return path
        if path == self.base_path or path.startswith(self.base_path + "/"):
            return "/v1" + path[len(self.base_path):]
        return None

    async def _serve(self, ex: _Exchange) -> web.StreamResponse:
        if self._api_path(ex.rec.path) is None:
            await self._read_body(ex)
            message = f"Not found: this mock serves the API under {self.base_path}"
            return await self._send(ex, _Reply.json({"error": {
                "message": message, "type": "invalid_request_error", "param": None, "code": "not_found"}}, 404))
        step = ex.rec.step
        if isinstance(step, Reset):
            await self._read_body(ex)
            await self._abort(ex)
            return web.Response()  # never sent: the transport is gone
        if isinstance(step, Raw):
            await self._read_body(ex)
            await self._raw(ex, step)
            return web.Response()  # never sent: the transport is gone
        if isinstance(step, Respond):
            await self._read_body(ex)
            reply = self._respond_reply(step)
        else:
            reply = await self._normal_reply(ex)
        if isinstance(step, Delay):
            await asyncio.sleep(step.seconds)
        elif isinstance(step, WaitGate):
            await self.gate(step.name).wait()
        elif isinstance(step, CutBody):
            ex.budget = step.after_bytes
        return await self._send(ex, reply)

    async def _normal_reply(self, ex: _Exchange) -> _Reply:
        wanted = "GET" if ex.request.method == "HEAD" else ex.request.method  # HEAD: GET's headers
        for method, pattern, handler in _ROUTES:
            if wanted == method and (match := pattern.fullmatch(self._api_path(ex.rec.path) or "")):
                return cast(_Reply, await getattr(self, handler)(ex, **match.groupdict()))
        return await self._echo(ex)

    @staticmethod
    def _respond_reply(step: Respond) -> _Reply:
        headers: CIMultiDict[str] = CIMultiDict(step.headers or {})
        if isinstance(step.body, dict):
            body = _json(step.body)
            headers.setdefault("Content-Type", "application/json")
        else:
            body = step.body or b""
        return _Reply([body], len(body), step.status, headers)

    # ----------------------------------------------------------------- wire helpers

    async def _read_body(self, ex: _Exchange, keep: int = 0) -> bytes:
        """Stream the body through sha256 (it may be 512 MiB); return its first ``keep`` bytes."""
        digest, size, kept = hashlib.sha256(), 0, bytearray()
        while chunk := await ex.request.content.readany():
            digest.update(chunk)
            size += len(chunk)
            if len(kept) < keep:
                kept += chunk[: keep - len(kept)]
        ex.rec.body_size, ex.rec.body_sha256 = size, digest.hexdigest()
        return bytes(kept)

    async def _read_json(self, ex: _Exchange) -> dict[str, Any]:
        """The request's JSON object, or {} if it is not one (the answer is then generic)."""
        raw = await self._read_body(ex, keep=_JSON_KEEP)
        with contextlib.suppress(ValueError, OSError, EOFError):
            if "gzip" in ex.request.headers.get("Content-Encoding", ""):
                raw = gzip.decompress(raw)
            params = json.loads(raw)
            if isinstance(params, dict):
                return params
        return {}

    async def _read_form(self, ex: _Exchange) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Stream a multipart body: text fields are returned, file parts only as size/sha256/filename.

        A JSON body is accepted too: its string members come back as the fields.
        """
        if not ex.request.content_type.startswith("multipart/"):
            return {k: v for k, v in (await self._read_json(ex)).items() if isinstance(v, str)}, {}
        content = _HashingContent(ex.request.content)
        reader = MultipartReader(ex.request.headers, cast(StreamReader, content))
        fields: dict[str, str] = {}
        files: dict[str, dict[str, Any]] = {}
        while (part := await reader.next()) is not None:
            if isinstance(part, MultipartReader):  # nested multipart: not used by the SDK
                await part.release()
                continue
            name = part.name or ""
            digest, size, kept = hashlib.sha256(), 0, bytearray()
            while chunk := await part.read_chunk(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if part.filename is None and len(kept) < _FIELD_KEEP:
                    kept += chunk
            if part.filename is None:
                fields[name] = kept.decode("utf-8", "replace")
                continue
            key = name
            for i in itertools.count(2):
                if key not in files:
                    break
                key = f"{name}#{i}"  # repeated field names (e.g. several images) stay distinct
            files[key] = {"size": size, "sha256": digest.hexdigest(), "filename": part.filename}
        await content.drain()  # the epilogue, if any
        ex.rec.body_size, ex.rec.body_sha256 = content.size, content.hexdigest()
        return fields, files

    async def _raw(self, ex: _Exchange, step: Raw) -> None:
        """Raw: bytes straight onto the socket, then close, reset, or hold and then reset."""
        transport = ex.request.transport
        if transport is None:
            return
        transport.write(step.data)
        if step.then == "hold":
            await self._pause(step.seconds, step.gate)
        await self._abort(ex)

    async def _abort(self, ex: _Exchange) -> None:
        """Cut the connection once the bytes already written are out: ``transport.close()`` flushes
        asyncio's write buffer first (``abort()`` would discard it and send fewer bytes than asked)."""
        ex.aborted = True
        if ex.request.transport is not None:
            ex.request.transport.close()

    async def _write(self, ex: _Exchange, resp: web.StreamResponse, piece: bytes) -> bool:
        """Write one piece, honouring a CutBody budget; False once the connection was cut."""
        if ex.budget is not None and len(piece) >= ex.budget:
            if ex.budget:
                await resp.write(piece[: ex.budget])
            await self._abort(ex)
            return False
        if ex.budget is not None:
            ex.budget -= len(piece)
        if self.sse_interval and ex.written and resp.content_length is None:
            await asyncio.sleep(self.sse_interval)  # only between the frames of a stream
        await resp.write(piece)
        ex.written += 1
        return True

    async def _finish(self, ex: _Exchange, resp: web.StreamResponse) -> web.StreamResponse:
        await resp.write_eof()
        ex.rec.finished.set()
        return resp

    async def _pause(self, seconds: float | None, gate: str | None) -> None:
        if gate is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gate(gate).wait(), seconds)
        elif seconds:
            await asyncio.sleep(seconds)

    async def _send(self, ex: _Exchange, reply: _Reply) -> web.StreamResponse:
        """Send ``reply`` as bent by the request's step (Stall, SSECut, SSEErrorFrame, CutBody, SetCookie)."""
        step = ex.rec.step
        headers = CIMultiDict({"x-request-id": f"req_mock_{ex.n}"})
        headers.update(reply.headers)
        if isinstance(step, SetCookie):
            headers["Set-Cookie"] = step.value
        resp = web.StreamResponse(status=reply.status, headers=headers)
        if reply.length is not None:
            resp.content_length = reply.length
            if isinstance(step, OverLength):
                resp.content_length = reply.length + step.extra_bytes
        elif ex.request.version < HttpVersion11:
            # Close-delimited body: aiohttp 3.14 computes keep_alive=False here but never stores
            # it, so a keep-alive HTTP/1.0 client would wait forever for the end.
            resp.force_close()
        await resp.prepare(ex.request)
        # A StreamResponse (unlike web.Response) would write a body even where HTTP forbids one.
        bodyless = ex.request.method == "HEAD" or reply.status in (204, 304) or reply.status < 200
        pieces = iter(() if bodyless else reply.pieces)
        tail = () if bodyless else reply.tail
        if isinstance(step, (Stall, SSEErrorFrame, SSECut)):
            for piece in itertools.islice(pieces, step.after_events):
                if not await self._write(ex, resp, piece):
                    return resp
            if isinstance(step, Stall):
                await self._pause(step.seconds, step.gate)
            elif isinstance(step, SSEErrorFrame):
                await resp.write(_SSE_ERROR_FRAME)
                return await self._finish(ex, resp)
            elif step.clean:
                return await self._finish(ex, resp)
            else:
                await self._abort(ex)
                return resp
        for piece in itertools.chain(pieces, tail):
            if not await self._write(ex, resp, piece):
                return resp
        if ex.budget is not None:  # CutBody larger than the body: still never end cleanly
            await self._abort(ex)
            return resp
        if isinstance(step, OverLength) and reply.length is not None:
            await self._abort(ex)  # an orderly close, short of the announced length
            return resp
        if isinstance(step, HoldEnd):
            await self._pause(step.seconds, step.gate)
        return await self._finish(ex, resp)

    # ----------------------------------------------------------------- endpoints

    async def _chat(self, ex: _Exchange) -> _Reply:
        params = await self._read_json(ex)
        model = params.get("model", "gpt-4o")
        usage = {"prompt_tokens": 9, "completion_tokens": self.sse_events,
                 "total_tokens": 9 + self.sse_events}
        base = {"id": f"chatcmpl-mock-{ex.n}", "created": CREATED, "model": model,
                "system_fingerprint": "fp_mock"}
        if not params.get("stream"):
            message = {"role": "assistant", "content": HELLO, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            return _Reply.json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        frames = []
        for i in range(self.sse_events):
            delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
            finish = "stop" if i == self.sse_events - 1 else None
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            frames.append(_event({**base, "object": "chat.completion.chunk", "choices": [choice]}))
        if (params.get("stream_options") or {}).get("include_usage"):
            frames.append(_event({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        return _Reply.sse(frames, (b"data: [DONE]\n\n",))

    async def _completions(self, ex: _Exchange) -> _Reply:
        params = await self._read_json(ex)
        base = {"id": f"cmpl-mock-{ex.n}", "object": "text_completion", "created": CREATED,
                "model": params.get("model", "gpt-3.5-turbo-instruct")}
        if not params.get("stream"):
            choice = {"index": 0, "text": HELLO, "logprobs": None, "finish_reason": "stop"}
            usage = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
            return _Reply.json({**base, "choices": [choice], "usage": usage})
        frames = [
            _event({**base, "choices": [{"index": 0, "text": f"tok{i} ", "logprobs": None,
                                         "finish_reason": "stop" if i == self.sse_events - 1 else None}]})
            for i in range(self.sse_events)
        ]
        return _Reply.sse(frames, (b"data: [DONE]\n\n",))

    def _response_object(self, ex: _Exchange, model: str, status: str, text: str | None) -> dict[str, Any]:
        """A minimal Response; output is empty while in progress."""
        output = []
        if text is not None:
            content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            output = [{"type": "message", "id": f"msg_mock_{ex.n}", "status": "completed",
                       "role": "assistant", "content": content}]
        usage = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                 "output_tokens": self.sse_events, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": 9 + self.sse_events}
        return {
            "id": f"resp_mock_{ex.n}", "object": "response", "created_at": CREATED, "status": status,
            "completed_at": CREATED if status == "completed" else None, "model": model,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "error": None, "incomplete_details": None, "instructions": None, "metadata": {},
            "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
            "usage": usage if status == "completed" else None,
        }

    async def _responses(self, ex: _Exchange) -> _Reply:
        params = await self._read_json(ex)
        model = params.get("model", "gpt-4o")
        if not params.get("stream"):
            return _Reply.json(self._response_object(ex, model, "completed", HELLO))
        tokens = [f"tok{i} " for i in range(self.sse_events)]
        text = "".join(tokens)
        seq = itertools.count()
        item_id = f"msg_mock_{ex.n}"
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = self._response_object(ex, model, "completed", text)["output"][0]

        def frame(kind: str, **data: Any) -> bytes:
            return _event({"type": kind, "sequence_number": next(seq), **data}, kind)

        frames = [
            frame("response.created", response=self._response_object(ex, model, "in_progress", None)),
            frame("response.output_item.added", output_index=0,
                  item={**item, "status": "in_progress", "content": []}),
            frame("response.content_part.added", **where, part={**part, "text": ""}),
            *(frame("response.output_text.delta", **where, delta=tok, logprobs=[]) for tok in tokens),
            frame("response.output_text.done", **where, text=text, logprobs=[]),
            frame("response.content_part.done", **where, part=part),
            frame("response.output_item.done", output_index=0, item=item),
        ]
        final = self._response_object(ex, model, "completed", text)
        done = frame("response.completed", response=final)
        if params.get("background"):
            self._background[final["id"]] = ([*frames, done], final)
            while len(self._background) > self.background_keep:
                self._background.popitem(last=False)
        return _Reply.sse(frames, (done,))

    async def _response_get(self, ex: _Exchange, ident: str) -> _Reply:
        """A background response: its object, or with ``stream=true`` its events after ``starting_after``."""
        await self._read_body(ex)
        stored = self._background.get(ident)
        if stored is None:
            return self._respond_reply(error(404, f"No response found with id '{ident}'.",
                                             "invalid_request_error", None))
        events, final = stored
        query = ex.request.query
        if query.get("stream", "").lower() != "true":
            return _Reply.json(final)
        after = query.get("starting_after", "-1")
        if not re.fullmatch(r"-1|[0-9]{1,9}", after):
            return self._respond_reply(error(400, f"Invalid starting_after: {after!r}.", "invalid_request_error"))
        rest = events[int(after) + 1:]
        return _Reply.sse(rest[:-1], tuple(rest[-1:]))

    async def _embeddings(self, ex: _Exchange) -> _Reply:
        params = await self._read_json(ex)
        inputs = params.get("input", "")
        batched = isinstance(inputs, list) and inputs and isinstance(inputs[0], (str, list))
        count = len(inputs) if batched else 1  # a str or one token list is a single input
        dims = int(params.get("dimensions") or 8)
        data = []
        for i in range(count):
            vector = [round(i + j / dims, 6) for j in range(dims)]
            embedding: Any = vector
            if params.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        usage = {"prompt_tokens": 4 * count, "total_tokens": 4 * count}
        return _Reply.json({"object": "list", "data": data,
                            "model": params.get("model", "text-embedding-3-small"), "usage": usage})

    async def _models(self, ex: _Exchange) -> _Reply:
        await self._read_body(ex)
        headers = CIMultiDict({"Content-Type": "application/json"})
        body = MODELS_BODY
        if "gzip" in ex.request.headers.get("Accept-Encoding", "").lower():
            body = gzip.compress(MODELS_BODY, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return _Reply([body], len(body), 200, headers)

    def _file_object(self, ident: str, size: int, filename: str, purpose: str) -> dict[str, Any]:
        return {"id": ident, "object": "file", "bytes": size, "created_at": CREATED, "filename": filename,
                "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None}

    async def _file_upload(self, ex: _Exchange) -> _Reply:
        fields, files = await self._read_form(ex)
        upload = files.get("file", {"size": 0, "sha256": hashlib.sha256().hexdigest(), "filename": "upload"})
        purpose = fields.get("purpose", "user_data")
        obj = self._file_object(f"file-mock-{ex.n}", upload["size"], upload["filename"], purpose)
        return _Reply.json({**obj, "sha256": upload["sha256"]})

    async def _file_content(self, ex: _Exchange, ident: str) -> _Reply:
        await self._read_body(ex)
        size = _sized(ident, "file-size-")
        return _Reply(mock_bytes(size), size, 200, CIMultiDict({"Content-Type": "application/octet-stream"}))

    async def _upload_create(self, ex: _Exchange) -> _Reply:
        params = await self._read_json(ex)
        upload = {"id": f"upload_mock_{ex.n}", "object": "upload", "bytes": int(params.get("bytes", 0)),
                  "created_at": CREATED, "expires_at": CREATED + 3600,
                  "filename": params.get("filename", "upload.bin"),
                  "purpose": params.get("purpose", "user_data"), "status": "pending", "file": None}
        self._uploads[upload["id"]] = upload
        return _Reply.json(upload)

    async def _upload_part(self, ex: _Exchange, ident: str) -> _Reply:
        _, files = await self._read_form(ex)
        data = files.get("data", {"size": 0, "sha256": hashlib.sha256().hexdigest()})
        return _Reply.json({"id": f"part_mock_{ex.n}", "object": "upload.part", "created_at": CREATED,
                            "upload_id": ident, "sha256": data["sha256"], "bytes": data["size"]})

    async def _upload_complete(self, ex: _Exchange, ident: str) -> _Reply:
        await self._read_json(ex)
        upload = self._uploads.get(ident) or {
            "id": ident, "object": "upload", "bytes": 0, "created_at": CREATED, "expires_at": CREATED + 3600,
            "filename": "upload.bin", "purpose": "user_data"}
        file = self._file_object(f"file-mock-{ex.n}", upload["bytes"], upload["filename"], upload["purpose"])
        return _Reply.json({**upload, "status": "completed", "file": file})

    async def _image_edit(self, ex: _Exchange) -> _Reply:
        _, files = await self._read_form(ex)
        return _Reply.json({"created": CREATED, "data": [{"b64_json": "aGVsbG8="}], "received": files})

    def _video_object(self, ident: str, fields: dict[str, str], completed: bool) -> dict[str, Any]:
        return {"id": ident, "object": "video", "model": fields.get("model", "sora-2"),
                "status": "completed" if completed else "queued", "progress": 100 if completed else 0,
                "created_at": CREATED, "completed_at": CREATED if completed else None,
                "expires_at": None, "error": None, "prompt": fields.get("prompt"),
                "remixed_from_video_id": None, "seconds": fields.get("seconds", "4"),
                "size": fields.get("size", "720x1280")}

    async def _video_create(self, ex: _Exchange) -> _Reply:
        fields, files = await self._read_form(ex)
        return _Reply.json({**self._video_object(f"video-mock-{ex.n}", fields, False), "received": files})

    async def _video_get(self, ex: _Exchange, ident: str) -> _Reply:
        await self._read_body(ex)
        return _Reply.json(self._video_object(ident, {}, True))

    async def _video_content(self, ex: _Exchange, ident: str) -> _Reply:
        await self._read_body(ex)
        size = _sized(ident, "video-size-")
        return _Reply(mock_bytes(size), size, 200, CIMultiDict({"Content-Type": "video/mp4"}))

    async def _echo(self, ex: _Exchange) -> _Reply:
        """Anything unknown: describe the request back, so tests see what the proxy forwarded."""
        await self._read_body(ex)
        rec = ex.rec
        return _Reply.json({
            "method": rec.method, "path": rec.path, "query_string": rec.query_string,
            "headers": [[name, value] for name, value in ex.request.headers.items()],
            "body_size": rec.body_size, "body_sha256": rec.body_sha256,
        })


# --------------------------------------------------------------------------- the command


def _non_negative(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` that is 0 or more (a clear usage error otherwise)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not 0 <= value < math.inf:
            raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
        return value
    return parse


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 meaning any free one."""
    port = int(_non_negative(int)(text))
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return port


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-resilience-proxy-mock",
        description="A fake OpenAI API that injects the faults each request asks for in its "
                    f"{FAULTS_HEADER} header ({FAULT_GRAMMAR}); requests sharing an {KEY_HEADER} "
                    "take the steps in turn. Prints one line with its URL; stops on SIGTERM or SIGINT.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8081, help="port to listen on; 0 = any free port "
                                                                 "(default 8081)")
    parser.add_argument("--sse-events", type=_non_negative(int), default=5,
                        help="content events in each streamed answer (default 5)")
    parser.add_argument("--sse-interval", type=_non_negative(float), default=0.0,
                        help="seconds between the events of a stream (default 0)")
    parser.add_argument("--base-path", default="", help="serve the API under this path, as Azure OpenAI's "
                                                        "/openai/v1 (default: /v1/... at the root)")
    return parser


async def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; nothing is recorded (``keep_received=False``): memory stays flat."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still ends asyncio.run
            loop.add_signal_handler(sig, stop.set)
    mock = MockUpstream(sse_events=args.sse_events, sse_interval=args.sse_interval, keep_received=False,
                        base_path=args.base_path.rstrip("/"))
    try:
        url = await mock.start(args.host, args.port)
    except OSError as exc:
        await mock.close()
        print(f"openai-resilience-proxy-mock: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    print(f"mock upstream listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await mock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m proxy.testing`` / ``openai-resilience-proxy-mock``: the mock for tests in any language."""
    args = _arguments().parse_args(argv)
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:  # SIGINT where no signal handler could be installed
        return 0


if __name__ == "__main__":
    sys.exit(main())
