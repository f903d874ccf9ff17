import json

from proxy.classify import Category
from proxy.events import RequestFinished, RetryScheduled
from proxy.logs import WRITER, LogObserver, configure

KEY = "sk-proj-AbCdEf0123456789_xyz-TUVWabcd"


def _event(**kw):
    base = dict(route="chat_completions", method="POST", path="/v1/chat/completions", status=200,
                category=Category.OK, attempts=1, stop_reason=None, aborted=False, duration_s=0.0123, ttfb_s=0.01,
                bytes_in=10, bytes_out=20, replayable=True, upstream_request_id="req_1", client_sdk="python/3.54.0",
                client_request_id=f"corr-{KEY}")
    base.update(kw)
    return RequestFinished(**base)


def _lines(capsys):
    WRITER.flush()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_fast_request_line_matches_the_structlog_line(capsys):
    configure("info", "json")
    LogObserver()(_event())
    fast = _lines(capsys)[0]
    import structlog
    LogObserver(structlog.get_logger("x"))(_event())
    slow = _lines(capsys)[0]
    assert set(fast) == set(slow)
    for k in fast:
        if k != "timestamp":
            assert fast[k] == slow[k], k
    assert KEY not in json.dumps(fast) and fast["client_request_id"] == "corr-sk-...abcd"
    assert fast["timestamp"].endswith("Z") and fast["level"] == "info" and fast["duration_ms"] == 12.3


def test_level_warning_drops_request_lines_but_keeps_breaker_ones(capsys):
    configure("warning", "json")
    obs = LogObserver(level="warning")
    obs(_event())
    obs(RetryScheduled("r", 1, Category.SERVER, 503, 0.01, "backoff", "backoff"))
    assert _lines(capsys) == []
    configure("info", "json")


def test_console_format_renders_for_people(capsys):
    configure("info", "console")
    LogObserver(fmt="console")(_event())
    WRITER.flush()
    out = capsys.readouterr().out
    assert "request" in out and "chat_completions" in out and KEY not in out
    configure("info", "json")


# ---- the line writer: a stalled stdout blocks its thread, never the event loop ---------------------

import io  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from proxy.logs import LineWriter  # noqa: E402


class _Stalled(io.StringIO):
    """A stdout whose writes block until released (a pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        assert self.release.wait(10)
        return super().write(s)


async def test_a_stalled_stdout_never_blocks_the_loop_and_loss_is_counted(monkeypatch):
    out = _Stalled()
    monkeypatch.setattr(sys, "stdout", out)
    w = LineWriter(delay=0, max_pending=2000)
    w.write("first".ljust(99) + "\n")
    w.handoff()
    assert out.entered.wait(5)  # the writer thread is stuck in stdout.write
    for i in range(100):  # the loop goes on: every write returns at once
        w.write(f"line {i:03d}".ljust(99) + "\n")
        if i % 10 == 9:
            w.handoff()
    assert w.pending <= 2000  # bounded: 1 + 10 lines accepted, 90 dropped
    out.release.set()
    w.flush()
    lines = out.getvalue().splitlines()
    assert [line.strip() for line in lines[:11]] == ["first"] + [f"line {i:03d}" for i in range(10)]
    report = json.loads(lines[11])
    assert (report["event"], report["count"], report["level"]) == ("log_lines_dropped", 90, "warning")
    assert len(lines) == 12 and w.pending == 0


async def test_flush_does_not_hang_on_a_stalled_stdout(monkeypatch):
    out = _Stalled()
    monkeypatch.setattr(sys, "stdout", out)
    w = LineWriter(delay=0, flush_timeout=0.05)
    w.write("a\n")
    w.handoff()
    assert out.entered.wait(5)
    w.write("b\n")
    w.flush()  # returns after flush_timeout instead of waiting for stdout forever
    out.release.set()
    w.flush()
    assert out.getvalue().splitlines()[0] == "a"


def test_pieces_stay_within_pipe_buf_in_bytes():
    from proxy.logs import _pieces
    lines = [("é" * 1000) + "\n"] * 10 + ["a" * 100 + "\n"] * 100  # 2001 bytes, 1001 characters each
    pieces = _pieces(lines)
    assert all(len(p) <= 4096 for p in pieces)
    assert b"".join(pieces).decode() == "".join(lines)
