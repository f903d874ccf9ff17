"""SIGTERM with 100 streams in flight: /readyz 503 at once, none cut inside the grace, exit 0."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from proxy.testing import MockUpstream, Stall

from ..conftest import TEST_KEY, write_config
from .procs import draining, poll

STREAMS = 100


async def test_sigterm_with_100_streams_in_flight(tmp_path, mock: MockUpstream, proxy_process):
    path = write_config(tmp_path, mock.url, {"shutdown_grace": "20s"})
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    mock.script("/v1/chat/completions", *[Stall(after_events=1, gate="go")] * STREAMS)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    async with draining(p, stop=False) as reader, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as s, aiohttp.ClientSession() as admin:
        async def open_stream() -> aiohttp.ClientResponse:
            r = await s.post(p.traffic + "/v1/chat/completions", json=body, headers=headers)
            assert r.status == 200
            assert (await r.content.readuntil(b"\n\n")).startswith(b"data: {")
            return r

        streams = await asyncio.gather(*(open_stream() for _ in range(STREAMS)))
        async with admin.get(p.admin + "/metrics") as r:
            assert "openai_proxy_in_flight_requests{route=\"chat_completions\"} 100.0" in await r.text()

        signalled = time.monotonic()
        p.signal()

        async def not_ready() -> bool:
            async with admin.get(p.admin + "/readyz") as r:
                return r.status == 503 and (await r.json())["status"] == "draining"

        assert await poll(not_ready, 5)  # draining shows at once; bounded generously for a busy machine
        readyz_after = time.monotonic() - signalled
        assert await poll(lambda: any(line.get("event") == "draining" for line in p.lines), 5)

        async def refused() -> bool:  # the listener stops accepting
            try:
                async with aiohttp.ClientSession() as fresh, fresh.get(p.traffic + "/v1/models") as r:
                    await r.read()
                    return False
            except aiohttp.ClientConnectionError:
                return True

        assert await poll(refused, 5)
        assert p.proc.returncode is None  # still serving the streams in flight

        mock.gate("go").set()

        async def finish(r: aiohttp.ClientResponse) -> bool:
            try:
                rest = await r.read()
            except aiohttp.ClientPayloadError:
                return False
            return rest.rstrip().endswith(b"data: [DONE]")

        complete = await asyncio.wait_for(asyncio.gather(*(finish(r) for r in streams)), 15)
        assert complete.count(True) == STREAMS, f"{complete.count(False)} streams were cut inside the grace"
        code = await asyncio.wait_for(p.proc.wait(), 20)
        print(f"drain: /readyz 503 {1000 * readyz_after:.0f} ms after SIGTERM; {complete.count(True)}/{STREAMS} "
              f"streams complete; exit {code} {time.monotonic() - signalled:.2f} s after SIGTERM")
        await asyncio.wait_for(reader, 10)
    _, _, err = await p.finish()
    assert code == 0, err
    assert "Traceback" not in err
    events = [line.get("event") for line in p.lines]
    assert events[-1] == "stopped"
    finished = [line for line in p.lines if line.get("event") == "request"]
    assert len(finished) == STREAMS and all(line["status"] == 200 and not line["aborted"] for line in finished)
