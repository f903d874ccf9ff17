"""Resource promises: large uploads are streamed (memory stays flat) and TLS is verified."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from ..conftest import write_config

MiB = 1 << 20


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read peak memory")
async def test_large_upload_is_streamed_not_held(tmp_path, mock, proxy_process):
    path = write_config(tmp_path, mock.url)
    p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
    size = 128 * MiB
    block = b"0123456789abcdef" * 4096  # 64 KiB

    async def gen():
        for _ in range(size // len(block)):
            yield block

    async with aiohttp.ClientSession() as s:
        async with s.post(p.traffic + "/v1/echo/warmup", data=b"x") as r:  # touch every code path once
            await r.read()
        before = _vm_hwm_kib(p.proc.pid)
        async with s.post(p.traffic + "/v1/echo/big", data=gen(),
                          headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"}) as r:
            echo = await r.json()
        after = _vm_hwm_kib(p.proc.pid)
    assert echo["body_size"] == size
    grew_mib = (after - before) / 1024
    assert grew_mib < 32, f"peak memory grew {grew_mib:.0f} MiB for a {size // MiB} MiB upload"


@pytest.fixture
def self_signed(tmp_path) -> ssl.SSLContext:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make a test certificate: {exc}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_upstream_tls_certificate_is_verified(start_proxy, self_signed):
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed).start()
    port = runner.addresses[0][1]
    try:
        proxy = await start_proxy(upstream=f"https://localhost:{port}")
        async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-test", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as info:
                await client.models.list()
        assert info.value.code == "upstream_connect_error"
        assert "certificate could not be verified" in info.value.message
    finally:
        await runner.cleanup()
