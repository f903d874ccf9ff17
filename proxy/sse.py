"""Judging an event stream at its end: complete, truncated, or carrying an in-band error. Pure.

openai-python ends a stream cut before its end marker without an error, so the relay aborts such a
stream even when the upstream closed it cleanly. Markers count only as whole SSE fields at line
starts (WHATWG event stream interpretation), so a token `data: [DONE]` inside a JSON string never
ends a cut stream: lines end with CRLF, LF or CR, one space after the colon is dropped, a BOM at
stream start is skipped. A marker needs its own line complete, not the blank line that dispatches
the event (servers that omit that are not broken); an `event:` line counts once its `data` line has
arrived (the client needs the final object). A last line without its newline counts only when
provably whole (`[DONE]`, or valid JSON): a cut line looks exactly like that.

Cost: only the unfinished last line is kept between chunks, up to `_LINE_CAP` bytes (a longer line is
judged by that prefix: a terminal `type` must be its first key, as OpenAI writes it). Chunks without a
marker word are not split into lines; JSON is parsed only for lines that pass that filter.
"""

from __future__ import annotations

import enum
import re

import orjson

_LINE_CAP = 64 * 1024  # the most of one unfinished line kept between chunks
_BOM = b"\xef\xbb\xbf"
# For lines too long to keep whole: judged by their first key.
_FIRST_KEY_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"(response\.(?:completed|failed|incomplete)|error)"')
_FIRST_KEY_ERROR = re.compile(rb'\s*\{\s*"error"\s*:\s*[^\sn]')  # not `"error": null`


class StreamEnd(enum.Enum):
    COMPLETE = "complete"
    TRUNCATED = "truncated"
    ERROR_EVENT = "error_event"


# Responses API event types that end a stream, and what they make of it; chat's in-band error is a
# `data` JSON object with a truthy top-level `error`.
_KINDS = {"response.completed": StreamEnd.COMPLETE, "response.failed": StreamEnd.COMPLETE,
          "response.incomplete": StreamEnd.COMPLETE, "error": StreamEnd.ERROR_EVENT}
_EVENTS = {kind.encode(): end for kind, end in _KINDS.items()}


class Dialect(enum.Enum):
    CHAT = "chat"  # ends with a `data` value starting `[DONE]` (the SDKs' own test)
    RESPONSES = "responses"  # ends with a terminal Responses API event


def end_markers(method: str, path: str) -> tuple[Dialect] | None:
    """The arguments of `StreamWatcher` for an endpoint, or None when its end is unknown."""
    if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
        return (Dialect.CHAT,)
    if path == "/v1/responses" or (method == "GET" and path.startswith("/v1/responses/") and path.count("/") == 3):
        return (Dialect.RESPONSES,)
    return None


def _value(line: bytes, colon: int) -> bytes:
    """The value of the field whose colon is at `colon`: one leading space is not part of it."""
    return line[colon + 2:] if line[colon + 1:colon + 2] == b" " else line[colon + 1:]


def _json(value: bytes) -> object:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


class StreamWatcher:
    """Fed a stream's bytes chunk by chunk; `result()` once the upstream body has ended."""

    __slots__ = ("_chat", "_head", "_pending", "_over", "_armed", "_end")

    def __init__(self, dialect: Dialect) -> None:
        self._chat = dialect is Dialect.CHAT
        self._head: bytes | None = b""  # bytes of a possible BOM at stream start; None once past it
        self._pending = bytearray()  # the unfinished last line (its first _LINE_CAP bytes)
        self._over = False  # the unfinished line is longer than what _pending holds
        self._armed: StreamEnd | None = None  # Responses: what the last `event:` line announced
        self._end = StreamEnd.TRUNCATED

    def feed(self, chunk: bytes) -> None:
        if self._head is not None:
            chunk = self._skip_bom(chunk)
        if not chunk:
            return
        n = len(chunk)
        last = n - 1
        if (c := chunk[last]) != 10 and c != 13:  # not the usual chunk of whole lines
            last = chunk.rfind(b"\n")
            if (cr := chunk.rfind(b"\r")) > last:
                last = cr
            if last < 0:  # no line ends here: all of it continues the unfinished line
                self._keep(chunk, 0)
                return
        start = 0
        if self._pending:  # the chunk finishes the line the previous one left unfinished
            first = chunk.find(b"\n", 0, last + 1)
            cr = chunk.find(b"\r", 0, first if first >= 0 else last + 1)
            if cr >= 0:
                first = cr
            pending = self._pending
            if self._over:
                self._line(bytes(pending), True, False)
                self._over = False
            else:
                self._line(bytes(pending) + chunk[:first], False, False)
            pending.clear()
            start = first + 1
        # (find, not `in`: bytes.__contains__ goes through the buffer protocol and is slower)
        if start < last and (self._armed is not None or (
                (chunk.find(b"[DONE]") >= 0 or chunk.find(b'"error"') >= 0) if self._chat
                else (chunk.find(b"complete") >= 0 or chunk.find(b"failed") >= 0 or chunk.find(b"error") >= 0))):
            line = self._line
            for text in chunk[start:last].splitlines():
                line(text, False, False)
        if last + 1 < n:
            self._keep(chunk, last + 1)

    def result(self) -> StreamEnd:
        if self._pending:  # a last line without its newline
            self._line(bytes(self._pending), self._over, True)
            self._pending.clear()
            self._over = False
        return self._end

    def _skip_bom(self, chunk: bytes) -> bytes:
        head = self._head + chunk  # type: ignore[operator]
        if len(head) < 3 and _BOM.startswith(head):
            self._head = head  # too short to tell yet
            return b""
        self._head = None
        return head[3:] if head.startswith(_BOM) else head

    def _keep(self, chunk: bytes, start: int) -> None:  # chunk[start:] continues the unfinished line
        if not self._over:
            room = _LINE_CAP - len(self._pending)
            if len(chunk) - start > room:
                self._pending += chunk[start:start + room]
                self._over = True
            else:
                self._pending += chunk[start:] if start else chunk

    def _mark(self, end: StreamEnd) -> None:
        if self._end is not StreamEnd.ERROR_EVENT:  # an in-band error stays the verdict
            self._end = end

    def _line(self, line: bytes, cut: bool, eof: bool) -> None:
        """Judge one line. `cut`: only its prefix was kept; `eof`: it lacks its newline."""
        if self._chat:
            if line.startswith(b"data:"):
                value = _value(line, 4)
                if value.startswith(b"[DONE]"):
                    self._mark(StreamEnd.COMPLETE)
                elif value.find(b'"error"') >= 0:
                    data = None if cut else _json(value)
                    if (isinstance(data, dict) and data.get("error")) or (
                            cut and not eof and _FIRST_KEY_ERROR.match(value)):
                        self._mark(StreamEnd.ERROR_EVENT)
        elif line.startswith(b"event:"):
            self._armed = _EVENTS.get(_value(line, 5))
        elif line.startswith(b"data:"):
            value = _value(line, 4)
            if self._armed is not None:  # the data line of an `event:` already judged
                if not eof or (not cut and _json(value) is not None):
                    self._mark(self._armed)
                self._armed = None
            elif value.find(b"complete") >= 0 or value.find(b"failed") >= 0 or value.find(b'"error"') >= 0:
                if not eof and (m := _FIRST_KEY_TYPE.match(value)) is not None:
                    self._mark(_EVENTS[m.group(1)])
                elif not cut and isinstance(data := _json(value), dict) and isinstance(kind := data.get("type"), str):
                    if kind in _KINDS:
                        self._mark(_KINDS[kind])


def judge(method: str, path: str, body: bytes) -> StreamEnd | None:
    """A whole event-stream body, read before the commit; None when the endpoint's end is unknown."""
    markers = end_markers(method, path)
    if markers is None:
        return None
    watcher = StreamWatcher(*markers)
    watcher.feed(body)
    return watcher.result()
