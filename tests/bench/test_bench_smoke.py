"""A < 30 s run of bench/compare.sh, so the benchmark cannot rot. It measures nothing worth keeping."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from ..conftest import ROOT

REQUIRED = os.environ.get("BENCH_SMOKE_REQUIRED") == "1"  # .ci/run sets it: there a skip is a failure


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_compare_smoke():
    missing = [tool for tool in ("nginx", "wrk", "taskset", "setsid", "curl") if shutil.which(tool) is None]
    busy = [p for p in (18000, 18002, 18090, 18091, 18092, 18093) if _port_in_use(p)]
    reason = (f"bench tools missing: {missing} (apt-get install -y nginx wrk)" if missing
              else f"bench ports in use: {busy} (another benchmark is running)" if busy else None)
    if reason:
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, "PY": sys.executable, "ROUNDS": "1", "DUR": "1", "WARM": "0", "LAT_DUR": "1",
           "TTFB_N": "3", "LIMIT_S": "40", "STARTUP_S": "15"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "compare.sh")], env=env, capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert re.match(r"ours_rps/ref_rps=[\d.]+ ours_cpu_us/ref_cpu_us=[\d.]+ added_p50_ms ours=-?[\d.]+ ref=-?[\d.]+ "
                    r"first_chunk_added_ms ours=-?[\d.]+ ref=-?[\d.]+$", last), last
