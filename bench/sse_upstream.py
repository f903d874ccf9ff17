"""Fake OpenAI streaming upstream for bench/suite.py: N chat.completion.chunk events, one write each.

Any method, any path -> 200 text/event-stream, chunked. Query parameters (the proxy forwards the
query string as is):
  events=N   chat.completion.chunk events before `data: [DONE]` (default 300)
  gap_ms=G   pause between events (default 100; 0: as fast as the loop can write, one
             resp.write per event, the socket drained every 64 KiB as aiohttp does)
The first event is written right after the headers. Every event is ~250 bytes (the shape of a
real chat stream chunk) and carries its index ("tok<i> "), so a client can count what arrived.

usage: python sse_upstream.py      env: PORT (28002)
"""
import asyncio
import json
import os

import uvloop
from aiohttp import web

PORT = int(os.environ.get("PORT", "28002"))
_HEAD = ('data: {"id":"chatcmpl-sse000000000000000000000000000","object":"chat.completion.chunk",'
         '"created":1732280000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_bench0001",'
         '"choices":[{"index":0,"delta":{"content":')
_TAIL = '},"logprobs":null,"finish_reason":null}]}\n\n'
DONE = b"data: [DONE]\n\n"


def frame(i: int) -> bytes:
    return (_HEAD + json.dumps(f"tok{i} ") + _TAIL).encode()


FRAMES = [frame(i) for i in range(4096)]  # prebuilt; events past 4096 reuse them cyclically


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    await request.read()
    q = request.query
    events = int(q.get("events", "300"))
    gap = float(q.get("gap_ms", "100")) / 1000.0
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    write = resp.write
    if gap > 0:
        for i in range(events):
            if i:
                await asyncio.sleep(gap)
            await write(FRAMES[i % 4096])
    else:
        for i in range(events):
            await write(FRAMES[i % 4096])
    await write(DONE)
    await resp.write_eof()
    return resp


async def main() -> None:
    runner = web.ServerRunner(web.Server(handle), access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT, backlog=4096).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
