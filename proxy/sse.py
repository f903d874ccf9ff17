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

Resuming a cut background Responses stream (`resume_point`, `EventCursor`) needs two facts from it:
the response id and the last `sequence_number` relayed. `EventCursor` reads them at event boundaries
and lets only whole events through, so a cut never leaves the client half an event.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple
from urllib.parse import parse_qsl

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

    @property
    def ended(self) -> bool:
        """A terminal event (or an in-band error) was among the whole lines fed so far: a break after
        it has nothing left to resume."""
        return self._end is not StreamEnd.TRUNCATED

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


# ---- resuming background Responses streams ----------------------------------------------------------

_RESPONSE_ID = re.compile(r"[A-Za-z0-9_\-]{1,200}")  # resp_...: nothing that could change the resume URL
# An empty line ends an event. `\r\n` is one line end, never `\r` then `\n` (an empty line between), so a
# `\r` counts alone only once the next byte is known not to be `\n`: a chunk may end between the two.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?=[^\n])|\n)(?:\r\n|\r(?=[^\n])|\n)")
# A JSON key: inside a JSON string every `"` is escaped, so `number":` can only be a real key.
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*([0-9]{1,18})')
_STARTING = ("response.created", "response.in_progress")  # the events that carry the response's id
_STARTING_BYTES = tuple(kind.encode() for kind in _STARTING)
HOLD_CAP = 16 * 2**20  # an unfinished event held back longer than this turns the stream unresumable


class ResumePoint(NamedTuple):
    """Where a resumable stream starts: what the request itself says (a GET names both)."""

    response_id: str | None  # a GET's path; a POST's comes from its response.created event
    starting_after: int | None  # a GET's own starting_after


def may_resume(method: str, path: str) -> bool:
    """Whether `resume_point` could say yes for a request line: asked once per distinct request line
    (runtime.Target), so no other request pays for the question."""
    return (method == "POST" and path == "/v1/responses") or (
        method == "GET" and path.startswith("/v1/responses/") and path.count("/") == 3)


def resume_point(method: str, path: str, query: str, body: object) -> ResumePoint | None:
    """Whether a request's stream may be resumed after a cut: `POST /v1/responses` with `background:
    true` and `stream: true` in a JSON body held in memory (`body` bytes; a streamed body is not
    parsed), or `GET /v1/responses/{id}?stream=true`. A foreground response stops on the server when
    its connection drops: there is nothing to resume. The JSON is parsed only for that POST."""
    if not may_resume(method, path):
        return None
    if method == "POST":
        if not isinstance(body, bytes) or body.find(b"background") < 0:
            return None
        doc = _json(body)
        if isinstance(doc, dict) and doc.get("background") is True and doc.get("stream") is True:
            return ResumePoint(None, None)
        return None
    ident = path[len("/v1/responses/"):]
    params = dict(parse_qsl(query))
    after = params.get("starting_after")
    if not _RESPONSE_ID.fullmatch(ident) or params.get("stream", "").lower() != "true" or (
            after is not None and not (after.isascii() and after.isdigit() and len(after) <= 18)):
        return None
    return ResumePoint(ident, int(after) if after is not None else None)


def _data_at(event: bytes) -> int:
    """Where the event's first `data:` line starts, or -1."""
    if event.startswith(b"data:"):
        return 0
    found = [i + 1 for i in (event.find(b"\ndata:"), event.find(b"\rdata:")) if i >= 0]
    return min(found) if found else -1


def _data_value(event: bytes, at: int) -> bytes:
    """The value of the `data:` line starting at `at` (OpenAI sends one data line per event)."""
    ends = [i for i in (event.find(b"\n", at), event.find(b"\r", at)) if i >= 0]
    return _value(event[at:min(ends)] if ends else event[at:], 4)


class EventCursor:
    """Fed a resumable stream's bytes; returns what to relay now: whole events only (up to the last
    empty line), the unfinished rest held back, and no event whose `sequence_number` is not past the
    last one relayed (exactly once, even if an upstream repeats one). Keeps the response id, the last
    sequence number and the unfinished event; never the events relayed. Pure: no I/O.

    An unfinished event longer than HOLD_CAP turns the cursor off: from then on bytes pass through as
    they come and the stream is no longer resumable."""

    __slots__ = ("response_id", "last", "_tail", "_fresh", "_off")

    def __init__(self, point: ResumePoint) -> None:
        self.response_id = point.response_id
        self.last = point.starting_after  # the sequence number of the last event relayed
        self._tail = b""  # the unfinished event
        self._fresh = False  # a resumed stream's first bytes: a BOM there is not relayed
        self._off = False

    @property
    def resumable(self) -> bool:
        """The response has started (its id and a sequence number are known) and the cursor is on."""
        return not self._off and self.response_id is not None and self.last is not None

    def feed(self, chunk: bytes) -> bytes:
        if self._off:
            return chunk
        tail = self._tail
        buf, start = (tail + chunk, max(len(tail) - 3, 0)) if tail else (chunk, 0)
        if self._fresh:
            if len(buf) < 3 and _BOM.startswith(buf):
                self._tail = buf
                return b""
            self._fresh = False
            if buf.startswith(_BOM):
                buf, start = buf[3:], 0
        pos = 0
        parts = []
        for m in _EVENT_END.finditer(buf, start):  # the tail had no event end: all of them are here
            end = m.end()
            event = buf[pos:end]
            if self._accept(event):
                parts.append(event)
            pos = end
        self._tail = buf[pos:] if pos else buf
        if len(self._tail) > HOLD_CAP:
            self._off = True
            parts.append(self._tail)
            self._tail = b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self) -> bytes:
        """At the upstream's clean end: the held tail when it is a whole last event (its data is valid
        JSON: a server may leave out the empty line after the final event), else nothing: a resumed
        stream must not continue a line the cut left unfinished."""
        tail, self._tail = self._tail, b""
        if not tail.strip(b"\r\n"):
            return tail  # the end of the last empty line
        at = _data_at(tail)
        if at < 0 or _json(_data_value(tail, at)) is None:
            return b""
        return tail if self._accept(tail) else b""

    def restart(self) -> None:
        """A resumed stream follows: the half event the cut left is dropped, never relayed."""
        self._tail = b""
        self._fresh = True

    def _accept(self, event: bytes) -> bool:
        """Whether to relay one whole event; learns its sequence number (and the response id)."""
        at = _data_at(event)
        if at < 0:
            return True  # a comment or keep-alive: nothing to count
        m = _SEQUENCE.search(event, at)
        if m is None:
            seq = None
        elif _SEQUENCE.search(event, m.end()) is None:
            seq = int(m.group(1))
        else:  # the key also appears nested: read the top-level one
            doc = _json(_data_value(event, at))
            seq = doc.get("sequence_number") if isinstance(doc, dict) else None
            seq = seq if isinstance(seq, int) else None
        created, in_progress = _STARTING_BYTES
        if self.response_id is None and (event.find(created) >= 0 or event.find(in_progress) >= 0):
            self._learn_id(_data_value(event, at))
        if seq is None:
            return True
        if self.last is not None and seq <= self.last:
            return False
        self.last = seq
        return True

    def _learn_id(self, data: bytes) -> None:
        doc = _json(data)
        if isinstance(doc, dict) and doc.get("type") in _STARTING:
            response = doc.get("response")
            ident = response.get("id") if isinstance(response, dict) else None
            if isinstance(ident, str) and _RESPONSE_ID.fullmatch(ident):
                self.response_id = ident
