"""One SDK call during a sustained outage: how long it takes and how many upstream calls it makes.

usage: outage_sdk.py [PROXY_CHECKOUT]      (default: this checkout)

The sequence of issue 13: an upstream that answers 503 to everything; one long-lived proxy
process (`python -m proxy` from PROXY_CHECKOUT, built-in defaults: chat 3 attempts, breaker
threshold 5, reset 30 s); the official Python SDK with its defaults (2 retries). Earlier SDK calls
open the route's breaker; then one more call is timed. Run it against an older checkout to
compare, e.g. `git worktree add /tmp/old REV && python bench/outage_sdk.py /tmp/old`.
Prints one JSON line per measured call. Bounded: at most 10 calls, each with a 120 s timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.testing import MockUpstream, error  # noqa: E402

PATH = "/v1/chat/completions"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def start_proxy(checkout: Path, upstream: str, workdir: Path) -> tuple[asyncio.subprocess.Process, str]:
    config = workdir / "outage.yaml"
    config.write_text(f"upstream: {{url: {upstream}}}\nlisten: {{port: 0}}\nadmin: {{host: 127.0.0.1, port: 0}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "--config", str(config), cwd=checkout,
                                                env=env, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("the proxy exited before listening")
            event = json.loads(line)
            if event.get("event") == "listening":
                break
    asyncio.get_running_loop().create_task(_drain(proc))
    return proc, "http://" + event["traffic"][0]


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.read(65536):
        pass


async def main() -> None:
    checkout = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    async with MockUpstream() as mock:
        mock.script(PATH, *[error(503, "The engine is currently overloaded")] * 10_000)
        workdir = tempfile.TemporaryDirectory()
        proc, url = await start_proxy(checkout, mock.url, Path(workdir.name))
        try:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-bench-outage", timeout=120)
            for call in range(1, 11):
                before = len(mock.requests_to(PATH))
                began, cpu = time.perf_counter(), time.process_time()
                try:
                    await client.chat.completions.create(**CHAT)
                    status, code = 200, None
                except openai.APIStatusError as exc:
                    status, code = exc.status_code, exc.code
                print(json.dumps({"call": call, "seconds": round(time.perf_counter() - began, 3),
                                  "upstream_attempts": len(mock.requests_to(PATH)) - before,
                                  "status": status, "code": code}), flush=True)
                if code == "circuit_open":
                    break  # the breaker was open before this call: the measured case
            await client.close()
        finally:
            proc.terminate()
            await proc.wait()
            workdir.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
