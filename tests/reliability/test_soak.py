"""The fault soak (bench/soak.py) in a short version: 1,500 requests at concurrency 50, 30 % faulted.

SOAK_REQUESTS changes the size; the 20,000-request run and its figures are in docs/reliability.md.
"""

from __future__ import annotations

import os

from .soak import FAULTS, KINDS, run_soak

from ..conftest import TEST_KEY


async def test_fault_soak_nothing_lost_hung_or_leaked(tmp_path, leaks):
    requests = int(os.environ.get("SOAK_REQUESTS", "1500"))
    report, output = await run_soak(requests=requests, concurrency=50, seed=7, fault_rate=0.3, key=TEST_KEY,
                                    workdir=tmp_path, keep_output=True)
    leaks.texts.append("".join(output))  # every line both proxies wrote goes through the canary check too
    print(report.render())
    assert report.violations() == []
    # the run exercised what it claims to
    assert set(report.faults) == set(FAULTS), set(FAULTS) - set(report.faults)
    assert set(report.kinds) == set(KINDS)
    assert report.faulted_recovered > 0  # transient faults healed by the proxy's retries
    assert report.outcomes.get("aborted", 0) > 0 and report.outcomes.get("proxy_error", 0) > 0
    assert report.request_log_lines >= requests  # one `request` line per client request (warm-up included)
