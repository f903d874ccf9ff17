"""CPU time and peak RSS of process groups while a load generator runs (Linux /proc only).

usage: procmon.py MAX_S NAME=PGID [NAME=PGID ...]
Takes a first snapshot at start, prints "PROCMON_READY" on stderr, then samples RSS every 50 ms
until SIGTERM/SIGINT (or MAX_S seconds, a hard bound), takes the last snapshot and prints one
line on stdout:
  PROCMON {"NAME": {"cpu_s": utime+stime delta, "wall_s": ..., "rss_max_mb": ..., "procs": n}, ...}
CPU is utime+stime from /proc/<pid>/stat (all threads) summed over every process whose process
group is PGID, so a proxy that forks workers is measured whole. Run it right before the load and
stop it right after: cpu_s / requests is then the CPU cost per request.
"""
import json
import signal
import sys
import time

from harness import PAGE, TICK, proc_table  # bench/ is the script's directory: on sys.path


def group(pgid: int) -> dict[int, tuple[int, int]]:
    """pid -> (utime+stime ticks, rss pages) for every live process in process group pgid."""
    return {pid: (ticks, rss) for pid, ticks, rss in proc_table().get(pgid, [])}


def main() -> int:
    max_s = float(sys.argv[1])
    targets = [(n, int(p)) for n, p in (a.split("=", 1) for a in sys.argv[2:])]
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    first = {n: group(p) for n, p in targets}
    rss = {n: sum(v[1] for v in first[n].values()) for n, _ in targets}
    print("PROCMON_READY", file=sys.stderr, flush=True)
    while not stop and time.monotonic() - t0 < max_s:
        time.sleep(0.05)
        for n, p in targets:
            rss[n] = max(rss[n], sum(v[1] for v in group(p).values()))
    wall = time.monotonic() - t0
    res = {}
    for n, p in targets:
        last = group(p)
        # a process that exited in between is not counted (its CPU moved to nobody we can read)
        cpu = sum(last[pid][0] - first[n].get(pid, (0, 0))[0] for pid in last)
        res[n] = {"cpu_s": cpu / TICK, "wall_s": round(wall, 3), "rss_max_mb": round(rss[n] * PAGE / 2**20, 1),
                  "procs": len(last)}
    print("PROCMON " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
