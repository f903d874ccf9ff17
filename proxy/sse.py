"""Judging an event stream at its end: complete, truncated, or carrying an in-band error.

A stream that stops before its end marker is truncated even when the upstream closed it cleanly
(openai-python ends such a stream without an error), so the relay aborts it instead. Only endpoints
with a known end can be judged: chat completions and completions end with a `data: [DONE]` line;
the Responses API with a terminal `response.completed` / `response.failed` / `response.incomplete`
event. Pure: fed bytes, no I/O.

Markers count only as whole SSE fields at line starts (WHATWG "event stream interpretation"):
text that merely contains a marker, such as a token `data: [DONE]` inside a JSON string, must
never end a cut stream as complete. Hence the rules:

- lines end with CRLF, LF or CR; the field name is what precedes the first colon and one space
  after the colon is dropped (`data:[DONE]` is valid); comment lines (`:`) and unknown fields are
  ignored; a UTF-8 BOM at stream start is skipped;
- chat: a `data` value starting with `[DONE]` (the test the SDKs themselves apply) ends the
  stream; a `data` value that is a JSON object with a truthy top-level `error` is an in-band error
  (what makes the SDKs raise);
- Responses: a `data` value whose JSON object has a terminal top-level `type` ends the stream,
  `"type": "error"` is an in-band error; an `event:` field naming a terminal event (or `error`)
  counts once that event's `data` line has arrived, so a stream cut between the two still reads
  as truncated: the client would miss the final response object;
- a marker needs its line to be complete, not the blank line that dispatches the event: the
  question is whether the upstream sent its end, and servers that omit the last blank line are
  not broken. A final line without its newline counts at EOF only when it is provably whole
  (`[DONE]`, or a value that parses as JSON), since a cut line is exactly what it would look like.

Cost: `feed` runs for every chunk of every stream. Only the unfinished last line is kept between
chunks, and only its first `_LINE_CAP` bytes (longer lines are judged by that prefix: a terminal
`type` must then be the first key, which OpenAI's serialisation does). A chunk whose bytes hold
none of the marker words cannot hold a marker line and is not split into lines at all; the words
are looked for with C-level `in`, and JSON is parsed only for lines that pass that filter.
"""

from __future__ import annotations

import enum
import re

import orjson

_LINE_CAP = 64 * 1024  # the most of one unfinished line kept between chunks
_BOM = b"\xef\xbb\xbf"
_TERMINAL = frozenset((b"response.completed", b"response.failed", b"response.incomplete"))
_TERMINAL_STR = frozenset(t.decode() for t in _TERMINAL)
# For lines too long to keep whole: judged by their first key.
_FIRST_KEY_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"(response\.(?:completed|failed|incomplete)|error)"')
_FIRST_KEY_ERROR = re.compile(rb'\s*\{\s*"error"\s*:\s*[^\sn]')  # not `"error": null`

_END = 1
_ERROR = 2


class StreamEnd(enum.Enum):
    COMPLETE = "complete"
    TRUNCATED = "truncated"
    ERROR_EVENT = "error_event"


class Dialect(enum.Enum):
    """Which end and error rules a stream follows (see the module docstring)."""

    CHAT = "chat"            # `data: [DONE]`
    RESPONSES = "responses"  # terminal Responses API events


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

    __slots__ = ("_chat", "_head", "_pending", "_over", "_armed", "_ended", "_error")

    def __init__(self, dialect: Dialect) -> None:
        self._chat = dialect is Dialect.CHAT
        self._head: bytes | None = b""  # bytes of a possible BOM at stream start; None once past it
        self._pending = bytearray()  # the unfinished last line (its first _LINE_CAP bytes)
        self._over = False  # the unfinished line is longer than what _pending holds
        self._armed = 0  # Responses: an `event:` line named a terminal (_END) or error event
        self._ended = False
        self._error = False

    def feed(self, chunk: bytes) -> None:
        if self._head is not None:
            chunk = self._skip_bom(chunk)
        if not chunk:
            return
        n = len(chunk)
        c = chunk[-1]
        if c == 10 or c == 13:  # the usual chunk: whole lines
            last = n - 1
        else:
            last = chunk.rfind(b"\n")
            cr = chunk.rfind(b"\r")
            if cr > last:
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
        if start < last and (self._armed or (
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
        if self._error:
            return StreamEnd.ERROR_EVENT
        return StreamEnd.COMPLETE if self._ended else StreamEnd.TRUNCATED

    def _skip_bom(self, chunk: bytes) -> bytes:
        head = self._head + chunk  # type: ignore[operator]
        if len(head) < 3 and _BOM.startswith(head):
            self._head = head  # too short to tell yet
            return b""
        self._head = None
        return head[3:] if head.startswith(_BOM) else head

    def _keep(self, chunk: bytes, start: int) -> None:
        """Append chunk[start:] to the unfinished line, up to _LINE_CAP bytes in all."""
        if self._over:
            return
        room = _LINE_CAP - len(self._pending)
        if len(chunk) - start > room:
            self._pending += chunk[start:start + room]
            self._over = True
        else:
            self._pending += chunk[start:] if start else chunk

    def _line(self, line: bytes, cut: bool, eof: bool) -> None:
        """Judge one line. `cut`: only its prefix was kept; `eof`: it lacks its newline."""
        if self._chat:
            if not line.startswith(b"data:"):
                return
            value = _value(line, 4)
            if value.startswith(b"[DONE]"):
                self._ended = True
            elif value.find(b'"error"') >= 0:
                if cut:
                    found = not eof and _FIRST_KEY_ERROR.match(value) is not None
                else:
                    data = _json(value)
                    found = isinstance(data, dict) and bool(data.get("error"))
                if found:
                    self._error = True
            return
        if line.startswith(b"event:"):
            value = _value(line, 5)
            self._armed = _END if value in _TERMINAL else _ERROR if value == b"error" else 0
            return
        if not line.startswith(b"data:"):
            return
        value = _value(line, 4)
        if self._armed:  # the data line of an `event:` already judged
            if not eof or (not cut and _json(value) is not None):
                if self._armed == _END:
                    self._ended = True
                else:
                    self._error = True
            self._armed = 0
            return
        if value.find(b"complete") < 0 and value.find(b"failed") < 0 and value.find(b'"error"') < 0:
            return
        kind = None
        if not eof:
            m = _FIRST_KEY_TYPE.match(value)
            if m is not None:
                kind = m.group(1).decode()
        if kind is None and not cut:
            data = _json(value)
            if isinstance(data, dict) and isinstance(data.get("type"), str):
                kind = data["type"]
        if kind == "error":
            self._error = True
        elif kind in _TERMINAL_STR:
            self._ended = True


def judge(method: str, path: str, body: bytes) -> StreamEnd | None:
    """A whole event-stream body, read before the commit; None when the endpoint's end is unknown."""
    markers = end_markers(method, path)
    if markers is None:
        return None
    watcher = StreamWatcher(*markers)
    watcher.feed(body)
    return watcher.result()
