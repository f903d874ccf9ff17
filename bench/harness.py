"""Plumbing for bench/suite.py: processes in their own process groups, wrk, /proc CPU and RSS.

Every process started here leads its own process group (setsid) and is stopped by group, SIGTERM
then SIGKILL, on normal exit, on an exception and on SIGTERM/SIGINT/SIGHUP. Every wait is bounded.
CPU time is utime+stime from /proc/<pid>/stat summed over a process group (a proxy with --workers
is measured whole); RSS is summed or listed per process. Linux only.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
KEY = "Bearer sk-bench-0000000000000000000000000000"
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32}'


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- /proc


def proc_table() -> dict[int, list[tuple[int, int, int]]]:
    """pgid -> [(pid, utime+stime ticks, rss pages)] for every process, in one scan of /proc."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # from field 3 (state) on
        out.setdefault(int(fields[2]), []).append((int(d), int(fields[11]) + int(fields[12]), int(fields[21])))
    return out


def group_cpu_s(table: dict, pgid: int) -> dict[int, float]:
    return {pid: ticks / TICK for pid, ticks, _ in table.get(pgid, [])}


def rss_mb(pgid: int) -> dict[int, float]:
    """pid -> RSS MiB (field 24 of /proc/<pid>/stat, = VmRSS: resident anon + file + shmem) for a group."""
    out = {}
    for pid, _, pages in proc_table().get(pgid, []):
        out[pid] = pages * PAGE / 2**20
    return out


def proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
        return " ".join(p.decode(errors="replace") for p in parts if p)[:120]
    except OSError:
        return "?"


def sys_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat (busy: user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class CpuWindow:
    """CPU used by process groups (and by reaped children: wrk) between start() and stop()."""

    def __init__(self, pgids: dict[str, int]):
        self.pgids = pgids

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.sys0 = sys_busy_ticks()
        self.ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.tab0 = proc_table()

    def stop(self) -> dict:
        tab1 = proc_table()
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        sys1 = sys_busy_ticks()
        wall = time.monotonic() - self.t0
        res: dict = {"wall_s": wall, "groups": {}}
        mine = 0.0
        for name, pgid in self.pgids.items():
            a, b = group_cpu_s(self.tab0, pgid), group_cpu_s(tab1, pgid)
            cpu = sum(b[pid] - a.get(pid, 0.0) for pid in b)  # a process that exited in between is lost
            per_pid = {pid: b[pid] - a.get(pid, 0.0) for pid in b}
            res["groups"][name] = {"cpu_s": cpu, "per_pid": per_pid, "procs": len(b)}
            mine += cpu
        children = (ch1.ru_utime + ch1.ru_stime) - (self.ch0.ru_utime + self.ch0.ru_stime)
        mine += children + (self1.ru_utime + self1.ru_stime) - (self.self0.ru_utime + self.self0.ru_stime)
        busy = (sys1[0] - self.sys0[0]) / TICK
        res["children_cpu_s"] = children
        res["sys_busy_cores"] = busy / wall if wall else None
        res["other_cores"] = max(0.0, busy - mine) / wall if wall else None  # CPU used by processes not ours
        return res


# ----------------------------------------------------------------------------- processes


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Procs:
    """Named processes, each the leader of its own process group."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.logs: dict[str, Path] = {}
        atexit.register(self.stop_all)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        log(f"signal {signum}: stopping every process started")
        self.stop_all()
        os._exit(1)

    def start(self, name: str, cmd: list[str], port: int | None, env: dict | None = None,
              timeout: float = 20.0, cwd: Path | None = None) -> subprocess.Popen:
        if name in self.procs:
            raise RuntimeError(f"{name} already started")
        if port is not None and port_open(port):
            raise RuntimeError(f"port {port} already in use: is another benchmark running?")
        out_path = self.logdir / f"{name}.log"
        err_path = self.logdir / f"{name}.err"
        # O_APPEND: the file can be truncated under the running process (trim_logs)
        out = open(out_path, "ab")
        err = open(err_path, "ab")
        full_env = {**os.environ, **(env or {})}
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env,
                             start_new_session=True, cwd=str(cwd or BENCH))
        out.close()
        err.close()
        self.procs[name] = p
        self.logs[name] = out_path
        if port is not None:
            self.ports[name] = port
            deadline = time.monotonic() + timeout
            while not port_open(port):
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.tail(name)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not open port {port} within {timeout}s: {self.tail(name)}")
                time.sleep(0.05)
        log(f"{name} up (pgid {p.pid}{f', port {port}' if port else ''})")
        return p

    def tail(self, name: str, n: int = 15) -> str:
        lines = []
        for suffix in (".err", ".log"):
            path = self.logdir / f"{name}{suffix}"
            if path.exists():
                lines += path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def pgid(self, name: str) -> int:
        return self.procs[name].pid

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop(self, name: str, grace: float = 10.0) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if p.poll() is not None and not _group_alive(p.pid):
                break
            time.sleep(0.05)
        else:
            log(f"{name}: still running after SIGTERM + {grace}s: SIGKILL")
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            log(f"{name}: pid {p.pid} did not exit after SIGKILL")

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)

    def trim_logs(self, limit: int = 64 * 2**20) -> None:
        """Our proxies log one ~400-byte line per request: keep the files small."""
        for path in self.logs.values():
            try:
                if path.stat().st_size > limit:
                    os.truncate(path, 0)
            except OSError:
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ----------------------------------------------------------------------------- wrk

WRK_FIELDS = ("requests", "rps", "p50_us", "p90_us", "p99_us", "err_connect", "err_read", "err_write",
              "err_status", "err_timeout")


def wrk(url: str, conc: int, dur: float, *, script: str = "post.lua", threads: int = 1, cpu: str | None = "1",
        env: dict | None = None) -> dict:
    """One wrk run; the parsed WRKJSON line (see post.lua), or a dict with an "error"."""
    cmd = (["taskset", "-c", cpu] if cpu else []) + [
        "wrk", f"-t{threads}", f"-c{conc}", f"-d{dur:g}s", "--timeout", "5s", "-s", script, url]
    try:
        run = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=dur + 20,
                             env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": "wrk timed out"}
    for line in run.stdout.splitlines():
        if line.startswith("WRKJSON "):
            w = json.loads(line[8:])
            w["errors"] = sum(w[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
            return w
    return {"error": f"no WRKJSON (rc {run.returncode}): {run.stderr[-300:]}"}


# ----------------------------------------------------------------------------- statistics


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mmm(xs, fmt=".1f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}-{format(max(xs), fmt)}]"


# ----------------------------------------------------------------------------- environment


def versions(py: str) -> dict:
    code = ("import sys, json, importlib.metadata as m\n"
            "names = ['aiohttp', 'uvloop', 'multidict', 'yarl', 'prometheus-client', 'structlog', 'orjson', 'pybreaker']\n"
            "d = {'python': sys.version.split()[0]}\n"
            "for n in names:\n"
            "    try: d[n] = m.version(n)\n"
            "    except Exception: d[n] = None\n"
            "print(json.dumps(d))")
    v = json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=30).stdout)
    v["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    v["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    return v


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) // 1024
    return {"cpus": os.cpu_count(), "model": model, "kernel": os.uname().release, "mem_mb": mem,
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30).stdout.strip()
