"""Failover latency (issue 16's goals), measured, not asserted: one process, in-process mocks.

    PYTHONPATH=. .venv/bin/python bench/failover.py [--requests 2000] [--out /tmp/failover-bench.md] > /dev/null

Three proxies on the same two mock upstreams, measured round-robin (one request to each in turn,
so drift and noise hit all alike), sequential requests through one keep-alive aiohttp session:

- single:   route upstreams [secondary]                  (the baseline: a direct call to the secondary)
- failover: route upstreams [primary, secondary], the primary answers every request 503 and its breaker
            never opens (failure_threshold above the request count) and the retry budget is lifted (ratio 1):
            each request fails over
- skipped:  route upstreams [primary, secondary], the primary's breaker open (one 503, threshold 1,
            reset_timeout 1h): each request skips it without an attempt

The goals: failover p50 - single p50 < 5 ms, with no backoff between the upstreams (the sleep is
counted); skipped: 0 primary attempts and a p50 within noise of single. Logs (JSON, to stdout) are
on, as in production: redirect stdout. The secondary has an injected key, in every scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy import config as cfg  # noqa: E402
from proxy.app import TrafficServer, standard_observers  # noqa: E402
from proxy.logs import WRITER, configure  # noqa: E402
from proxy.testing import MockUpstream, error  # noqa: E402

PATH = "/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
ENV = "FAILOVER_BENCH_SECONDARY_KEY"


async def start_proxy(tmp: str, name: str, primary: str, secondary: str, upstreams: list[str], threshold: int):
    doc = {"upstreams": {"primary": {"url": primary},
                         "secondary": {"url": secondary, "auth": {"header": "api-key", "value_from_env": ENV}}},
           # the budget lifted so every request may fail over: with the default one (20 % + 10/s), a primary
           # whose breaker never opens would see failovers stop with `budget` once it is spent
           "defaults": {"breaker": {"failure_threshold": threshold, "reset_timeout": "1h"},
                        "retry": {"budget": {"ratio": 1.0, "min_per_second": 10000}}},
           "routes": [{"name": "chat", "methods": ["POST"], "path": PATH, "upstreams": upstreams}]}
    path = Path(tmp) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = cfg.load(str(path))
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:  # counted: a failover must never wait
        sleeps.append(delay)
        await asyncio.sleep(delay)
    server = TrafficServer(config, standard_observers(config, CollectorRegistry()), sleep=sleep)
    await server.setup()
    await server.listen("127.0.0.1", 0)
    host, port = server.addresses[0][:2]
    return server, f"http://{host}:{port}", sleeps


async def timed(session: aiohttp.ClientSession, url: str) -> float:
    began = time.perf_counter()
    async with session.post(url + PATH, data=BODY, headers={"Content-Type": "application/json",
                                                           "Authorization": "Bearer sk-bench-client"}) as r:
        await r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - began


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if q < 100 else max(values) * 1000


async def main(n: int, out: str) -> None:
    os.environ[ENV] = "bench-secret-0123456789abcdef"
    configure("info", "json")
    async with MockUpstream(keep_received=False) as primary, MockUpstream(keep_received=False) as secondary:
        with tempfile.TemporaryDirectory() as tmp:
            single = await start_proxy(tmp, "single", primary.url, secondary.url, ["secondary"], 5)
            failover = await start_proxy(tmp, "failover", primary.url, secondary.url, ["primary", "secondary"], n * 10)
            skipped = await start_proxy(tmp, "skipped", primary.url, secondary.url, ["primary", "secondary"], 1)
            primary.script(PATH, *[error(503, "always down", type="server_error")] * (n + 200) * 2)
            results: dict[str, list[float]] = {"single": [], "failover": [], "skipped": []}
            async with aiohttp.ClientSession() as session:
                for name, (_, url, _) in (("single", single), ("failover", failover), ("skipped", skipped)):
                    for _ in range(100):  # warm-up: pools, caches; opens the skipped proxy's primary breaker
                        await timed(session, url)
                before = primary.arrivals
                for _ in range(n):
                    for name, (_, url, _) in (("single", single), ("failover", failover), ("skipped", skipped)):
                        results[name].append(await timed(session, url))
                primary_calls = primary.arrivals - before
            for server, _, _ in (single, failover, skipped):
                await server.cleanup()
    WRITER.flush()
    report(results, n, primary_calls, failover[2], skipped[2], out)


def report(results: dict[str, list[float]], n: int, primary_calls: int, failover_sleeps: list[float],
           skipped_sleeps: list[float], out: str) -> None:
    p50 = {name: statistics.median(v) * 1000 for name, v in results.items()}
    lines = [
        "# Failover latency (bench/failover.py)", "",
        f"`PYTHONPATH=. .venv/bin/python bench/failover.py --requests {n} > /dev/null` on {os.cpu_count()} CPUs "
        "(shared), Python " + sys.version.split()[0] + ": sequential requests, round-robin over the three proxies, "
        "one process (client, proxies and mocks share one event loop, so absolute numbers include the client's "
        "and the mocks' own time; the differences are the proxy's).", "",
        "| scenario | p50 ms | p90 ms | p99 ms | vs single p50 |", "|---|---|---|---|---|",
    ]
    for name, v in results.items():
        lines.append(f"| {name} | {p50[name]:.3f} | {pct(v, 90):.3f} | {pct(v, 99):.3f} | "
                     f"{p50[name] - p50['single']:+.3f} ms |")
    lines += ["", f"- primary attempts during the measured {n} x 3 requests: {primary_calls} "
                  f"(all from the failover proxy: {n} expected)",
              f"- sleeps in the failover proxy: {len(failover_sleeps)}; in the skipped proxy: {len(skipped_sleeps)}",
              f"- goal 1 (failover adds < 5 ms at p50): {'met' if p50['failover'] - p50['single'] < 5 else 'MISSED'}",
              f"- goal 2 (breaker open: 0 primary attempts, p50 within noise): primary attempts from it: "
              f"{primary_calls - n}, p50 {p50['skipped'] - p50['single']:+.3f} ms"]
    text = "\n".join(lines) + "\n"
    Path(out).write_text(text)
    print(text, file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/failover-bench.md")
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.out))
