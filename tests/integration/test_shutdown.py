"""SIGTERM: /readyz turns 503 at once, no new connections, open streams finish, exit 0."""

from __future__ import annotations


import aiohttp

from proxy.testing import MockUpstream, Stall

from ..conftest import write_config


async def test_sigterm_drains_open_streams(tmp_path, mock: MockUpstream, proxy_process):
    path = write_config(tmp_path, mock.url, {"shutdown_grace": "20s"})
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    mock.script("/v1/chat/completions", Stall(after_events=1, gate="go"), Stall(after_events=1, gate="go"))
    body = {"model": "m", "messages": [], "stream": True}
    async with aiohttp.ClientSession() as s:
        streams = [await s.post(p.traffic + "/v1/chat/completions", json=body) for _ in range(2)]
        for r in streams:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b"data: ")
        p.signal()
        await p.wait_event("draining")
        async with s.get(p.admin + "/readyz") as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
        async with aiohttp.ClientSession() as fresh:  # a new connection is refused
            try:
                async with fresh.get(p.traffic + "/v1/models") as r:
                    refused = False
            except aiohttp.ClientConnectionError:
                refused = True
        assert refused
        assert p.proc.returncode is None  # still serving the open streams
        mock.gate("go").set()
        for r in streams:
            rest = await r.read()  # completes cleanly: no ClientPayloadError
            assert rest.rstrip().endswith(b"data: [DONE]")
    code, out, err = await p.finish()
    assert code == 0, err
    assert "Traceback" not in err
    assert '"event":"stopped"' in out


async def test_grace_bounds_the_drain(tmp_path, mock: MockUpstream, proxy_process):
    path = write_config(tmp_path, mock.url, {"shutdown_grace": "100ms"})
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    mock.script("/v1/chat/completions", Stall(after_events=1, gate="never"))
    async with aiohttp.ClientSession() as s:
        r = await s.post(p.traffic + "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True})
        await r.content.readline()
        p.signal()
        code, out, err = await p.finish()
        assert code == 0, err
        try:
            await r.read()
            clean = True
        except aiohttp.ClientPayloadError:
            clean = False
        assert not clean  # cut by the deadline: the client can tell
    assert "Traceback" not in err
