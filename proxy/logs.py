"""Logs: structlog, JSON lines on stdout (or a console renderer for a person at a terminal).

Chain: context -> level -> timestamp -> exception rendered -> secrets masked -> render. Masking
runs last before the renderer, so it also sees rendered exceptions. aiohttp's and asyncio's own
stdlib records go through the same chain (structlog's ProcessorFormatter), so nothing reaches
stdout or stderr unmasked. `LogObserver` turns events into one `request` line per client request,
one `retry` line per retry and one `breaker` line per state change.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

from .events import AttemptFinished, BreakerChange, Event, RequestFinished, RequestStarted, RetryScheduled
from .masking import mask_event

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


class _StdoutLogger:
    """Writes each rendered line to whatever sys.stdout is now (test runners swap it)."""

    __slots__ = ()

    def msg(self, message: str) -> None:
        out = sys.stdout
        out.write(message + "\n")
        out.flush()

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
    root.setLevel(max(_LEVELS[level], logging.WARNING))  # aiohttp's debug chatter stays off


def get_logger() -> Any:
    return structlog.get_logger("openai_resilience_proxy")


class LogObserver:
    """Events -> log lines. Observes only: it never steers a request."""

    __slots__ = ("_log",)

    def __init__(self, logger: Any = None) -> None:
        self._log = logger or get_logger()

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
        elif isinstance(event, (AttemptFinished, RequestStarted)):
            pass  # counted by metrics; the request line sums them up

    def _request(self, e: RequestFinished) -> None:
        self._log.info(
            "request", route=e.route, method=e.method, path=e.path, status=e.status, category=e.category.value,
            attempts=e.attempts, stop_reason=e.stop_reason, aborted=e.aborted,
            duration_ms=round(e.duration_s * 1000, 2),
            ttfb_ms=round(e.ttfb_s * 1000, 2) if e.ttfb_s is not None else None,
            bytes_in=e.bytes_in, bytes_out=e.bytes_out, replayable=e.replayable,
            upstream_request_id=e.upstream_request_id, client_sdk=e.client_sdk,
            client_request_id=e.client_request_id,
        )
