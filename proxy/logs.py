"""Logs: structlog, JSON lines on stdout (or a console renderer for a person at a terminal).

Chain: context -> level -> timestamp -> exception rendered -> secrets masked -> render. aiohttp's and
asyncio's own stdlib records take the same chain (structlog's ProcessorFormatter), so nothing leaves
unmasked. `LogObserver` writes one `request` line per request, one `retry` line per retry, one
`failover` line per move to another upstream, one `resume` line per cut background stream, one
`breaker` line per state change and one `config_reloaded` line per reload.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import queue
import sys
import threading
import time
from typing import Any

import orjson
import structlog

from .events import BreakerChange, ConfigReloaded, Event, Failover, RequestFinished, RetryScheduled, StreamResumed
from .masking import mask, mask_event

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
_ATOMIC = 4096  # PIPE_BUF: a write this small to a pipe is never interleaved with another process's


class LineWriter:
    """Batches log lines for a writer thread, so a stdout that stalls blocks that thread, never the traffic.

    Every `delay` seconds the loop hands the batch over: one write per batch, not a system call per
    line; shorter intervals wake the thread (and take the GIL) more often, which costs CPU per request.
    Order is kept. Batches beyond `max_pending` unwritten bytes are dropped and counted, and a
    `log_lines_dropped` line reports the count once stdout moves again.
    """

    def __init__(self, delay: float = 0.05, max_pending: int = 64 * 2**20, flush_timeout: float = 5.0) -> None:
        self._parts: list[str] = []
        self._scheduled = False
        self._delay = delay
        self._max_pending = max_pending
        self._flush_timeout = flush_timeout
        self._queue: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._state = threading.Condition()  # guards _pending and _dropped (loop thread and writer thread)
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
        """Write everything, in order, now; wait for the writer thread at most `flush_timeout` (a
        stalled stdout must not hang shutdown)."""
        self._scheduled = False
        parts, self._parts = self._parts, []
        with self._state:
            if not self._state.wait_for(lambda: not self._pending, self._flush_timeout):
                self._dropped += len(parts)
                return
        if parts:
            _write(_pieces(parts))

    @property
    def pending(self) -> int:
        """Bytes handed to the writer thread and not yet written."""
        return self._pending

    def _run(self) -> None:
        while True:
            pieces = self._queue.get()
            _write(pieces)
            with self._state:
                dropped = self._dropped if self._queue.empty() else 0  # caught up: report after the backlog
                self._dropped -= dropped
            if dropped:
                _write([orjson.dumps({"event": "log_lines_dropped", "count": dropped,
                                      "reason": "stdout did not keep up", "level": "warning",
                                      "timestamp": _now()}, option=orjson.OPT_APPEND_NEWLINE)])
            with self._state:  # flush() waits for this: everything handed over is written
                self._pending -= sum(map(len, pieces))
                self._state.notify_all()


def _write(pieces: list[bytes]) -> None:
    """Straight to stdout's file descriptor (the GIL is released while the write blocks), or
    through sys.stdout when it has none (a test runner's capture; runners swap sys.stdout)."""
    out = sys.stdout
    with contextlib.suppress(OSError, ValueError):  # stdout closed or a broken pipe: nowhere left to log
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


def _pieces(lines: list[str]) -> list[bytes]:
    """Whole lines joined into writes of at most PIPE_BUF bytes, so the lines of worker processes
    sharing one stdout pipe never interleave mid-line."""
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

    def msg(self, message: str) -> None:
        WRITER.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _dumps(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()  # any value orjson cannot serialize is written as str()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler on whatever sys.stderr is now (test runners swap it)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)  # type: ignore[assignment]


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and route stdlib logging through the same masked chain."""
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                else structlog.processors.JSONRenderer(serializer=_dumps))
    tail = [structlog.processors.format_exc_info, mask_event, renderer]
    structlog.configure(
        processors=[*_SHARED, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: _StdoutLogger(),
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))  # aiohttp's debug chatter stays off


def get_logger() -> Any:
    return structlog.get_logger("openai_resilience_proxy")


@functools.lru_cache(maxsize=1)
def _date_and_time(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _now() -> str:
    """structlog's ISO-8601 UTC format ("2026-11-23T01:22:32.860734Z"), the date part built once a second."""
    now = time.time()
    second = int(now)
    return f"{_date_and_time(second)}.{int((now - second) * 1_000_000):06d}Z"


class LogObserver:
    """Events -> log lines. Observes only: it never steers a request.

    The hot `request` line, in JSON mode, is rendered by orjson straight into the LineWriter: the same
    fields, masking (of what comes from outside) and format as structlog's lines, without its chain.
    """

    __slots__ = ("_log", "_fast", "_info")
    event_types = (RequestFinished, RetryScheduled, BreakerChange, Failover, StreamResumed, ConfigReloaded)

    def __init__(self, logger: Any = None, *, level: str = "info", fmt: str = "json") -> None:
        self._log = logger or get_logger()
        self._fast = fmt == "json" and logger is None
        self._info = _LEVELS[level] <= logging.INFO

    def __call__(self, e: Event) -> None:
        if isinstance(e, RequestFinished):
            if not self._info:
                return
            line = {
                # request_id: plain characters, never key-shaped (handler.request_id): nothing to mask
                "event": "request", "request_id": e.request_id, "route": e.route, "method": e.method,
                "path": mask(e.path),
                "status": e.status, "category": e.category.value, "attempts": e.attempts,
                "stop_reason": e.stop_reason, "aborted": e.aborted, "duration_ms": round(e.duration_s * 1000, 2),
                "ttfb_ms": round(e.ttfb_s * 1000, 2) if e.ttfb_s is not None else None,
                "bytes_in": e.bytes_in, "bytes_out": e.bytes_out, "replayable": e.replayable,
                "upstream_request_id": mask(e.upstream_request_id), "client_sdk": mask(e.client_sdk),
                "client_request_id": mask(e.client_request_id), "upstream": e.upstream, "resumes": e.resumes,
                "level": "info",
                "timestamp": _now(),
            }
            if self._fast:
                WRITER.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE).decode())
            else:  # structlog's chain sets level and timestamp again, and masking twice changes nothing
                self._log.info(**line)
        elif isinstance(e, RetryScheduled):
            self._log.info("retry", request_id=e.request_id, route=e.route, attempt=e.attempt,
                           category=e.category.value, upstream_status=e.status,
                           delay_ms=round(e.delay_s * 1000, 1), reason=e.reason, delay_source=e.source,
                           upstream=e.upstream)
        elif isinstance(e, Failover):
            self._log.info("failover", request_id=e.request_id, route=e.route, attempt=e.attempt,
                           category=e.category.value, **{"from": e.source, "to": e.target})
        elif isinstance(e, StreamResumed):
            log = self._log.info if e.result == "ok" else self._log.warning
            log("resume", request_id=e.request_id, route=e.route, response_id=e.response_id,
                starting_after=e.starting_after, attempt=e.attempt, category=e.category.value, result=e.result,
                stop_reason=e.stop_reason)
        elif isinstance(e, BreakerChange):
            self._log.warning("breaker", breaker=e.breaker, upstream=e.upstream, routes=list(e.routes),
                              old=e.old.name.lower(), new=e.new.name.lower())
        elif isinstance(e, ConfigReloaded):  # a warning when part of it waits for a restart
            log = self._log.warning if e.restart_required else self._log.info
            log("config_reloaded", config_source=e.source, changed=list(e.changed),
                restart_required=list(e.restart_required), pid=os.getpid())
