"""Judging an event stream at its end: complete, truncated, or carrying an in-band error.

Only endpoints with a known end marker can be judged: chat completions and completions end with
`data: [DONE]`; the Responses API with a terminal `response.completed` / `response.failed` /
`response.incomplete` event. A stream that stops before it is truncated even when the upstream
closed it cleanly (openai-python ends such a stream without an error). Pure: fed bytes, no I/O.
"""

from __future__ import annotations

import enum

_DONE = (b"data: [DONE]",)
_RESPONSES_END = (b"event: response.completed", b"event: response.failed", b"event: response.incomplete",
                  b'"type":"response.completed"', b'"type":"response.failed"', b'"type":"response.incomplete"')
_CHAT_ERROR = (b'data: {"error"',)
_RESPONSES_ERROR = (b"event: error\n", b'"type":"error"')
_OVERLAP = 40  # longer than any marker: a marker split across two chunks is still seen


class StreamEnd(enum.Enum):
    COMPLETE = "complete"
    TRUNCATED = "truncated"
    ERROR_EVENT = "error_event"


def end_markers(method: str, path: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
    """(end markers, in-band error markers) for an endpoint, or None when its end is unknown."""
    if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
        return _DONE, _CHAT_ERROR
    if path == "/v1/responses" or (method == "GET" and path.startswith("/v1/responses/") and path.count("/") == 3):
        return _RESPONSES_END, _RESPONSES_ERROR
    return None


class StreamWatcher:
    __slots__ = ("_ends", "_errors", "_tail", "_ended", "_error")

    def __init__(self, ends: tuple[bytes, ...], errors: tuple[bytes, ...]) -> None:
        self._ends = ends
        self._errors = errors
        self._tail = b""
        self._ended = False
        self._error = False

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk[:_OVERLAP]
        if not self._ended:
            self._ended = any(m in chunk or m in window for m in self._ends)
        if not self._error:
            self._error = any(m in chunk or m in window for m in self._errors)
        self._tail = (self._tail + chunk)[-_OVERLAP:] if len(chunk) < _OVERLAP else chunk[-_OVERLAP:]

    def result(self) -> StreamEnd:
        if self._error:
            return StreamEnd.ERROR_EVENT
        return StreamEnd.COMPLETE if self._ended else StreamEnd.TRUNCATED
