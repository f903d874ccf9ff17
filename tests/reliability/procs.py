"""Helpers for `python -m proxy` subprocesses under load.

The `proxy_process` fixture (tests/conftest.py) reads the proxy's stdout only while a test waits
for an event; a test that makes the proxy log more than a pipe buffer (64 KiB, ~150 request lines)
must keep reading, or the proxy blocks on its own log writes. `draining(p)` does, into `p.lines`
(which the fixture hands to the canary-key check), and stops the proxy when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .soak import open_fds


async def poll(probe: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll `probe` (sync, or returning an awaitable) until it is true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


async def _drain(p: Any) -> None:
    assert p.proc.stdout is not None
    while raw := await p.proc.stdout.readline():
        try:
            p.lines.append(json.loads(raw))
        except ValueError:
            p.output += raw.decode("utf-8", "replace")


@contextlib.asynccontextmanager
async def draining(p: Any, *, stop: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """Read the proxy's stdout while the block runs; then (stop=True) SIGTERM it and read to the end."""
    task = asyncio.create_task(_drain(p))
    try:
        yield task
    finally:
        if stop and p.proc.returncode is None:
            p.proc.send_signal(signal.SIGTERM)
        if stop or p.proc.returncode is not None:
            await asyncio.wait_for(task, 30)
        else:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def idle_fds(pid: int, timeout: float = 10.0) -> int:
    """The fd count once it has held still for five polls in a row."""
    counts: list[int] = []

    def still() -> bool:
        counts.append(open_fds(pid))
        return len(counts) >= 5 and len(set(counts[-5:])) == 1

    assert await poll(still, timeout), counts[-10:]
    return counts[-1]
