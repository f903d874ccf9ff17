"""The mock upstream's steps added for the reliability suite: per-request scripts, OverLength, Raw,
concurrency counters and keep_received=False (tests/integration/test_mock_upstream.py covers the rest)."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from proxy.testing import SCRIPT_HEADER, MockUpstream, OverLength, Raw, Reset, error, mock_bytes_sha256

from .rawhttp import exchange


async def test_script_request_follows_one_client_request_across_attempts():
    async with MockUpstream() as mock, aiohttp.ClientSession() as s:
        mock.script_request("a", error(503), error(502))
        mock.script_request("b", error(429))
        mock.script("/v1/chat/completions", error(500))  # path queues come after the keyed ones
        statuses = []
        for key in ("a", "b", "a", "a", None, "b"):
            headers = {SCRIPT_HEADER: key} if key else {}
            async with s.post(mock.url + "/v1/chat/completions", json={}, headers=headers) as r:
                statuses.append(r.status)
        assert statuses == [503, 429, 502, 500, 200, 200]
        mock.script_request("c", Reset(), Reset())
        assert mock.forget("c") == 2 and mock.forget("c") == 0


async def test_over_length_closes_cleanly_short_of_the_announced_length():
    async with MockUpstream() as mock:
        mock.script("/v1/files/file-size-1000/content", OverLength(extra_bytes=24))
        host_port = mock.url.removeprefix("http://")
        reply = await exchange(host_port, b"GET /v1/files/file-size-1000/content HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.status == 200 and reply.headers["content-length"] == "1024"
        assert reply.closed and len(reply.body) == 1000  # every byte of the body, then FIN
        assert not mock.received[0].cancelled.is_set()


@pytest.mark.parametrize("then", ["close", "reset", "hold"])
async def test_raw_writes_bytes_as_they_are(then):
    async with MockUpstream() as mock:
        mock.script("*", Raw(b"NOT HTTP\r\n", then=then, seconds=0.05))
        reply = await exchange(mock.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.raw == b"NOT HTTP\r\n" and reply.closed and reply.status is None
        assert not mock.received[0].cancelled.is_set()  # the mock ended it, not the peer
    with pytest.raises(ValueError):
        Raw(b"", then="later")


async def test_raw_hold_sees_the_peer_leave():
    async with MockUpstream() as mock:
        mock.script("*", Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", then="hold", gate="never"))
        host, port = mock.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"abc")).endswith(b"abc")
        writer.close()
        await asyncio.wait_for(mock.received[0].cancelled.wait(), 5)


async def test_counters_and_unrecorded_requests():
    async with MockUpstream(keep_received=False, keepalive_timeout=0.2) as mock, aiohttp.ClientSession() as s:
        mock.script("/v1/chat/completions", *[Raw(b"", then="hold", gate="go")] * 3)

        async def call() -> None:
            try:
                async with s.post(mock.url + "/v1/chat/completions", json={}) as r:
                    await r.read()
            except aiohttp.ClientError:
                pass

        tasks = [asyncio.create_task(call()) for _ in range(3)]
        async with asyncio.timeout(5):
            while mock.active < 3:
                await asyncio.sleep(0.01)  # polling a counter with a deadline
        assert mock.peak_active == 3 and mock.received == []
        mock.gate("go").set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert mock.active == 0 and mock.arrivals == 3
        mock.reset_peak()
        assert mock.peak_active == 0
        async with s.get(mock.url + "/v1/files/file-size-70000/content") as r:
            assert hashlib.sha256(await r.read()).hexdigest() == mock_bytes_sha256(70000)
