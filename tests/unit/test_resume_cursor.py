"""The pure parts of resuming cut background streams (issue 18): which requests may be resumed, the
event cursor (whole events only, each once, across any chunk split), and the resume URL."""

from __future__ import annotations

import json

import pytest
from yarl import URL

from proxy import sse
from proxy.resume import resume_url
from proxy.sse import EventCursor, ResumePoint, may_resume, resume_point


def _event(seq: int, kind: str = "response.output_text.delta", nl: str = "\n", **extra: object) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": seq, **extra}, separators=(",", ":"))
    return f"event: {kind}{nl}data: {data}{nl}{nl}".encode()


def _stream(nl: str = "\n", n: int = 8) -> list[bytes]:
    created = _event(0, "response.created", nl, response={"id": "resp_abc", "status": "in_progress"})
    deltas = [_event(i, nl=nl, delta=f"tok{i} with data: [DONE] and \"sequence_number\": 99") for i in range(1, n - 1)]
    return [created, *deltas, _event(n - 1, "response.completed", nl, response={"id": "resp_abc"})]


@pytest.mark.parametrize("nl", ["\n", "\r\n", "\r"])
def test_every_split_point_relays_the_stream_unchanged(nl):
    body = b"".join(_stream(nl))
    for at in range(len(body) + 1):
        c = EventCursor(ResumePoint(None, None))
        assert c.feed(body[:at]) + c.feed(body[at:]) + c.finish() == body, at
        assert (c.response_id, c.last) == ("resp_abc", 7)


def test_byte_by_byte_and_only_whole_events_come_out():
    events = _stream()
    body = b"".join(events)
    ends = {sum(map(len, events[:i + 1])) for i in range(len(events))}
    c = EventCursor(ResumePoint(None, None))
    out = b""
    for i in range(len(body)):
        out += c.feed(body[i:i + 1])
        assert len(out) in ends | {0}, i  # never part of an event
    assert out == body


@pytest.mark.parametrize("nl", ["\n", "\r\n", "\r"])
def test_a_cut_at_every_byte_then_a_resume_gives_every_event_once(nl):
    events = _stream(nl)
    body = b"".join(events)
    for at in range(len(body)):
        c = EventCursor(ResumePoint(None, None))
        out = c.feed(body[:at])
        if not c.resumable:  # cut before response.created was whole: the proxy aborts instead
            assert at < len(events[0]) + len(nl) and out == b"", at
            continue
        c.restart()
        rest = b"".join(events[c.last + 1:])
        out += c.feed(rest[:7]) + c.feed(rest[7:]) + c.finish()
        assert out == body, at


def test_repeated_events_are_dropped():
    events = _stream()
    c = EventCursor(ResumePoint(None, None))
    assert c.feed(b"".join(events[:4])) == b"".join(events[:4])
    c.restart()
    assert c.feed(b"".join(events)) == b"".join(events[4:])  # a resume that started too early
    assert c.feed(events[2]) == b""


def test_a_get_starts_from_its_own_id_and_starting_after():
    events = _stream()
    c = EventCursor(ResumePoint("resp_x", 3))
    assert c.resumable and c.feed(b"".join(events)) == b"".join(events[4:])
    assert (c.response_id, c.last) == ("resp_x", 7)


def test_the_last_event_without_its_empty_line_is_relayed_at_the_end_but_half_of_one_is_not():
    events = _stream()
    whole_but_blank = b"".join(events)[:-1]
    c = EventCursor(ResumePoint(None, None))
    assert c.feed(whole_but_blank) + c.finish() == whole_but_blank
    c = EventCursor(ResumePoint(None, None))
    half = b"".join(events)[:-20]
    assert c.feed(half) + c.finish() == b"".join(events[:-1])
    assert c.last == 6


def test_a_resumed_streams_bom_is_not_relayed_and_comments_pass():
    events = _stream()
    c = EventCursor(ResumePoint(None, None))
    c.feed(events[0])
    c.restart()
    assert c.feed(b"\xef\xbb") + c.feed(b"\xbf" + events[1]) == events[1]
    assert c.feed(b": keep-alive\n\n") == b": keep-alive\n\n"


def test_an_event_longer_than_the_cap_turns_the_cursor_off(monkeypatch):
    monkeypatch.setattr(sse, "HOLD_CAP", 100)
    events = _stream()
    c = EventCursor(ResumePoint(None, None))
    assert c.feed(events[0]) == events[0] and c.resumable
    big = _event(1, delta="x" * 200)
    assert c.feed(big[:150]) == big[:150]  # passed on as it came
    assert not c.resumable and c.feed(big[150:]) == big[150:]


def test_a_nested_sequence_number_does_not_fool_the_cursor():
    tricky = b'data: {"type":"x","item":{"sequence_number":1},"sequence_number":5}\n\n'
    c = EventCursor(ResumePoint("resp_1", 4))
    assert c.feed(tricky) == tricky and c.last == 5


@pytest.mark.parametrize(("method", "path", "query", "body", "point"), [
    ("POST", "/v1/responses", "", b'{"model":"m","background":true,"stream":true}', ResumePoint(None, None)),
    ("POST", "/v1/responses", "", b'{"model":"m","background":false,"stream":true}', None),
    ("POST", "/v1/responses", "", b'{"model":"m","background":true}', None),  # not streamed
    ("POST", "/v1/responses", "", b'{"model":"m","stream":true}', None),  # foreground
    ("POST", "/v1/responses", "", b'{"background":true,"stream":true', None),  # not JSON
    ("POST", "/v1/responses", "", None, None),  # streamed through: not parsed
    ("POST", "/v1/chat/completions", "", b'{"background":true,"stream":true}', None),
    ("GET", "/v1/responses/resp_1", "stream=true", None, ResumePoint("resp_1", None)),
    ("GET", "/v1/responses/resp_1", "starting_after=7&stream=true", None, ResumePoint("resp_1", 7)),
    ("GET", "/v1/responses/resp_1", "", None, None),  # the JSON object, not a stream
    ("GET", "/v1/responses/resp_1", "stream=true&starting_after=-1", None, None),
    ("GET", "/v1/responses/resp%2F1", "stream=true", None, None),
    ("GET", "/v1/responses/resp_1/input_items", "stream=true", None, None),
])
def test_which_requests_may_be_resumed(method, path, query, body, point):
    assert resume_point(method, path, query, body) == point
    if point is not None:  # the per-request-line pre-check never turns away a resumable request
        assert may_resume(method, path)
    if path in ("/v1/chat/completions", "/v1/responses/resp_1/input_items"):
        assert not may_resume(method, path)  # and spares the others the question


@pytest.mark.parametrize(("url", "path", "want"), [
    ("https://api.openai.com/v1/responses", "/v1/responses",
     "https://api.openai.com/v1/responses/resp_1?stream=true&starting_after=7"),
    ("https://h.example/base/v1/responses", "/v1/responses",
     "https://h.example/base/v1/responses/resp_1?stream=true&starting_after=7"),
    ("https://r.openai.azure.com/openai/v1/responses", "/v1/responses",  # a base path for /v1
     "https://r.openai.azure.com/openai/v1/responses/resp_1?stream=true&starting_after=7"),
    ("http://127.0.0.1:81/v1/responses/resp_1?include[]=x&starting_after=2&stream=true", "/v1/responses/resp_1",
     "http://127.0.0.1:81/v1/responses/resp_1?include[]=x&stream=true&starting_after=7"),
])
def test_the_resume_url_goes_to_the_same_upstream(url, path, want):
    assert str(resume_url(URL(url, encoded=True), path, "resp_1", 7)) == want
