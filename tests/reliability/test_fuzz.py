"""Fuzz the traffic listener with generated malformed requests (hypothesis).

Each example is a request built from a valid one with one to three defects (request line, header
names and values, framing, chunked encoding, line endings, raw garbage, the key in odd places),
sent on a fresh connection to a real `python -m proxy` in front of the mock upstream. Properties:

* an answer (or a close) comes within the bounds: nothing hangs;
* the proxy never answers 500 on its own (an unhandled error: aiohttp's "Server got itself in
  trouble"); a 5xx must be a proxy-made error (x-proxy-error) or the upstream's;
* the process never dies, and keeps serving a valid request (checked every 50 examples and at the end).

FUZZ_EXAMPLES sets the number of examples (default 2,000 in the suite, ~10 s; the 10,000-example run is
recorded in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.testing import MockUpstream

from ..conftest import CANARY, ROOT, TEST_KEY, write_config
from .rawhttp import exchange_sync

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
KEY = TEST_KEY.encode()


class Target:
    """The mock upstream on a thread of its own and the proxy as a subprocess writing to files."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.mock = MockUpstream(keepalive_timeout=1.0, keep_received=False)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.mock.start(), self.loop).result(10)
        path = write_config(tmp_path, self.mock.url, {
            "defaults": {"timeouts": {"connect": "1s", "first_byte": "2s", "idle": "2s", "total": "5s"}}})
        self.out_path, self.err_path = tmp_path / "proxy.out", tmp_path / "proxy.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "--config", str(path), "--port", "0",
                                          "--admin-port", "0"], cwd=str(ROOT), env=env, stdout=out, stderr=err)
        self.traffic = ""
        deadline = time.monotonic() + 20
        while not self.traffic:
            assert self.proc.poll() is None, self.err_path.read_text()
            assert time.monotonic() < deadline, "the proxy did not start"
            for line in self.out_path.read_text().splitlines():
                if '"listening"' in line:
                    self.traffic = "http://" + json.loads(line)["traffic"][0]
            time.sleep(0.05)  # polling the log file with a deadline, not a synchronising sleep

    def serves(self) -> bool:
        reply = exchange_sync(self.traffic, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY
                              + b"\r\nConnection: close\r\n\r\n", timeout=5)
        return reply.status == 200

    def close(self) -> tuple[int, str]:
        self.proc.terminate()
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        asyncio.run_coroutine_threadsafe(self.mock.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        return code, self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")


@pytest.fixture
def target(tmp_path, leaks) -> Iterator[Target]:
    t = Target(tmp_path)
    try:
        yield t
    finally:
        code, output = t.close()
        leaks.texts.append(output)
        t.exit_code = code  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- the generator

TOKEN = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"])
BAD_BYTES = st.binary(min_size=1, max_size=12).filter(lambda b: b"\r\n\r\n" not in b)
PATHS = st.sampled_from([b"/v1/chat/completions", b"/v1/models", b"/v1/files/file-size-2048/content",
                         b"/v1/echo/fuzz", b"/v1/responses", b"/v1/embeddings?api_key=" + KEY, b"/"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A request with one to three defects; returns (bytes, the defects' names)."""
    method, path = draw(TOKEN), draw(PATHS)
    version = b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"proxy"), (b"Authorization", b"Bearer " + KEY)]
    body = draw(st.binary(max_size=64)) if method in (b"POST", b"PUT", b"PATCH") else b""
    framing = "length"
    eol = b"\r\n"
    defects = draw(st.lists(st.sampled_from([
        "method", "target", "version", "header_name", "header_value", "header_ctl", "fold", "huge_header",
        "many_headers", "no_host", "dup_host", "cl_garbage", "cl_conflict", "cl_and_te", "te_unknown",
        "chunked_bad_size", "chunked_bad_end", "chunked_ext", "bare_lf", "bare_cr", "garbage",
        "key_in_bad_header", "expect", "upgrade", "absolute_form",
    ]), min_size=1, max_size=3, unique=True))
    for d in defects:
        if d == "method":
            method = draw(st.sampled_from([b"", b"G ET", b"get", b"\x00GET", b"GET\x7f", b"X" * 200, b"G\xffT"]))
        elif d == "target":
            path = draw(st.sampled_from([b"", b"v1/models", b"/v1/mo dels", b"/v1/\x00", b"/v1/\xff\xfe",
                                         b"/v1/" + b"a" * 9000, b"/v1/%zz%", b"/v1/#frag", b"//v1//models",
                                         b"/v1/models?" + b"&" * 50, b"/../../etc/passwd"]))
        elif d == "version":
            version = draw(st.sampled_from([b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b"HTTP/1", b"HTTP/01.1",
                                            b"HTTP/1.10", b"HTTP/1.1 extra", b"HTTP/"]))
        elif d == "header_name":
            headers.append((draw(st.sampled_from([b"", b"Bad Name", b"X\x00Y", b"X:Y", b"\xffX", b"X\tY",
                                                  b"(x)", b"X" * 9000])), b"1"))
        elif d == "header_value":
            headers.append((b"X-Fuzz", draw(BAD_BYTES)))
        elif d == "header_ctl":
            headers.append((b"X-Ctl", b"a" + bytes([draw(st.integers(0, 31).filter(lambda c: c != 9))]) + b"b"))
        elif d == "fold":
            headers.append((b"X-Fold", b"one\r\n two"))
        elif d == "huge_header":
            headers.append((b"X-Huge", b"h" * draw(st.integers(8100, 70_000))))
        elif d == "many_headers":
            headers.extend((b"X-M%d" % i, b"v") for i in range(draw(st.integers(100, 400))))
        elif d == "no_host":
            headers = [h for h in headers if h[0] != b"Host"]
        elif d == "dup_host":
            headers.append((b"Host", b"other"))
        elif d == "cl_garbage":
            framing = "none"
            headers.append((b"Content-Length", draw(st.sampled_from([b"abc", b"-1", b"+5", b"1 2", b"0x10", b"",
                                                                     b"99999999999999999999999"]))))
        elif d == "cl_conflict":
            framing = "none"
            headers += [(b"Content-Length", str(len(body)).encode()), (b"Content-Length", str(len(body) + 1).encode())]
        elif d == "cl_and_te":
            framing = "none"
            headers += [(b"Content-Length", str(len(body)).encode()), (b"Transfer-Encoding", b"chunked")]
        elif d == "te_unknown":
            framing = "none"
            headers.append((b"Transfer-Encoding", draw(st.sampled_from([b"gzip", b"chunked, gzip", b"identity",
                                                                         b"chunked, chunked", b"xchunked"]))))
        elif d in ("chunked_bad_size", "chunked_bad_end", "chunked_ext"):
            framing = d
        elif d == "bare_lf":
            eol = b"\n"
        elif d == "bare_cr":
            eol = b"\r"
        elif d == "key_in_bad_header":
            headers.append((b"Authorization", b"Bearer " + KEY + bytes([draw(st.integers(0, 8))])))
        elif d == "expect":
            headers.append((b"Expect", draw(st.sampled_from([b"100-continue", b"200-ok", b"\x00"]))))
        elif d == "upgrade":
            headers += [(b"Connection", b"Upgrade"), (b"Upgrade", draw(st.sampled_from([b"websocket", b"h2c", b"\x01"])))]
        elif d == "absolute_form":
            path = b"http://example.com" + path
    if "garbage" in defects:
        return draw(st.binary(min_size=1, max_size=256)) + b"\r\n\r\n", defects
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing.startswith("chunked"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        size = b"%x" % len(body)
        if framing == "chunked_bad_size":
            size = draw(st.sampled_from([b"zz", b"-1", b"", b"ffffffffffffffffffffff", b"1 2"]))
        ext = b";" + draw(BAD_BYTES) if framing == "chunked_ext" else b""
        end = b"XX" if framing == "chunked_bad_end" else b"\r\n"
        body = size + ext + b"\r\n" + body + end + b"0\r\n\r\n"
    headers.append((b"Connection", b"close"))
    head = method + b" " + path + b" " + version + eol + b"".join(n + b": " + v + eol for n, v in headers) + eol
    return head + body, defects


# ----------------------------------------------------------------------------- the property


def test_fuzz_the_listener(target: Target):
    seen: collections.Counter[str] = collections.Counter()
    known: collections.Counter[str] = collections.Counter()
    count = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def fuzz(case: tuple[bytes, list[str]]) -> None:
        nonlocal count
        data, defects = case
        count += 1
        reply = exchange_sync(target.traffic, data, timeout=3.0, quiet=0.3)
        assert not reply.timed_out, f"no answer and no close within the bounds for {defects}: {data[:200]!r}"
        label = str(reply.status) if reply.status is not None else "closed"
        seen[label] += 1
        if reply.status is not None and reply.status >= 500 and "x-proxy-error" not in reply.headers \
                and "x-request-id" not in reply.headers:  # neither the proxy's own error nor the upstream's
            if "absolute_form" in defects:  # BUG, see test_non_origin_form_request_targets_get_4xx
                known["500 for an absolute-form target"] += 1
            else:
                raise AssertionError(f"unhandled error {reply.status} for {defects}: {data[:300]!r} -> {reply.raw[:300]!r}")
        if reply.status == 400 and CANARY.encode() in reply.body:
            known["key echoed in a 400 body"] += 1  # BUG, see test_parse_error_answers_do_not_echo_the_api_key
        if count % 50 == 0:
            assert target.proc.poll() is None, "the proxy died"
            assert target.serves(), "the proxy stopped serving valid requests"

    began = time.monotonic()
    fuzz()
    elapsed = time.monotonic() - began
    assert target.proc.poll() is None, "the proxy died"
    assert target.serves()
    log = target.err_path.read_text(errors="replace").splitlines()
    print(f"fuzz: {count} examples in {elapsed:.1f} s; answers {dict(seen)}; known bugs {dict(known)}; "
          f"proxy stderr: {len(log)} lines, {sum('Traceback' in line for line in log)} with a traceback")
    assert count >= min(EXAMPLES, 100)
