"""Launch the proxy exactly as `python -m proxy ARGS...` does, with benchmark-only knobs.

  BENCH_SMALL_BODY=N   set proxy.attempt.SMALL_BODY = N bytes before starting (0: stream every
                       response body chunk by chunk; unset: the shipped default, 64 KiB). Any
                       module that copied the name is patched too; the patched modules are
                       printed on stderr.
  BENCH_CPROFILE=PATH  run under cProfile and write the stats to PATH when the proxy stops
                       (SIGTERM/SIGINT make it drain and return normally)
  BENCH_OBSERVERS=X    which production observers the traffic listener gets: all (unset: the
                       shipped wiring, metrics + request log lines), metrics, logs or none.
                       proxy.server imported `standard_observers` by name (`from .app import ...`),
                       so the replacement is set in proxy.server (the caller) and proxy.app; with
                       --workers N the spawned workers import fresh and are NOT patched (one
                       process only). Startup/shutdown log lines are not observers: they stay.

Benchmark use only (bench/compare.sh, docs/benchmarks.md); not part of the package or the tests.
"""
import os
import sys

import proxy.app
import proxy.attempt
import proxy.server
from proxy.__main__ import main  # imports every module of the hot path

_SHIPPED_OBSERVERS = proxy.app.standard_observers


def _observers(which: str):
    """A drop-in for proxy.app.standard_observers keeping only the observers named by `which`."""
    from proxy.logs import LogObserver
    from proxy.metrics import MetricsObserver

    keep = {"none": (), "metrics": (MetricsObserver,), "logs": (LogObserver,),
            "all": (MetricsObserver, LogObserver)}[which]

    def standard_observers(config, registry, **options):
        return [o for o in _SHIPPED_OBSERVERS(config, registry, **options) if isinstance(o, keep)]

    return standard_observers


if __name__ == "__main__":
    small = os.environ.get("BENCH_SMALL_BODY")
    if small not in (None, ""):
        patched = []
        for name, mod in sorted(sys.modules.items()):
            if (name == "proxy" or name.startswith("proxy.")) and hasattr(mod, "SMALL_BODY"):
                mod.SMALL_BODY = int(small)
                patched.append(name)
        print(f"run_proxy: SMALL_BODY={small} set in {','.join(patched)}", file=sys.stderr, flush=True)
    else:
        print(f"run_proxy: SMALL_BODY={proxy.attempt.SMALL_BODY} (default)", file=sys.stderr, flush=True)
    which = os.environ.get("BENCH_OBSERVERS") or "all"
    if which != "all":
        if which not in ("none", "metrics", "logs"):
            sys.exit(f"run_proxy: BENCH_OBSERVERS must be all, metrics, logs or none, not {which!r}")
        proxy.app.standard_observers = proxy.server.standard_observers = _observers(which)
    print(f"run_proxy: observers={which}", file=sys.stderr, flush=True)
    out = os.environ.get("BENCH_CPROFILE")
    if out:
        import cProfile

        prof = cProfile.Profile()
        try:
            rc = prof.runcall(main, sys.argv[1:])
        finally:
            prof.dump_stats(out)
        sys.exit(rc)
    sys.exit(main(sys.argv[1:]))
