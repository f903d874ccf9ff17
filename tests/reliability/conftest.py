"""Reliability suite fixtures: the canary-key check for everything these tests make a proxy write.

tests/conftest.py's autouse `leaks` fixture reads the captured stdout/stderr only for tests under
tests/integration/; here the same check runs for every test, so the output of in-process proxies,
of `proxy_process` subprocesses and of the soak's and fuzz's own subprocesses (which the tests add
to `leaks.texts`) is checked for the canary key too. A test that captures with `capsys` instead
adds what it captured to `leaks.texts` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from proxy.logs import WRITER

from ..conftest import LeakCheck


@pytest.fixture(autouse=True)
def reliability_leaks(request: pytest.FixtureRequest, leaks: LeakCheck) -> Iterator[LeakCheck]:
    capfd = None if "capsys" in request.fixturenames else request.getfixturevalue("capfd")
    yield leaks
    out = err = ""
    if capfd is not None:
        WRITER.flush()
        out, err = capfd.readouterr()
        sys.stdout.write(out)  # keep it visible in pytest's report of a failing test
        sys.stderr.write(err)
    leaks.check(out, err)
