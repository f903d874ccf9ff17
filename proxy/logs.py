"""Logs: structlog, JSON lines on stdout (or a console renderer for a person at a terminal).

Chain: context -> level -> timestamp -> exception rendered -> secrets masked -> render. Masking
runs last before the renderer, so it also sees rendered exceptions. aiohttp's and asyncio's own
stdlib records go through the same chain (structlog's ProcessorFormatter), so nothing reaches
stdout or stderr unmasked. `LogObserver` turns events into one `request` line per client request,
one `retry` line per retry and one `breaker` line per state change.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import queue
import sys
import threading
import time
from typing import Any

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError

from .events import BreakerChange, Event, RequestFinished, RetryScheduled
from .masking import mask, mask_event

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=str).decode()


def _renderer(fmt: str) -> Any:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(serializer=_dumps)


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class LineWriter:
    """Batches log lines; a writer thread does the blocking writes to stdout.

    Under load thousands of requests finish per second. The event loop only appends a line, and
    every `delay` seconds (50 ms) hands the batch to a writer thread: one write and flush per batch
    instead of a system call per line, and a stdout that stalls (a full pipe that nobody reads)
    blocks that thread, never the traffic. Order is kept. If the thread falls `max_pending` bytes
    behind, newer batches are dropped and counted, and the thread writes a `log_lines_dropped`
    line with the count once stdout moves again: memory stays bounded and the loss is visible.
    Why 50 ms: each handoff wakes the thread, which must take the GIL from the loop; shorter
    intervals cost measurable CPU per request (docs/benchmarks.md), 50 ms does not.
    `flush()` writes everything now, in order (shutdown, and tests before they read stdout).
    Writes go to whatever sys.stdout is at the time (test runners swap it).
    """

    def __init__(self, delay: float = 0.05, max_pending: int = 64 * 2**20, flush_timeout: float = 5.0) -> None:
        self._parts: list[str] = []
        self._scheduled = False
        self._delay = delay
        self._max_pending = max_pending
        self._flush_timeout = flush_timeout
        self._queue: queue.SimpleQueue[list[bytes] | threading.Event] = queue.SimpleQueue()
        self._state = threading.Lock()  # guards _pending and _dropped (loop thread and writer thread)
        self._pending = 0  # bytes handed to the thread and not yet written
        self._dropped = 0  # lines dropped since the last report
        self._thread: threading.Thread | None = None

    def write(self, line: str) -> None:
        self._parts.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_later(self._delay, self.handoff)

    def handoff(self) -> None:
        """Give the current batch to the writer thread (the loop's timer calls this)."""
        self._scheduled = False
        parts = self._parts
        if not parts:
            return
        self._parts = []
        pieces = _pieces(parts)  # joined and encoded here: the thread only makes system calls
        size = sum(map(len, pieces))
        with self._state:
            if self._pending + size > self._max_pending:
                self._dropped += len(parts)
                return
            self._pending += size
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
            self._thread.start()
        self._queue.put(pieces)

    def flush(self) -> None:
        """Write everything handed over and everything batched, in order, before returning; waits
        for the writer thread at most `flush_timeout` (a stalled stdout must not hang shutdown)."""
        self._scheduled = False
        parts, self._parts = self._parts, []
        if self._thread is not None and self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            if not done.wait(self._flush_timeout):
                with self._state:
                    self._dropped += len(parts)
                return
        _write(_pieces(parts))

    @property
    def pending(self) -> int:
        """Bytes handed to the writer thread and not yet written."""
        return self._pending

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            written = 0
            if not isinstance(item, threading.Event):
                _write(item)
                written = sum(map(len, item))
            with self._state:
                self._pending -= written
                dropped = 0
                if self._dropped and self._queue.empty():  # caught up: report after the backlog
                    dropped, self._dropped = self._dropped, 0
            if dropped:
                _write([orjson.dumps({"event": "log_lines_dropped", "count": dropped,
                                      "reason": "stdout did not keep up", "level": "warning",
                                      "timestamp": _now()}, option=orjson.OPT_APPEND_NEWLINE)])
            if isinstance(item, threading.Event):
                item.set()  # a flush() waits for this: everything before it is written


def _write(pieces: list[bytes]) -> None:
    """Straight to stdout's file descriptor (the GIL is released while the write blocks), or
    through sys.stdout when it has none (a test runner's capture)."""
    if not pieces:
        return
    out = sys.stdout
    try:
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # no descriptor (io.UnsupportedOperation)
            for piece in pieces:
                out.write(piece.decode())
                out.flush()
            return
        out.flush()  # anything print()ed before stays before
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
    except (OSError, ValueError):  # stdout closed or a broken pipe: nowhere left to log
        pass


_ATOMIC = 4096  # PIPE_BUF: a write this small to a pipe is never interleaved with another process's


def _pieces(lines: list[str]) -> list[bytes]:
    """Whole lines joined into writes of at most PIPE_BUF bytes, so the lines of several worker
    processes sharing one stdout pipe never interleave mid-line."""
    pieces: list[bytes] = []
    current: list[str] = []
    size = 0
    for line in lines:
        n = len(line) if line.isascii() else len(line.encode())  # bytes, not characters
        if current and size + n > _ATOMIC:
            pieces.append("".join(current).encode())
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current).encode())
    return pieces


WRITER = LineWriter()
atexit.register(WRITER.flush)  # a line still batched when the process exits is written, not lost


class _StdoutLogger:
    """structlog's sink: rendered lines go through the shared LineWriter, in order."""

    __slots__ = ()

    def msg(self, message: str) -> None:
        WRITER.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _stdout_logger(*args: Any) -> _StdoutLogger:
    return _StdoutLogger()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler on whatever sys.stderr is now."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and route stdlib logging through the same masked chain."""
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, mask_event, _renderer(fmt)],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, mask_event, _renderer(fmt)],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(_BadRequestFilter())
    root.setLevel(max(_LEVELS[level], logging.WARNING))  # aiohttp's debug chatter stays off


class _BadRequestFilter(logging.Filter):
    """A client's malformed request (bad request line, header or chunk) is its problem, not ours:
    aiohttp already answered 400; log one warning without a traceback instead of an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "bad request from a client: %s", (type(exc).__name__,)
            record.exc_info = record.exc_text = None
        return True


def get_logger() -> Any:
    return structlog.get_logger("openai_resilience_proxy")


class _Timestamp:
    """structlog's ISO-8601 UTC format ("2026-11-23T01:22:32.860734Z"), the date part built once a second."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"


_now = _Timestamp()


def _masked(value: str | None) -> str | None:
    return mask(value) if value else value


class LogObserver:
    """Events -> log lines. Observes only: it never steers a request.

    The per-request line is the hot one: in JSON mode it is built as a dict and rendered by orjson
    straight into the LineWriter, with the same fields, level and timestamp as structlog's lines and
    the same masking applied to every field that comes from outside (route, method, category and
    numbers come from fixed sets). The rare lines (retry, breaker) take structlog's full chain.
    """

    __slots__ = ("_log", "_fast", "_info")
    event_types = (RequestFinished, RetryScheduled, BreakerChange)  # the others are counted by metrics only

    def __init__(self, logger: Any = None, *, level: str = "info", fmt: str = "json") -> None:
        self._log = logger or get_logger()
        self._fast = fmt == "json" and logger is None
        self._info = _LEVELS[level] <= logging.INFO

    def __call__(self, event: Event) -> None:
        if isinstance(event, RequestFinished):
            self._request(event)
        elif isinstance(event, RetryScheduled):
            self._log.info("retry", route=event.route, attempt=event.attempt, category=event.category.value,
                           upstream_status=event.status, delay_ms=round(event.delay_s * 1000, 1),
                           reason=event.reason, delay_source=event.source)
        elif isinstance(event, BreakerChange):
            self._log.warning("breaker", breaker=event.breaker, routes=list(event.routes),
                              old=event.old.name.lower(), new=event.new.name.lower())

    def _request(self, e: RequestFinished) -> None:
        if not self._info:
            return
        if self._fast:
            WRITER.write(orjson.dumps({
                "event": "request", "route": e.route, "method": e.method, "path": _masked(e.path),
                "status": e.status, "category": e.category.value, "attempts": e.attempts,
                "stop_reason": e.stop_reason, "aborted": e.aborted, "duration_ms": round(e.duration_s * 1000, 2),
                "ttfb_ms": round(e.ttfb_s * 1000, 2) if e.ttfb_s is not None else None,
                "bytes_in": e.bytes_in, "bytes_out": e.bytes_out, "replayable": e.replayable,
                "upstream_request_id": _masked(e.upstream_request_id), "client_sdk": _masked(e.client_sdk),
                "client_request_id": _masked(e.client_request_id), "level": "info", "timestamp": _now(),
            }, option=orjson.OPT_APPEND_NEWLINE).decode())
            return
        self._log.info(
            "request", route=e.route, method=e.method, path=e.path, status=e.status, category=e.category.value,
            attempts=e.attempts, stop_reason=e.stop_reason, aborted=e.aborted,
            duration_ms=round(e.duration_s * 1000, 2),
            ttfb_ms=round(e.ttfb_s * 1000, 2) if e.ttfb_s is not None else None,
            bytes_in=e.bytes_in, bytes_out=e.bytes_out, replayable=e.replayable,
            upstream_request_id=e.upstream_request_id, client_sdk=e.client_sdk,
            client_request_id=e.client_request_id,
        )
