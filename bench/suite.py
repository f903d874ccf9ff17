"""The whole benchmark suite of docs/benchmarks.md, part by part, each part in one interleaved run.

usage: python bench/suite.py [--out DIR] [--rev REV] [--quick] PART [PART ...]
  PART: core workers memory scaling breaker (or all). bench/run_all.sh runs them all, then
  bench/report.py (tables, plots, summary lines).

  core     goals 1, 2, 6, 8: req/s + CPU us/request of ours vs the reference (bench/ref_proxy.py)
           at c=10 and c=64; added p50 at c=1 vs direct; first SSE chunk added (bench/ttfb.py);
           observers all/none/metrics/logs (bench/run_proxy.py BENCH_OBSERVERS). All targets interleaved round by round (the order rotates).
  workers  goal 3: --workers 2 vs one process at c=64 (wrk -t2, NOT pinned: the workers need both
           cores), and the supervisor's /metrics summed over the workers vs what wrk completed.
  memory   goal 4: idle RSS per process; RSS while relaying a 1 GiB download (sparse file served by
           nginx, read and sha256-hashed by a streaming client); 200 concurrent slow SSE streams
           (bench/sse_upstream.py, one event every 100 ms for 30 s, every event counted per stream);
           a slow reader (64 KiB/s of a 256 MiB download for 10 s, then no reads for 5 s).
  scaling  goal 5: req/s + CPU/request against concurrency (1, 10, 64, 256), response size (1 KiB ..
           8 MiB, GET of nginx static files), configured routes (1, 100, 1000; requests hit the last
           route, the default route, or a new path each time) and SSE events relayed per CPU-second.
  breaker  goal 7: answering with an open breaker (upstream: a closed port, failure_threshold 1) vs
           forwarding normally, c=10 and c=1.

Everything runs on 127.0.0.1 (ports 28000-28999 and 29000-29999: never next to compare.sh's 18xxx),
each process in its own process group, all stopped at exit; every wait and every run is bounded.
Our proxy always runs with the production observers (metrics + one JSON log line per request on
stdout, appended to a file in the run directory) unless a target says otherwise.
CPU per request = utime+stime of the proxy's process group (/proc/<pid>/stat) over the measured
wrk run / requests wrk completed. `other_cores` in the records: CPU used meanwhile by processes
that are not part of the benchmark (the machine is shared), a noise indicator.
Results: DIR/<part>.json (raw, per round); bench/report.py turns them into tables and plots.
Knobs (env): PY (python for the proxies; default this one), ROUNDS, DUR (seconds per measured
wrk run), QUICK=1 (same as --quick: 1-2 rounds of 1-2 s, for checking the plumbing only).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import harness as H
from harness import BENCH, ROOT, KEY, CHAT_BODY, log

SUITE_DIR = Path("/tmp/orp_suite")  # fixed: bench/nginx/suite.conf names it
WWW = SUITE_DIR / "www"
NGINX_PORT, SLOW_SSE_PORT, SSE_PORT, CLOSED_PORT = 28000, 28001, 28002, 28999
SIZES = {"1k": 1024, "16k": 16 * 1024, "256k": 256 * 1024, "1m": 2**20, "8m": 8 * 2**20}
SPARSE = {"sparse-256m": 256 * 2**20, "sparse-1g": 2**30}
ORDER = ["core", "workers", "memory", "scaling", "breaker"]


class Ctx:
    def __init__(self, out: Path, py: str, rev: str | None, quick: bool):
        self.out = out
        self.py = py
        self.quick = quick
        self.procs = H.Procs(out / "logs")
        self.records: list[dict] = []
        self.sent: dict[str, int] = {}  # target -> requests wrk completed (warm-up and measured)
        self.quiet_spent = 0.0  # seconds waited for other processes, this part
        self.src_env: dict[str, str] = {}
        self.rev = rev
        if rev:
            sha = H.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
            if not sha:
                sys.exit(f"--rev {rev}: no such commit")
            src = out / "src"
            src.mkdir(parents=True, exist_ok=True)
            subprocess.run(f"git -C {ROOT} archive {sha} proxy | tar -x -C {src}", shell=True, check=True)
            self.src_env = {"PYTHONPATH": str(src)}
            self.code = f"commit {sha[:7]} (--rev {rev}, from git archive)"
        else:
            dirty = bool(H.git("status", "--porcelain", "--", "proxy"))
            self.code = f"work tree at commit {H.git('rev-parse', '--short', 'HEAD')}" + (
                " + uncommitted changes in proxy/" if dirty else "")
        where = subprocess.run([py, "-c", "import os, proxy; print(os.path.dirname(proxy.__file__))"],
                               capture_output=True, text=True, env={**os.environ, **self.src_env}, cwd="/",
                               timeout=30).stdout.strip()
        self.imported_from = where

    def rounds(self, default: int) -> int:
        return 1 if self.quick else int(os.environ.get("ROUNDS", default))

    def dur(self, default: float) -> int:
        return 1 if self.quick else int(os.environ.get("DUR", default))

    # ------------------------------------------------------------------ processes

    def config(self, name: str, extra: str = "") -> Path:
        path = self.out / f"{name}.yaml"
        path.write_text("admin:\n  host: 127.0.0.1\n" + extra)
        return path

    def ours(self, name: str, port: int, upstream: str, *, config_extra: str = "", args: tuple = (),
             env: dict | None = None, runner: str = "module") -> None:
        """Our proxy; runner "module" is `python -m proxy`, "bench" is bench/run_proxy.py (env knobs)."""
        cfg = self.config(name, config_extra)
        head = [self.py, "-m", "proxy"] if runner == "module" else [self.py, str(BENCH / "run_proxy.py")]
        cmd = head + ["--config", str(cfg), "--upstream", upstream, "--port", str(port),
                      "--admin-port", str(port + 1000), *args]
        # cwd / : `-m proxy` must import the package from PYTHONPATH (--rev) or the install, not the cwd
        self.procs.start(name, cmd, port, env={**self.src_env, **(env or {})}, cwd=Path("/"))

    def ref(self, name: str, port: int, upstream: str) -> None:
        self.procs.start(name, [self.py, str(BENCH / "ref_proxy.py")], port,
                         env={"PORT": str(port), "UPSTREAM": upstream})

    def url(self, target: str, path: str = "/v1/chat/completions") -> str:
        port = NGINX_PORT if target == "direct" else self.procs.ports[target]
        return f"http://127.0.0.1:{port}{path}"

    def pgids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.procs.items()}

    # ------------------------------------------------------------------ measuring

    def measure(self, pass_: str, rnd: int, target: str, conc: int, dur: int, warm: int = 1, *,
                path: str = "/v1/chat/completions", script: str = "post.lua", threads: int = 1,
                cpu: str | None = "1", env: dict | None = None, **extra) -> dict:
        url = self.url(target, path)
        group = "nginx" if target == "direct" else target
        self.wait_quiet()
        if warm:
            w = H.wrk(url, conc, warm, script=script, threads=threads, cpu=cpu, env=env)
            self.sent[target] = self.sent.get(target, 0) + w.get("requests", 0)
        win = H.CpuWindow(self.pgids())
        win.start()
        w = H.wrk(url, conc, dur, script=script, threads=threads, cpu=cpu, env=env)
        c = win.stop()
        self.sent[target] = self.sent.get(target, 0) + w.get("requests", 0)
        g = c["groups"].get(group, {})
        rec = {"pass": pass_, "round": rnd, "target": target, "conc": conc, "dur": dur, "path": path,
               "wrk": w, "cpu_s": g.get("cpu_s"), "per_pid_cpu_s": g.get("per_pid"),
               "wall_s": c["wall_s"], "other_cores": c["other_cores"], "sys_busy_cores": c["sys_busy_cores"],
               **extra}
        n = w.get("requests") or 0
        rec["cpu_us"] = rec["cpu_s"] * 1e6 / n if n and rec["cpu_s"] is not None else None
        rec["cores"] = rec["cpu_s"] / c["wall_s"] if rec["cpu_s"] is not None else None
        self.records.append(rec)
        self.procs.trim_logs()
        if "error" in w:
            log(f"{pass_} r{rnd} {target} c{conc}: {w['error']}")
        else:
            log(f"{pass_} r{rnd} {target:14s} c{conc:<3d} {w['rps']:9.0f} req/s  p50 {w['p50_us'] / 1e3:7.3f} ms  "
                f"cpu {rec['cpu_us'] or 0:7.1f} us/req  cores {rec['cores'] or 0:.2f}  other {c['other_cores']:.2f}"
                f"  err {w['errors']}")
        return rec

    def wait_quiet(self) -> None:
        """Before a measured run: wait (bounded) while processes that are not ours use the CPU.

        The machine is shared; with everything of ours idle, busy CPU is someone else's. Waits up to
        QUIET_WAIT_S (20) per run and QUIET_BUDGET_S (180) per part for less than 0.3 busy cores over
        0.3 s; then measures anyway (`other_cores` in the record tells how noisy it was)."""
        limit = float(os.environ.get("QUIET_WAIT_S", 20))
        t0 = time.monotonic()
        while True:
            a = H.sys_busy_ticks()
            time.sleep(0.3)
            b = H.sys_busy_ticks()
            busy = (b[0] - a[0]) / H.TICK / 0.3
            waited = time.monotonic() - t0
            if busy < 0.3 or waited >= limit or self.quiet_spent + waited >= float(os.environ.get("QUIET_BUDGET_S", 180)):
                break
        waited = time.monotonic() - t0 - 0.3
        if waited > 0.1:
            log(f"waited {waited:.1f} s for other processes to calm down (busy {busy:.2f} cores)")
        self.quiet_spent += max(0.0, waited)

    def save(self, part: str, **data) -> Path:
        path = self.out / f"{part}.json"
        doc = {"part": part, "code": self.code, "imported_from": self.imported_from,
               "commit": H.git("rev-parse", "--short", "HEAD"), "machine": H.machine(),
               "versions": H.versions(self.py), "quick": self.quick, "records": self.records,
               "sent": self.sent, "quiet_wait_s": self.quiet_spent, **data}
        path.write_text(json.dumps(doc, indent=1, default=str))
        self.records = []
        self.sent = {}
        self.quiet_spent = 0.0
        return path


# ---------------------------------------------------------------------------------- helpers


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Authorization": KEY, "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def sanity(ctx: Ctx, target: str, path: str = "/v1/chat/completions", expect: bytes = b'"chat.completion"',
           method: str = "POST") -> None:
    status, _, body = http(method, ctx.url(target, path), CHAT_BODY if method == "POST" else None)
    if status != 200 or expect not in body:
        raise RuntimeError(f"sanity request to {target}{path} failed: HTTP {status}: {body[:200]!r}")
    ctx.sent[target] = ctx.sent.get(target, 0) + 1


def metrics_text(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        return r.read().decode()


_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+-]+)$')


def metric_sum(text: str, name: str, **match) -> float:
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group("name") != name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if all(labels.get(k) == v for k, v in match.items()):
            total += float(m.group("value"))
    return total


def wait_ready(admin_port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"admin :{admin_port} not ready within {timeout}s")


def rss_snapshot(ctx: Ctx, name: str) -> dict:
    per = H.rss_mb(ctx.procs.pgid(name))
    return {"total_mb": round(sum(per.values()), 1),
            "per_process": {f"{pid} {H.proc_name(pid)}": round(v, 1) for pid, v in sorted(per.items())}}


class RssSampler:
    """Samples the summed RSS of a process group every `every` s in a thread: (t, MiB) pairs."""

    def __init__(self, pgid: int, every: float = 0.05):
        self.pids = [pid for pid, _, _ in H.proc_table().get(pgid, [])]
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> float:
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1])
            except OSError:
                pass
        return total * H.PAGE / 2**20

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - t0, self._rss()))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self.t0 = time.monotonic()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(5)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def peak(self, t_from: float = 0.0, t_to: float = 1e9) -> float | None:
        xs = [v for t, v in self.samples if t_from <= t <= t_to]
        return max(xs) if xs else None

    def at(self, t: float) -> float | None:
        xs = [v for s, v in self.samples if s <= t]
        return xs[-1] if xs else None


class Scraper:
    """GET /metrics of an admin port every `every` s in a thread while a measurement runs."""

    def __init__(self, admin_port: int, every: float = 1.0):
        self.port = admin_port
        self.every = every
        self.times: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            t0 = time.monotonic()
            try:
                metrics_text(self.port)
                self.times.append(time.monotonic() - t0)
            except OSError:
                self.times.append(-1.0)

    def __enter__(self) -> Scraper:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(15)


def tcp_queues(port_filter) -> list[dict]:
    """Sockets from /proc/net/tcp whose (local port, remote port) pass port_filter: queue sizes."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            lport = int(parts[1].split(":")[1], 16)
            rport = int(parts[2].split(":")[1], 16)
            if parts[3] != "01":  # ESTABLISHED only
                continue
            tx, rx = (int(x, 16) for x in parts[4].split(":"))
            if port_filter(lport, rport):
                out.append({"local": lport, "remote": rport, "tx_queue": tx, "rx_queue": rx})
    return out


def prepare_files() -> None:
    """Static files for nginx: random bytes for the size pass, sparse files (zeros) for the big ones."""
    WWW.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        (SUITE_DIR / sub).mkdir(exist_ok=True)
    (WWW / "sse_body.txt").write_bytes((BENCH / "nginx" / "sse_body.txt").read_bytes())
    for name, size in SIZES.items():
        path = WWW / f"size-{name}"
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(hashlib.shake_256(name.encode()).digest(size))
    for name, size in SPARSE.items():
        path = WWW / name
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.truncate(size)


def zeros_sha256(n: int) -> str:
    cache = SUITE_DIR / f"zeros-{n}.sha256"
    if cache.exists():
        return cache.read_text().strip()
    h = hashlib.sha256()
    block = bytes(2**20)
    for off in range(0, n, len(block)):
        h.update(block[: min(len(block), n - off)])
    cache.write_text(h.hexdigest())
    return h.hexdigest()


def start_upstreams(ctx: Ctx, need: set[str]) -> None:
    if "nginx" in need and "nginx" not in ctx.procs.procs:
        prepare_files()
        ctx.procs.start("nginx", ["nginx", "-e", str(SUITE_DIR / "nginx.err"), "-c",
                                  str(BENCH / "nginx" / "suite.conf"), "-g", "daemon off;"], NGINX_PORT)
    if "slow_sse" in need and "slow_sse" not in ctx.procs.procs:
        ctx.procs.start("slow_sse", [ctx.py, str(BENCH / "slow_sse_upstream.py")], SLOW_SSE_PORT,
                        env={"PORT": str(SLOW_SSE_PORT), "GAP_MS": "20", "EVENTS": "6"})
    if "sse" in need and "sse" not in ctx.procs.procs:
        ctx.procs.start("sse", [ctx.py, str(BENCH / "sse_upstream.py")], SSE_PORT, env={"PORT": str(SSE_PORT)})


def rotate(xs: list, r: int) -> list:
    k = r % len(xs)
    return xs[k:] + xs[:k]


NGINX = f"http://127.0.0.1:{NGINX_PORT}"
SSE_UP = f"http://127.0.0.1:{SSE_PORT}"


# ---------------------------------------------------------------------------------- core


def part_core(ctx: Ctx) -> None:
    start_upstreams(ctx, {"nginx", "slow_sse"})
    R, D = ctx.rounds(5), ctx.dur(3)
    ctx.ref("ref", 28090, NGINX)
    ctx.ours("ours", 28091, NGINX)
    for i, which in enumerate(("none", "metrics", "logs")):
        ctx.ours(f"obs_{which}", 28093 + i, NGINX, runner="bench", env={"BENCH_OBSERVERS": which})
    ctx.ref("ref_sse", 28096, f"http://127.0.0.1:{SLOW_SSE_PORT}")
    ctx.ours("ours_sse", 28097, f"http://127.0.0.1:{SLOW_SSE_PORT}")
    tput = ["ref", "ours", "obs_none", "obs_metrics", "obs_logs"]
    for t in tput:
        sanity(ctx, t)
    for r in range(1, R + 1):
        for t in rotate(tput, r):
            ctx.measure("tput10", r, t, 10, D)
    for r in range(1, R + 1):
        for t in rotate(["ref", "ours"], r):
            ctx.measure("tput64", r, t, 64, D)
    for r in range(1, R + 1):
        for t in rotate(["direct", "ref", "ours"], r):
            ctx.measure("lat1", r, t, 1, 1 if ctx.quick else 2, warm=0)
    n = 5 if ctx.quick else 80
    run = subprocess.run([ctx.py, str(BENCH / "ttfb.py"), str(n),
                          f"direct=http://127.0.0.1:{SLOW_SSE_PORT}/v1/chat/completions",
                          f"ref={ctx.url('ref_sse')}", f"ours={ctx.url('ours_sse')}"],
                         capture_output=True, text=True, timeout=n * 3 + 60, cwd=BENCH)
    ttfb = [json.loads(line[5:]) for line in run.stdout.splitlines() if line.startswith("TTFB ")]
    if run.returncode != 0:
        log(f"ttfb.py failed (rc {run.returncode}): {run.stderr[-500:]}")
    alive = {t: ctx.procs.alive(t) for t in [*tput, "ref_sse", "ours_sse"]}
    for t in [*tput, "ref_sse", "ours_sse"]:
        ctx.procs.stop(t)
    ctx.save("core", ttfb=ttfb, ttfb_rc=run.returncode, alive=alive)


# ---------------------------------------------------------------------------------- workers


def part_workers(ctx: Ctx) -> None:
    start_upstreams(ctx, {"nginx"})
    R, D = ctx.rounds(5), ctx.dur(4)
    ctx.ours("w1", 28101, NGINX)
    ctx.ours("w2", 28102, NGINX, args=("--workers", "2"))
    wait_ready(29102)
    time.sleep(1.0)
    idle = {t: rss_snapshot(ctx, t) for t in ("w1", "w2")}
    for t in ("w1", "w2"):
        sanity(ctx, t)
    for r in range(1, R + 1):
        for t in rotate(["w1", "w2"], r):
            ctx.measure("tput64_t2", r, t, 64, D, threads=2, cpu=None)
    time.sleep(1.0)
    recon = {}
    for t, admin in (("w1", 29101), ("w2", 29102)):
        text = metrics_text(admin)
        recon[t] = {
            "requests_total": metric_sum(text, "openai_proxy_requests_total"),
            "requests_2xx": metric_sum(text, "openai_proxy_requests_total", status_class="2xx"),
            "requests_aborted": metric_sum(text, "openai_proxy_requests_total", status_class="aborted"),
            "requests_other": metric_sum(text, "openai_proxy_requests_total") - metric_sum(
                text, "openai_proxy_requests_total", status_class="2xx") - metric_sum(
                text, "openai_proxy_requests_total", status_class="aborted"),
            "in_flight": metric_sum(text, "openai_proxy_in_flight_requests"),
            "wrk_completed": ctx.sent.get(t, 0),
            "wrk_runs": 2 * R, "conc": 64,
        }
        (ctx.out / f"metrics_{t}.txt").write_text(text)
    after = {t: rss_snapshot(ctx, t) for t in ("w1", "w2")}
    alive = {t: ctx.procs.alive(t) for t in ("w1", "w2")}
    for t in ("w1", "w2"):
        ctx.procs.stop(t)
    ctx.save("workers", idle_rss=idle, rss_after=after, reconcile=recon, alive=alive)


# ---------------------------------------------------------------------------------- memory


async def _download(url: str, expect_size: int) -> dict:
    import aiohttp
    t0 = time.monotonic()
    h = hashlib.sha256()
    n = 0
    async with aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=600)) as s:
        async with s.get(url, headers={"Authorization": KEY}) as r:
            status = r.status
            async for chunk in r.content.iter_chunked(2**20):
                n += len(chunk)
                h.update(chunk)
    return {"status": status, "bytes": n, "sha256": h.hexdigest(), "seconds": time.monotonic() - t0,
            "complete": n == expect_size}


def download_test(ctx: Ctx, target: str, name: str = "sparse-1g") -> dict:
    size = SPARSE[name]
    path = f"/v1/files/{name}/content"
    http("GET", ctx.url(target, "/v1/files/size-1k/content"))  # a pooled upstream connection first
    time.sleep(0.5)
    pgid = ctx.procs.pgid(target)
    runs = []
    with RssSampler(pgid, 0.02) as s:
        time.sleep(0.3)
        before = s.peak()
        for _ in range(2):  # twice: the first one on a connection also pays for TCP buffer autotuning
            win = H.CpuWindow({target: pgid})
            win.start()
            one = asyncio.run(_download(ctx.url(target, path), size))
            cpu = win.stop()
            one["ok"] = one["complete"] and one["status"] == 200 and one.pop("sha256") == zeros_sha256(size)
            one["mb_per_s"] = size / 2**20 / one["seconds"]
            one["proxy_cpu_s"] = cpu["groups"][target]["cpu_s"]
            one["other_cores"] = cpu["other_cores"]
            runs.append(one)
        t_end = s.now()
        time.sleep(1.0)
    res = {"target": target, "size": size, "runs": runs, "ok": all(r["ok"] for r in runs),
           "rss_before_mb": before, "rss_peak_mb": s.peak(), "rss_after_mb": s.at(t_end + 1.0),
           "growth_mb": s.peak() - before, "mb_per_s": statistics.median(r["mb_per_s"] for r in runs),
           "proxy_cpu_s": statistics.median(r["proxy_cpu_s"] for r in runs),
           "rss_series": [(round(t, 2), round(v, 2)) for t, v in s.samples[::5]]}
    log(f"download {name} x2 via {target}: ok={res['ok']} {[round(r['mb_per_s']) for r in runs]} MiB/s, RSS {before:.1f}"
        f" -> peak {res['rss_peak_mb']:.1f} MiB (+{res['growth_mb']:.1f}), proxy CPU "
        f"{[round(r['proxy_cpu_s'], 2) for r in runs]} s")
    return res


async def _sse_streams(url: str, n: int, events: int, gap_ms: int) -> list[dict]:
    import aiohttp
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=events * gap_ms / 1000 + 60)

    async def one(session, i):
        count, tail, done, status, err = 0, b"", False, None, None
        t0 = time.monotonic()
        try:
            async with session.post(f"{url}?events={events}&gap_ms={gap_ms}", data=CHAT_BODY,
                                    headers={"Authorization": KEY, "Content-Type": "application/json"}) as r:
                status = r.status
                async for chunk in r.content.iter_any():
                    buf = tail + chunk
                    count += buf.count(b"data: ")  # the 5-byte tail cannot hold one: no double count
                    done = done or b"data: [DONE]" in buf
                    tail = buf[-5:]
        except Exception as exc:  # noqa: BLE001 - counted as a lost stream
            err = repr(exc)[:200]
        return {"status": status, "events": count - (1 if done else 0), "done": done, "error": err,
                "seconds": time.monotonic() - t0}

    async with aiohttp.ClientSession(connector=conn, timeout=timeout, auto_decompress=False) as session:
        return await asyncio.gather(*(one(session, i) for i in range(n)))


def sse_streams_test(ctx: Ctx, target: str, n: int, events: int, gap_ms: int) -> dict:
    pgid = ctx.procs.pgid(target)
    win = H.CpuWindow({target: pgid, "sse": ctx.procs.pgid("sse")})
    with RssSampler(pgid, 0.25) as s:
        time.sleep(0.5)
        before = s.peak()
        win.start()
        streams = asyncio.run(_sse_streams(ctx.url(target), n, events, gap_ms))
        cpu = win.stop()
        t_end = s.now()
        time.sleep(1.5)
    got = [x["events"] for x in streams]
    dur = events * gap_ms / 1000
    t0 = 0.5
    res = {"target": target, "streams": n, "events_per_stream": events, "gap_ms": gap_ms,
           "ok_streams": sum(1 for x in streams if x["status"] == 200 and x["done"] and x["events"] == events),
           "events_min": min(got), "events_max": max(got), "events_lost": n * events - sum(got),
           "errors": [x["error"] for x in streams if x["error"]][:5],
           "rss_before_mb": before, "rss_at_5s_mb": s.at(t0 + 5), "rss_at_end_mb": s.at(t0 + dur - 0.5),
           "rss_peak_mb": s.peak(), "rss_after_mb": s.at(t_end + 1.5),
           "proxy_cpu_s": cpu["groups"][target]["cpu_s"], "wall_s": cpu["wall_s"],
           "rss_series": [(round(t, 2), round(v, 2)) for t, v in s.samples]}
    res["growth_5s_to_end_mb"] = res["rss_at_end_mb"] - res["rss_at_5s_mb"]
    res["cpu_us_per_event"] = res["proxy_cpu_s"] * 1e6 / max(1, sum(got))
    log(f"sse x{n} via {target}: {res['ok_streams']}/{n} complete, events lost {res['events_lost']}, RSS "
        f"{before:.1f} -> 5s {res['rss_at_5s_mb']:.1f} -> end {res['rss_at_end_mb']:.1f} (peak {res['rss_peak_mb']:.1f}),"
        f" {res['cpu_us_per_event']:.1f} us CPU/event")
    return res


def slow_reader_test(ctx: Ctx, target: str, name: str = "sparse-256m", read_s: int = 10, stall_s: int = 10,
                     rate: int = 64 * 1024) -> dict:
    port = ctx.procs.ports[target]
    http("GET", ctx.url(target, "/v1/files/size-1k/content"))
    time.sleep(0.5)
    pgid = ctx.procs.pgid(target)
    got = 0
    queues = {}
    with RssSampler(pgid, 0.05) as s:
        time.sleep(0.3)
        before = s.peak()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # no autotuning: a small window
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        cport = sock.getsockname()[1]
        sock.sendall(f"GET /v1/files/{name}/content HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {KEY}\r\n\r\n"
                     .encode())
        t0 = time.monotonic()
        for sec in range(read_s):
            want = rate
            while want > 0:
                try:
                    chunk = sock.recv(min(want, 65536))
                except socket.timeout:
                    break
                if not chunk:
                    break
                got += len(chunk)
                want -= len(chunk)
            pause = t0 + sec + 1 - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        t_stall = s.now()
        time.sleep(stall_s)
        queues["client_rx"] = sum(q["rx_queue"] for q in tcp_queues(lambda lp, rp: lp == cport and rp == port))
        queues["proxy_tx_to_client"] = sum(q["tx_queue"] for q in tcp_queues(lambda lp, rp: lp == port and rp == cport))
        queues["proxy_rx_from_upstream"] = sum(q["rx_queue"] for q in tcp_queues(lambda lp, rp: rp == NGINX_PORT))
        queues["upstream_tx"] = sum(q["tx_queue"] for q in tcp_queues(lambda lp, rp: lp == NGINX_PORT))
        rss_stalled = s.peak(t_stall, 1e9)
        t_close = s.now()
        sock.close()
        time.sleep(2.0)
        after = s.at(s.now())
    up_conns = len(tcp_queues(lambda lp, rp: rp == NGINX_PORT))
    res = {"target": target, "size": SPARSE[name], "read_s": read_s, "stall_s": stall_s, "client_read": got,
           "rss_before_mb": before, "rss_peak_mb": s.peak(), "rss_peak_while_stalled_mb": rss_stalled,
           "rss_after_close_mb": after, "growth_mb": s.peak() - before, "queues_at_end_of_stall": queues,
           "upstream_connections_after_close": up_conns,
           "rss_series": [(round(t, 2), round(v, 2)) for t, v in s.samples[::4]], "t_close": t_close}
    log(f"slow reader via {target}: client read {got / 2**20:.2f} MiB in {read_s}s; RSS {before:.1f} -> peak "
        f"{res['rss_peak_mb']:.1f} (+{res['growth_mb']:.1f} MiB); queues {queues}")
    return res


def stalled_reader_test(ctx: Ctx, target: str, total_s: float, stall_s: float = 12.0) -> dict:
    """A client that reads 64 KiB of a 256 MiB download, then stops reading with its socket open.

    The target runs with `timeouts: {idle: 2s, total: <total_s>}`: does anything cut the exchange once
    `total` has passed? Polls /proc/net/tcp every 0.5 s for the proxy's socket to the client and its
    sockets to nginx; then reads whatever is left, to see how the response ends."""
    port = ctx.procs.ports[target]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    cport = sock.getsockname()[1]
    sock.sendall(f"GET /v1/files/sparse-256m/content HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {KEY}\r\n\r\n"
                 .encode())
    got = len(sock.recv(65536))
    t0 = time.monotonic()
    gone_at = None
    held = []
    while time.monotonic() - t0 < stall_s:
        time.sleep(0.5)
        cl = tcp_queues(lambda lp, rp: lp == port and rp == cport)
        up = tcp_queues(lambda lp, rp: rp == NGINX_PORT)
        held.append((round(time.monotonic() - t0, 1), sum(q["tx_queue"] for q in cl), sum(q["rx_queue"] for q in up)))
        if not cl:
            gone_at = time.monotonic() - t0
            break
    sock.settimeout(3)
    end = None
    t1 = time.monotonic()
    try:
        while time.monotonic() - t1 < 20:
            b = sock.recv(2**20)
            if not b:
                end = "EOF (connection closed without the rest of the body)"
                break
            got += len(b)
        else:
            end = "still sending after 20 s"
    except (socket.timeout, OSError) as exc:
        end = ("the whole body, connection kept open" if got >= SPARSE["sparse-256m"]
               else f"{type(exc).__name__} (stuck)")
    sock.close()
    time.sleep(0.5)
    last = ""
    for line in reversed(ctx.procs.logs[target].read_text(errors="replace").splitlines()):
        if '"event":"request"' in line and "sparse-256m" in line:
            last = line
            break
    line = json.loads(last) if last else {}
    res = {"target": target, "total_s": total_s, "stall_s": stall_s, "cut_after_s": gone_at,
           "held_kernel_bytes_at_end": held[-1][1] + held[-1][2] if held else None,
           "client_got_mb": got / 2**20, "end": end, "log_duration_ms": line.get("duration_ms"),
           "log_category": line.get("category"), "log_aborted": line.get("aborted"), "samples": held}
    log(f"stalled reader via {target} (total {total_s}s): cut after {gone_at} s; kernel bytes held at the end "
        f"{res['held_kernel_bytes_at_end']}; afterwards the client got {got / 2**20:.1f} MiB then {end}; the request "
        f"line says {line.get('category')} after {line.get('duration_ms')} ms")
    return res


def part_memory(ctx: Ctx) -> None:
    start_upstreams(ctx, {"nginx", "sse"})
    zeros_sha256(SPARSE["sparse-1g"])
    zeros_sha256(SPARSE["sparse-256m"])
    ctx.ours("mem_ours", 28110, NGINX)
    ctx.ref("mem_ref", 28112, NGINX)
    ctx.ours("mem_w2", 28113, NGINX, args=("--workers", "2"))
    wait_ready(29113)
    targets = ["mem_ours", "mem_ref", "mem_w2"]
    time.sleep(2.0)
    idle = {t: rss_snapshot(ctx, t) for t in targets}
    for t in targets:
        sanity(ctx, t)
        ctx.measure("mem_load", 1, t, 64, 1 if ctx.quick else 3, warm=0,
                    threads=2 if t == "mem_w2" else 1, cpu=None if t == "mem_w2" else "1")
    time.sleep(2.0)
    after_load = {t: rss_snapshot(ctx, t) for t in targets}
    ctx.procs.stop("mem_w2")
    big = "sparse-256m" if ctx.quick else "sparse-1g"
    # direct from nginx first: it also brings the sparse file's pages into the page cache, so the
    # first proxy measured does not pay for that (the first read of a fresh sparse file is ~3x slower)
    direct = [asyncio.run(_download(f"{NGINX}/v1/files/{big}/content", SPARSE[big])) for _ in range(2)]
    for d in direct:
        d["ok"] = d.pop("sha256") == zeros_sha256(SPARSE[big]) and d["complete"]
        d["mb_per_s"] = SPARSE[big] / 2**20 / d["seconds"]
    log(f"download {big} direct from nginx: {[round(d['mb_per_s']) for d in direct]} MiB/s")
    dl = [download_test(ctx, t, big) for t in ("mem_ours", "mem_ref")]
    slow = [slow_reader_test(ctx, t, read_s=2 if ctx.quick else 10, stall_s=2 if ctx.quick else 5)
            for t in ("mem_ours", "mem_ref")]
    for t in ("mem_ours", "mem_ref"):
        ctx.procs.stop(t)
    stalled = []
    timeouts = "defaults:\n  timeouts: {idle: 2s, total: 5s}\n"
    ctx.ours("stall_ours", 28115, NGINX, config_extra=timeouts)
    stalled.append(stalled_reader_test(ctx, "stall_ours", 5.0, 7.0 if ctx.quick else 12.0))
    ctx.procs.stop("stall_ours")
    ctx.ours("mem_sse_ours", 28114, SSE_UP)
    ctx.ref("mem_sse_ref", 28117, SSE_UP)
    for t in ("mem_sse_ours", "mem_sse_ref"):
        sanity(ctx, t, "/v1/chat/completions?events=3&gap_ms=0", b"data: [DONE]")
    time.sleep(1.0)
    sse = [sse_streams_test(ctx, t, 20 if ctx.quick else 200, 30 if ctx.quick else 300, 100)
           for t in ("mem_sse_ours", "mem_sse_ref")]
    ctx.procs.stop("mem_sse_ours")
    ctx.procs.stop("mem_sse_ref")
    ctx.save("memory", idle_rss=idle, rss_after_load=after_load, download_direct=direct, download=dl,
             slow_reader=slow, stalled_reader=stalled, sse_streams=sse)


# ---------------------------------------------------------------------------------- scaling


def routes_config(n: int) -> str:
    """n routes; the last is POST /v1/chat/completions; the others never match a benchmark request."""
    lines = ["routes:"]
    for i in range(n - 1):
        path = (f"/v1/bench{i}/*", f"/v1/bench{i}/{{id}}", f"/v1/bench{i}/items")[i % 3]
        lines.append(f"  - {{name: r{i}, methods: [POST], path: '{path}'}}")
    lines.append("  - {name: chat_completions, methods: [POST], path: /v1/chat/completions}")
    return "\n".join(lines) + "\n"


async def _sse_flood(url: str, n: int, events: int) -> dict:
    res = await _sse_streams(url, n, events, 0)
    return {"events": sum(x["events"] for x in res),
            "ok": all(x["status"] == 200 and x["done"] and x["events"] == events for x in res)}


def part_scaling(ctx: Ctx) -> None:
    start_upstreams(ctx, {"nginx", "sse"})
    R, D = ctx.rounds(3), ctx.dur(2)  # warm-up in round 1 only: the proxies stay warm between rounds
    ctx.ref("sc_ref", 28120, NGINX)
    ctx.ours("sc_ours", 28121, NGINX)
    for t in ("sc_ref", "sc_ours"):
        sanity(ctx, t)
        sanity(ctx, t, "/v1/files/size-1k/content", b"", method="GET")
    # concurrency
    for r in range(1, R + 1):
        for c in (1, 10, 64, 256):
            for t in rotate(["sc_ref", "sc_ours"], r):
                ctx.measure("conc", r, t, c, D, warm=int(r == 1), x=c)
    # response size (GET of a static file)
    for r in range(1, R + 1):
        for name in SIZES:
            for t in rotate(["sc_ref", "sc_ours"], r):
                ctx.measure("size", r, t, 10, D, path=f"/v1/files/size-{name}/content", script="get.lua",
                            env={"WRK_PATH": f"/v1/files/size-{name}/content"}, x=SIZES[name], warm=int(r == 1))
    ctx.procs.stop("sc_ref")
    ctx.procs.stop("sc_ours")
    # routes
    startup = {}
    idle = {}
    for i, n in enumerate((1, 100, 1000)):
        t0 = time.monotonic()
        ctx.ours(f"rt{n}", 28131 + i, NGINX, config_extra=routes_config(n))
        startup[n] = time.monotonic() - t0
        time.sleep(1.0)
        idle[n] = rss_snapshot(ctx, f"rt{n}")
        sanity(ctx, f"rt{n}")
    paths = {"last": "/v1/chat/completions", "default": "/v1/other/endpoint"}
    for r in range(1, R + 1):
        for n in (1, 100, 1000):
            for kind in ("last", "default", "unique", "scraped"):
                if kind == "scraped":  # the last route again, while /metrics is scraped every second
                    with Scraper(29131 + (1, 100, 1000).index(n)) as sc:
                        ctx.measure("routes", r, f"rt{n}", 10, D, path=paths["last"], env={"WRK_PATH": paths["last"]},
                                    x=n, kind=kind, warm=0)
                    ctx.records[-1]["scrapes"] = sc.times
                elif kind == "unique":
                    ctx.measure("routes", r, f"rt{n}", 10, D, script="uniq.lua",
                                env={"WRK_PREFIX": f"/v1/uniq/r{r}n{n}"}, x=n, kind=kind, warm=0)
                else:
                    ctx.measure("routes", r, f"rt{n}", 10, D, path=paths[kind],
                                env={"WRK_PATH": paths[kind]}, x=n, kind=kind, warm=int(r == 1))
    scrape = {}
    for i, n in enumerate((1, 100, 1000)):
        t0 = time.monotonic()
        text = metrics_text(29131 + i)
        scrape[n] = {"seconds": time.monotonic() - t0, "bytes": len(text), "lines": text.count("\n")}
        ctx.procs.stop(f"rt{n}")
    # SSE events relayed per CPU-second: S streams, each E events written as fast as the upstream can
    ctx.ref("sse_ref", 28140, SSE_UP)
    ctx.ours("sse_ours", 28141, SSE_UP)
    S, E = (2, 2000) if ctx.quick else (4, 100000)
    flood = []
    for r in range(1, R + 1):
        for t in rotate(["direct_sse", "sse_ref", "sse_ours"], r):
            url = f"{SSE_UP}/v1/chat/completions" if t == "direct_sse" else ctx.url(t)
            groups = {"sse": ctx.procs.pgid("sse")}
            if t != "direct_sse":
                groups[t] = ctx.procs.pgid(t)
            win = H.CpuWindow(groups)
            win.start()
            res = asyncio.run(_sse_flood(url, S, E))
            c = win.stop()
            rec = {"round": r, "target": t, "streams": S, "events_per_stream": E, **res, "wall_s": c["wall_s"],
                   "proxy_cpu_s": c["groups"].get(t, {}).get("cpu_s"), "upstream_cpu_s": c["groups"]["sse"]["cpu_s"],
                   "other_cores": c["other_cores"]}
            rec["events_per_s"] = res["events"] / c["wall_s"]
            if rec["proxy_cpu_s"]:
                rec["events_per_cpu_s"] = res["events"] / rec["proxy_cpu_s"]
                rec["cpu_us_per_event"] = rec["proxy_cpu_s"] * 1e6 / res["events"]
            flood.append(rec)
            log(f"sse flood r{r} {t:10s}: {rec['events_per_s']:8.0f} events/s  ok={res['ok']}  proxy cpu "
                f"{rec['proxy_cpu_s'] or 0:.2f}s ({rec.get('cpu_us_per_event', 0):.2f} us/event)  upstream cpu "
                f"{rec['upstream_cpu_s']:.2f}s")
    ctx.procs.stop("sse_ref")
    ctx.procs.stop("sse_ours")
    ctx.save("scaling", routes_startup_s=startup, routes_idle_rss=idle, routes_metrics_scrape=scrape,
             sse_flood=flood)


# ---------------------------------------------------------------------------------- breaker


def part_breaker(ctx: Ctx) -> None:
    start_upstreams(ctx, {"nginx"})
    R, D = ctx.rounds(3), ctx.dur(3)
    if H.port_open(CLOSED_PORT):
        raise RuntimeError(f"port {CLOSED_PORT} must be closed (the dead upstream)")
    br = "defaults:\n  breaker:\n    failure_threshold: 1\n    reset_timeout: 1h\n"
    ctx.ours("br_normal", 28150, NGINX, config_extra=br)
    ctx.ours("br_open", 28151, f"http://127.0.0.1:{CLOSED_PORT}", config_extra=br)
    sanity(ctx, "br_normal")
    first = http("POST", ctx.url("br_open"), CHAT_BODY)  # trips the breaker: connect refused
    second = http("POST", ctx.url("br_open"), CHAT_BODY)
    check = {"first": [first[0], first[1].get("x-proxy-error"), first[1].get("x-proxy-attempts")],
             "second": [second[0], second[1].get("x-proxy-error"), second[1].get("retry-after")]}
    log(f"breaker trip: {check}")
    if second[0] != 503 or second[1].get("x-proxy-error") != "circuit_open":
        raise RuntimeError(f"the breaker did not open: {check}")
    for r in range(1, R + 1):
        for t in rotate(["br_normal", "br_open"], r):
            ctx.measure("breaker10", r, t, 10, D)
    for r in range(1, R + 1):
        for t in rotate(["br_normal", "br_open"], r):
            ctx.measure("breaker1", r, t, 1, 1 if ctx.quick else 2, warm=0)
    text = metrics_text(29151)
    opened = {"circuit_open_errors": metric_sum(text, "openai_proxy_errors_total", category="circuit_open"),
              "requests_5xx": metric_sum(text, "openai_proxy_requests_total", status_class="5xx"),
              "attempts": metric_sum(text, "openai_proxy_attempts_total")}
    for t in ("br_normal", "br_open"):
        ctx.procs.stop(t)
    ctx.save("breaker", trip=check, open_metrics=opened)


PARTS = {"core": part_core, "workers": part_workers, "memory": part_memory, "scaling": part_scaling,
         "breaker": part_breaker}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="+", choices=[*PARTS, "all"])
    ap.add_argument("--out", default=None, help="results directory (default: a new /tmp/orp_suite/run-*)")
    ap.add_argument("--rev", default=os.environ.get("REV") or None, help="run our proxy from this commit")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") == "1")
    a = ap.parse_args()
    parts = ORDER if "all" in a.parts else [p for p in ORDER if p in a.parts]
    SUITE_DIR.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else Path(f"/tmp/orp_suite/run-{time.strftime('%Y%m%d-%H%M%S')}")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for tool in ("nginx", "wrk", "taskset"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            sys.exit(f"missing: {tool} (apt-get install -y nginx wrk)")
    py = os.environ.get("PY") or sys.executable
    ctx = Ctx(out, py, a.rev, a.quick)
    log(f"results in {out}; proxy code: {ctx.code}; imported from {ctx.imported_from}")
    failed = []
    try:
        for p in parts:
            t0 = time.monotonic()
            log(f"=== part {p}")
            try:
                PARTS[p](ctx)
            except Exception as exc:  # noqa: BLE001 - go on with the other parts, report at the end
                import traceback
                traceback.print_exc()
                failed.append(p)
                for name in [n for n in ctx.procs.procs if n not in ("nginx", "sse", "slow_sse")]:
                    ctx.procs.stop(name)
                (out / f"{p}.failed").write_text(repr(exc))
            log(f"=== part {p} took {time.monotonic() - t0:.0f} s")
    finally:
        ctx.procs.stop_all()
    print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
