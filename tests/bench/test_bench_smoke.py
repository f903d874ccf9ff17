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


PORT_VARS = ("P_UP", "P_SSE", "P_REF", "P_OURS", "P_REF_SSE", "P_OURS_SSE", "P_OURS_B")


def _free_ports(n: int) -> list[int]:
    """Ports the OS hands out now, all held until every one is chosen, so they differ."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_compare_smoke():
    missing = [tool for tool in ("nginx", "wrk", "taskset", "setsid", "curl") if shutil.which(tool) is None]
    if missing:
        reason = f"bench tools missing: {missing} (apt-get install -y nginx wrk)"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, "PY": sys.executable, "ROUNDS": "1", "DUR": "1", "WARM": "0", "LAT_DUR": "1",
           "TTFB_N": "3", "LIMIT_S": "40", "STARTUP_S": "15", **dict(zip(PORT_VARS, map(str, _free_ports(7))))}
    run = subprocess.run(["bash", str(ROOT / "bench" / "compare.sh")], env=env, capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert re.match(r"ours_rps/ref_rps=[\d.]+ ours_cpu_us/ref_cpu_us=[\d.]+ added_p50_ms ours=-?[\d.]+ ref=-?[\d.]+ "
                    r"first_chunk_added_ms ours=-?[\d.]+ ref=-?[\d.]+$", last), last
