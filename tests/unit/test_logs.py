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
