"""Resuming cut background Responses streams (issue 18), measured: N background streams, each cut once
at a random point by the mock, must all reach the client complete, every event exactly once and in
order. Reports the resumes, the delay a resume adds, and the proxy's memory and CPU.

usage: python bench/resume.py [--streams 1000] [--concurrency 50] [--events 20] [--interval 0.01] [--seed 18]

The mock upstream (`python -m proxy.testing`) and the proxy (`python -m proxy`, this checkout, built-in
routes) run as their own processes on ports the OS picks; the client here is aiohttp with a small
SSE parser (lighter than the SDK, so the client's CPU does not blur the timings). Each stream asks
the mock for its cut with `x-mock-faults: cut:K` (K events, then the mock closes the connection) and a
unique `x-mock-key`, so the proxy's resume (which carries the client's headers) gets the normal answer.

Delay per resume: the gap, at the client, between the last event before the cut and the first one
after it. The mock sends a resumed stream's first event at once, so that gap is the whole cost of
the cut: the proxy noticing the close, its reconnect, the mock's answer and the relay. It is set
against "connect + first byte": a fresh connection straight to the mock, GET ?stream=true
&starting_after=K-1, until its first event, measured by each worker right after its stream, under
the same load. Memory: the proxy's RSS after the warm-up and after every quarter of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
KEY = "Bearer sk-bench-0000000000000000000000000000"
# Every stream here is cut on purpose. With the built-in settings the route's breaker would count the
# cuts (five in a row open it) and its budget would stop resuming once resumes passed 20 % of requests
# plus 10/s: right for a real upstream that cuts everything, not what this run measures.
SETTINGS = """defaults:
  retry: {budget: {ratio: 1.0, min_per_second: 10000}}
  breaker: {failure_threshold: 1000000}
"""
TICK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def spawn(args: list[str], marker: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    """Start a process and return it with the first stdout line containing `marker`."""
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, cwd=ROOT, env=env, start_new_session=True,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while marker not in (line := (await proc.stdout.readline()).decode()):
            if not line:
                raise RuntimeError(f"{args} exited before printing {marker!r}")
    asyncio.get_running_loop().create_task(_drain(proc))
    return proc, line


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.read(65536):
        pass


async def events(resp: aiohttp.ClientResponse) -> tuple[list[tuple[int, str, float]], str]:
    """(sequence_number, type, arrival time) of each event of an event stream, and the response id."""
    out, data, ident = [], [], ""
    async for raw in resp.content:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].strip())
        elif not line and data:
            doc = json.loads(b"\n".join(data))
            out.append((doc["sequence_number"], doc["type"], time.perf_counter()))
            if doc["type"] == "response.created":
                ident = doc["response"]["id"]
            data = []
    return out, ident


async def direct_first_byte(direct: aiohttp.ClientSession, mock: str, ident: str, after: int) -> float:
    """A fresh connection to the mock (`direct` pools none), GET the stream after `after`: seconds until
    its first event."""
    began = time.perf_counter()
    async with direct.get(f"{mock}/v1/responses/{ident}?stream=true&starting_after={after}",
                          headers={"Authorization": KEY}) as r:
        async for raw in r.content:
            if raw.startswith(b"data:"):
                return time.perf_counter() - began
    raise RuntimeError("no event")


async def one(session: aiohttp.ClientSession, direct: aiohttp.ClientSession, proxy: str, mock: str, n: int,
              cut: int, total: int, out: dict[str, list]) -> None:
    body = {"model": "gpt-4o-mini", "input": "hi", "stream": True, "background": True}
    headers = {"Authorization": KEY, "x-mock-faults": f"cut:{cut}", "x-mock-key": f"bench-{n}"} if cut else {
        "Authorization": KEY}
    async with session.post(proxy + "/v1/responses", json=body, headers=headers) as r:
        got, ident = await events(r)
    seqs = [s for s, _, _ in got]
    if seqs != list(range(total)) or got[-1][1] != "response.completed":
        out["bad"].append((n, cut, seqs))
        return
    times = [t for _, _, t in got]
    if not cut:
        out["normal"].extend(b - a for a, b in zip(times[1:], times[2:]))
        return
    out["gap"].append(times[cut] - times[cut - 1])
    out["normal"].extend(b - a for a, b in zip(times[1:cut], times[2:cut]))  # gaps not touching the cut
    out["direct"].append(await direct_first_byte(direct, mock, ident, cut - 1))


async def run(args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PYTHONPATH"] = str(ROOT)
    mock_proc, line = await spawn(["-m", "proxy.testing", "--port", "0", "--sse-events", str(args.events - 7),
                                   "--sse-interval", str(args.interval)], "listening on", env)
    mock = line.split()[-1]
    work = tempfile.TemporaryDirectory()
    config = Path(work.name) / "resume.yaml"
    config.write_text(f"upstream: {{url: {mock}}}\nlisten: {{port: 0}}\nadmin: {{host: 127.0.0.1, port: 0}}\n{SETTINGS}")
    proxy_proc, line = await spawn(["-m", "proxy", "--config", str(config)], '"listening"', env)
    listening = json.loads(line)
    proxy, admin = "http://" + listening["traffic"][0], "http://" + listening["admin"][0]
    rng = random.Random(args.seed)
    out: dict[str, list] = {"gap": [], "normal": [], "direct": [], "bad": []}
    rss: list[tuple[int, float]] = []
    try:
        conn = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as direct:
            sem = asyncio.Semaphore(args.concurrency)

            async def bounded(n: int) -> None:
                async with sem:
                    cut = rng.randrange(1, args.events) if not args.no_cut else 0
                    await one(session, direct, proxy, mock, n, cut, args.events, out)

            await asyncio.gather(*(bounded(-1 - i) for i in range(args.concurrency)))  # warm-up
            for key in out:
                out[key].clear()
            rss.append((0, rss_mib(proxy_proc.pid)))
            cpu0, began = cpu_s(proxy_proc.pid), time.perf_counter()
            quarter = args.streams // 4
            for q in range(4):
                count = quarter if q < 3 else args.streams - 3 * quarter
                await asyncio.gather(*(bounded(q * quarter + i) for i in range(count)))
                rss.append((q * quarter + count, rss_mib(proxy_proc.pid)))
            wall, cpu = time.perf_counter() - began, cpu_s(proxy_proc.pid) - cpu0
            async with session.get(admin + "/metrics") as r:
                metrics = [ln for ln in (await r.text()).splitlines() if ln.startswith("openai_proxy_stream_resumes")]
    finally:
        for proc in (proxy_proc, mock_proc):
            proc.terminate()
            await proc.wait()
        work.cleanup()
    return {"out": out, "rss": rss, "wall": wall, "cpu": cpu, "metrics": metrics}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def report(args: argparse.Namespace, r: dict) -> str:
    o = r["out"]
    if args.no_cut:
        return "\n".join([
            f"baseline, no cuts: {args.streams} streams (+{args.concurrency} warm-up), concurrency {args.concurrency}",
            f"complete: {args.streams - len(o['bad'])}/{args.streams}",
            "proxy RSS (MiB) after N streams: " + ", ".join(f"{n}: {m:.1f}" for n, m in r["rss"]),
            f"proxy CPU: {r['cpu']:.2f} s over {r['wall']:.1f} s wall ({r['cpu'] / args.streams * 1000:.2f} ms per stream)"])
    lines = [
        f"streams: {args.streams} (+{args.concurrency} warm-up), concurrency {args.concurrency}, "
        f"{args.events} events each, {args.interval * 1000:g} ms apart, one cut each at a random event (seed {args.seed})",
        "settings over the built-in ones: " + " ".join(SETTINGS.split()),
        f"complete, every event exactly once and in order: {args.streams - len(o['bad'])}/{args.streams}"
        + (f"  FAILED: {o['bad'][:3]}" if o["bad"] else ""),
        "proxy metric: " + "; ".join(r["metrics"]),
        f"gap at the cut (last event before it -> first after it, at the client): "
        f"p50 {pct(o['gap'], .5):.2f} ms, p99 {pct(o['gap'], .99):.2f} ms, max {max(o['gap']) * 1000:.2f} ms",
        f"connect + first byte, a fresh connection straight to the mock: "
        f"p50 {pct(o['direct'], .5):.2f} ms, p99 {pct(o['direct'], .99):.2f} ms",
        f"ordinary gap between two events through the proxy: p50 {pct(o['normal'], .5):.2f} ms "
        f"(the mock's interval is {args.interval * 1000:g} ms)",
        f"gap at the cut minus the direct connect + first byte: p50 "
        f"{statistics.median(g - d for g, d in zip(o['gap'], o['direct'])) * 1000:.2f} ms",
        "proxy RSS (MiB) after N streams: " + ", ".join(f"{n}: {m:.1f}" for n, m in r["rss"]),
        f"proxy CPU: {r['cpu']:.2f} s over {r['wall']:.1f} s wall ({r['cpu'] / args.streams * 1000:.2f} ms per stream)",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--events", type=int, default=20, help="events per stream (at least 8)")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between the mock's events")
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--no-cut", action="store_true", help="no cuts: the baseline for memory and CPU")
    args = p.parse_args()
    if args.events < 8:
        p.error("--events must be at least 8 (the mock's fixed events plus one delta)")
    print(report(args, asyncio.run(run(args))))


if __name__ == "__main__":
    main()
