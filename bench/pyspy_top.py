"""Rank functions in a py-spy raw (collapsed-stack) profile: self and inclusive share of samples.

usage: pyspy_top.py PROFILE.raw [N] [CPU_US_PER_REQ]
Frames are grouped by function and file (line numbers dropped). "self" = samples with the
function as the innermost Python frame (time in C code it calls, e.g. uvloop, the C HTTP parser,
multidict, socket sends, counts as the calling Python frame's self time); "incl" = samples with
the function anywhere on the stack (recursion counted once). Also prints self time per area and,
per request, a split of the samples into buckets of the proxy's work (first matching rule wins);
with CPU_US_PER_REQ (from compare.sh, unprofiled) the buckets are also shown in us per request.
"""
import re
import sys
from collections import Counter

FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def area(path: str) -> str:
    for key in ("proxy/", "aiohttp/", "multidict/", "yarl/", "asyncio/", "structlog/", "prometheus_client/"):
        if key in path:
            return key.rstrip("/")
    return "other"


# (bucket, substrings, match against: "stack" = any frame, "leaf" = the innermost frame only)
BUCKETS = [
    ("observers: request log line: secret masking", ["mask_event"], "stack"),
    ("observers: request log line: stdout write+flush", ["_StdoutLogger.msg"], "stack"),
    ("observers: request log line: structlog chain, timestamp, orjson", ["LogObserver"], "stack"),
    ("observers: Prometheus metrics", ["MetricsObserver"], "stack"),
    ("observers: Emitter and event objects", ["Emitter.__call__"], "stack"),
    ("circuit breaker (pybreaker)", ["proxy/breaker.py"], "stack"),
    ("socket sends (StreamWriter._writelines)", ["StreamWriter._writelines"], "stack"),
    ("upstream request: aiohttp ClientSession.request", ["ClientSession._request", "ClientRequest.",
                                                          "ClientSession.request"], "stack"),
    ("upstream response: parse + body read (_prefetch)", ["_prefetch", "ResponseHandler.data_received",
                                                           "ClientResponse."], "stack"),
    ("response to the client: web.Response, prepare, write_eof, header filter", ["deliver (", "send_whole"],
     "stack"),
    ("request body read (read_body)", ["read_body"], "stack"),
    ("request header filter (request_headers)", ["proxy/headers.py"], "stack"),
    ("proxy own code: handler, attempt loop, routes, policy", ["proxy/"], "leaf"),
    ("aiohttp server: protocol, Request, router, Application._handle", ["aiohttp/web_"], "leaf"),
    ("aiohttp other", ["aiohttp/"], "leaf"),
    ("event loop (uvloop C code, callbacks) and create_task", ["Runner.run", "asyncio/", "run_app"], "leaf"),
]


def bucket(frames: list[str]) -> str:
    inner = [f for f in frames if "proxy/__main__.py" not in f and "<frozen runpy>" not in f]
    stack = ";".join(inner)
    leaf = inner[-1] if inner else ""
    for name, keys, where in BUCKETS:
        hay = stack if where == "stack" else leaf
        if any(k in hay for k in keys):
            return name
    return "other: " + leaf.split(" (")[0]


def main() -> int:
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    us = float(sys.argv[3]) if len(sys.argv) > 3 else None
    self_c, incl_c, area_c, bucket_c = Counter(), Counter(), Counter(), Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        bucket_c[bucket(stack.split(";"))] += c
        frames = []
        for f in stack.split(";"):
            m = FRAME.match(f)
            frames.append(f"{m.group(1)} ({m.group(2)})" if m else f)
        leaf = frames[-1]
        self_c[leaf] += c
        area_c[area(leaf)] += c
        for f in set(frames):
            incl_c[f] += c
    print(f"{total} samples")
    print("\nself time by area:")
    for a, c in area_c.most_common():
        print(f"  {100 * c / total:5.1f}%  {a}")
    print(f"\ntop {n} by self time:            self   incl")
    for f, c in self_c.most_common(n):
        print(f"  {100 * c / total:5.1f}% {100 * incl_c[f] / total:5.1f}%  {f}")
    print("\nbuckets" + (f" (x {us:.0f} us/req)" if us else "") + ":")
    for b, c in bucket_c.most_common():
        print(f"  {100 * c / total:5.1f}%" + (f"  ~{us * c / total:5.1f} us/req" if us else "") + f"  {b}")
    print(f"\ntop {n} by inclusive time (proxy/ and aiohttp/ frames only):")
    shown = 0
    for f, c in incl_c.most_common():
        if "proxy/" in f or "aiohttp/" in f:
            print(f"  {100 * c / total:5.1f}% (self {100 * self_c[f] / total:4.1f}%)  {f}")
            shown += 1
            if shown >= n:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
