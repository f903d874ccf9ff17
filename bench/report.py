"""Tables, plots and the summary of a bench/suite.py run.

usage: python bench/report.py RESULTS_DIR [--plots DIR]
Reads RESULTS_DIR/<part>.json (whichever parts exist), writes RESULTS_DIR/tables.md (markdown tables:
median [min-max] over rounds; ratios and differences paired per round), RESULTS_DIR/summary.txt,
PNG plots into --plots (default RESULTS_DIR), and prints one line per goal on stdout:
  GOAL <n> <met|MISSED|info> <what>: <number>
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import med, mmm  # noqa: E402

GOALS: list[str] = []
TABLES: list[str] = []


def goal(n: str, status: str, text: str) -> None:
    GOALS.append(f"GOAL {n:3s} {status:6s} {text}")


def table(title: str, header: list[str], rows: list[list], note: str = "") -> None:
    out = [f"#### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    if note:
        out += ["", note]
    TABLES.append("\n".join(out) + "\n")


def by(records, **match):
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def vals(records, key):
    out = []
    for r in records:
        if key in ("rps", "p50", "p99", "max", "requests", "errors"):
            w = r.get("wrk") or {}
            if "error" in w:
                continue
            v = {"rps": w.get("rps"), "p50": w.get("p50_us", 0) / 1e3, "p99": w.get("p99_us", 0) / 1e3,
                 "max": w.get("max_us", 0) / 1e3, "requests": w.get("requests"), "errors": w.get("errors")}[key]
        else:
            v = r.get(key)
        if v is not None:
            out.append(v)
    return out


QUIET = 0.2  # a round counts as quiet when other processes used less than this many cores in both runs


def paired(records, pass_, a, b, key, op, quiet=False, **match):
    ra = {r["round"]: r for r in by(records, **{"pass": pass_, "target": a}, **match)}
    rb = {r["round"]: r for r in by(records, **{"pass": pass_, "target": b}, **match)}
    out = []
    for k in sorted(ra):
        if quiet and k in rb and max(ra[k].get("other_cores") or 0, rb[k].get("other_cores") or 0) >= QUIET:
            continue
        if k in rb:
            x, y = vals([ra[k]], key), vals([rb[k]], key)
            if x and y and y[0] is not None:
                out.append(op(x[0], y[0]))
    return out


RATIO = lambda x, y: x / y if y else None  # noqa: E731
DIFF = lambda x, y: x - y  # noqa: E731


def load(d: Path, part: str):
    p = d / f"{part}.json"
    return json.loads(p.read_text()) if p.exists() else None


def other(records) -> str:
    xs = [r.get("other_cores") for r in records if r.get("other_cores") is not None]
    return f"{statistics.median(xs):.2f} (max {max(xs):.2f})" if xs else "n/a"


def errors_note(records) -> str:
    bad = [f"{r['pass']} r{r['round']} {r['target']}: {r['wrk'].get('errors', r['wrk'].get('error'))}"
           for r in records if (r.get("wrk") or {}).get("errors") or "error" in (r.get("wrk") or {})]
    return "errors: " + "; ".join(bad) if bad else "no wrk errors"


# ------------------------------------------------------------------------------------------ core


def report_core(d) -> None:
    rec = d["records"]
    rows = []
    for t in ("ref", "ours", "obs_none", "obs_metrics", "obs_logs"):
        rs = by(rec, **{"pass": "tput10", "target": t})
        rows.append([t, mmm(vals(rs, "rps"), ".0f"), mmm(vals(rs, "cpu_us"), ".1f"),
                     mmm(vals(rs, "p50"), ".3f"), mmm(vals(rs, "p99"), ".3f"), mmm(vals(rs, "cores"), ".2f")])
    for t in ("ref", "ours"):
        rs = by(rec, **{"pass": "tput64", "target": t})
        rows.append([f"{t}, c=64", mmm(vals(rs, "rps"), ".0f"), mmm(vals(rs, "cpu_us"), ".1f"),
                     mmm(vals(rs, "p50"), ".3f"), mmm(vals(rs, "p99"), ".3f"), mmm(vals(rs, "cores"), ".2f")])
    table("Throughput: small JSON POST through each target (c=10 unless said)",
          ["target", "req/s", "CPU µs/req", "p50 ms", "p99 ms", "cores used"], rows,
          f"Other processes on the machine used {other(by(rec, **{'pass': 'tput10'}) + by(rec, **{'pass': 'tput64'}))}"
          f" cores during these runs (median, max). {errors_note(rec)}.")
    rr = []
    for c, p in ((10, "tput10"), (64, "tput64")):
        r_rps = paired(rec, p, "ours", "ref", "rps", RATIO)
        r_cpu = paired(rec, p, "ours", "ref", "cpu_us", RATIO)
        q_rps = paired(rec, p, "ours", "ref", "rps", RATIO, quiet=True)
        rr.append([f"c={c}", mmm(r_rps, ".3f"), mmm(r_cpu, ".3f"), f"{mmm(q_rps, '.3f')} (n={len(q_rps)})"])
        m = med(r_rps)
        if m is not None:
            goal("1", "met" if m >= 1.3 else "MISSED",
                 f"ours/ref req/s at c={c} (goal >= 1.3): {mmm(r_rps, '.3f')}; CPU µs/req ours "
                 f"{med(vals(by(rec, **{'pass': p, 'target': 'ours'}), 'cpu_us')):.1f} vs ref "
                 f"{med(vals(by(rec, **{'pass': p, 'target': 'ref'}), 'cpu_us')):.1f}"
                 + ("" if m >= 1.3 else f" ({(1.3 - m) / 1.3 * 100:.0f} % short)"))
    table("Ours / reference, paired per round", ["concurrency", "ours/ref req/s", "ours/ref CPU µs/req",
          f"ours/ref req/s, quiet rounds only (other processes < {QUIET} cores)"], rr)
    lat = []
    added = {}
    for t in ("ref", "ours"):
        a50 = paired(rec, "lat1", t, "direct", "p50", DIFF)
        a99 = paired(rec, "lat1", t, "direct", "p99", DIFF)
        added[t] = med(a50)
        lat.append([t, mmm(a50, ".3f"), mmm(a99, ".3f")])
    direct = by(rec, **{"pass": "lat1", "target": "direct"})
    table("Added latency at c=1 (target minus direct nginx, paired per round)",
          ["target", "added p50 ms", "added p99 ms"], lat,
          f"Direct p50: {mmm(vals(direct, 'p50'), '.3f')} ms.")
    tt = {x["target"]: x for x in d.get("ttfb") or []}
    if tt:
        table("Time to the first SSE chunk, added over direct (bench/ttfb.py, paired per round)",
              ["target", "n", "added p50 ms", "added p90 ms", "added p99 ms", "events per stream"],
              [[t, x["n"], x["added_first_p50_ms"], x["added_first_p90_ms"], x["added_first_p99_ms"],
                f"{x['events_min']}-{x['events_max']}"] for t, x in tt.items() if t != "direct"])
    if added.get("ours") is not None and added.get("ref") is not None:
        ok = added["ours"] <= added["ref"]
        f = tt.get("ours", {}).get("added_first_p50_ms")
        fr = tt.get("ref", {}).get("added_first_p50_ms")
        goal("2", "met" if ok and (f is None or fr is None or f <= fr + 0.05) else "MISSED",
             f"added p50 at c=1 ours {added['ours']:.3f} ms vs ref {added['ref']:.3f} ms; first SSE chunk added p50 "
             f"ours {f} ms vs ref {fr} ms (goal: no more than the reference)")
    # observers
    ob = []
    none_cpu = med(vals(by(rec, **{"pass": "tput10", "target": "obs_none"}), "cpu_us"))
    for t, label in (("obs_none", "none"), ("obs_metrics", "metrics only"), ("obs_logs", "request log lines only"),
                     ("ours", "metrics + log lines (shipped)")):
        rs = by(rec, **{"pass": "tput10", "target": t})
        dif = paired(rec, "tput10", t, "obs_none", "cpu_us", DIFF)
        ob.append([label, mmm(vals(rs, "rps"), ".0f"), mmm(vals(rs, "cpu_us"), ".1f"),
                   "-" if t == "obs_none" else mmm(dif, ".1f")])
    table("Cost of the observers (c=10, same run)", ["observers", "req/s", "CPU µs/req", "CPU µs/req over none"], ob,
          "`none`, `metrics`, `logs`: bench/run_proxy.py with BENCH_OBSERVERS; the shipped wiring is `python -m proxy`.")
    dm = med(paired(rec, "tput10", "ours", "obs_none", "cpu_us", DIFF))
    if dm is not None and none_cpu:
        goal("6", "info", f"logging + metrics cost {dm:.1f} µs CPU/request at c=10 ({dm / none_cpu * 100:.0f} % over "
             f"{none_cpu:.1f} µs without them); metrics {med(paired(rec, 'tput10', 'obs_metrics', 'obs_none', 'cpu_us', DIFF)):.1f}, "
             f"log lines {med(paired(rec, 'tput10', 'obs_logs', 'obs_none', 'cpu_us', DIFF)):.1f}")


# ------------------------------------------------------------------------------------------ workers


def report_workers(d) -> None:
    rec = d["records"]
    rows = []
    for t, label in (("w1", "1 process"), ("w2", "--workers 2")):
        rs = by(rec, target=t)
        rows.append([label, mmm(vals(rs, "rps"), ".0f"), mmm(vals(rs, "cpu_us"), ".1f"), mmm(vals(rs, "p50"), ".3f"),
                     mmm(vals(rs, "p99"), ".3f"), mmm(vals(rs, "cores"), ".2f"),
                     mmm([r["sys_busy_cores"] for r in rs], ".2f")])
    ratio = paired(rec, "tput64_t2", "w2", "w1", "rps", RATIO)
    qratio = paired(rec, "tput64_t2", "w2", "w1", "rps", RATIO, quiet=True)
    split = []
    for r in by(rec, target="w2"):
        per = sorted((v for v in (r.get("per_pid_cpu_s") or {}).values() if v > 0.05), reverse=True)
        split.append("/".join(f"{v / r['wall_s']:.2f}" for v in per))
    table("--workers 2 vs one process, c=64, wrk -t2 not pinned",
          ["", "req/s", "CPU µs/req", "p50 ms", "p99 ms", "proxy cores", "machine busy cores"], rows,
          f"w2/w1 req/s paired per round: {mmm(ratio, '.3f')}; quiet rounds only (other processes < {QUIET} cores): "
          f"{mmm(qratio, '.3f')} (n={len(qratio)}). Cores per busy process of the 2-worker group, per round: "
          f"{', '.join(split)}. {errors_note(rec)}.")
    m = med(ratio)
    if m is not None:
        goal("3", "met" if m >= 1.6 else "MISSED", f"--workers 2 / 1 process req/s at c=64 (goal >= 1.6): {mmm(ratio, '.3f')}"
             + ("" if m >= 1.6 else f" ({(1.6 - m) / 1.6 * 100:.0f} % short)")
             + f"; quiet rounds {mmm(qratio, '.3f')} (n={len(qratio)})")
    rc = []
    ok_all = True
    for t, x in d["reconcile"].items():
        diff = x["requests_total"] - x["wrk_completed"]
        bound = x["wrk_runs"] * x["conc"]
        ok = 0 <= diff <= bound and x["in_flight"] == 0
        ok_all &= ok
        rc.append([t, int(x["wrk_completed"]), int(x["requests_total"]), int(x["requests_2xx"]),
                   int(x["requests_aborted"]), int(diff), f"0..{bound}", int(x["in_flight"]), "yes" if ok else "NO"])
    table("/metrics after the runs vs requests wrk completed (warm-ups, measured runs and one sanity request)",
          ["target", "wrk completed", "requests_total", "2xx", "aborted", "difference", "allowed (in flight at stops)",
           "in_flight gauge", "consistent"], rc,
          "The difference is requests the proxy finished (or saw aborted) while wrk was stopping: at most "
          "`runs x connections`.")
    w2 = d["reconcile"].get("w2")
    if w2:
        goal("3b", "met" if ok_all else "MISSED",
             f"2-worker /metrics requests_total {int(w2['requests_total'])} vs wrk completed {int(w2['wrk_completed'])} "
             f"(+{int(w2['requests_total'] - w2['wrk_completed'])}, bound {w2['wrk_runs'] * w2['conc']})")


# ------------------------------------------------------------------------------------------ memory


def report_memory(d, plots: Path) -> None:
    rows = []
    worst = 0.0
    for t, snap in d["idle_rss"].items():
        after = d["rss_after_load"].get(t, {}).get("per_process", {})
        for (name, v), v2 in zip(snap["per_process"].items(), after.values()):
            kind = ("supervisor" if "-m proxy" in name and t == "mem_w2" else "worker" if "spawn_main" in name
                    else "resource tracker" if "resource_tracker" in name else "proxy")
            rows.append([t, kind, f"{v:.1f}", f"{v2:.1f}"])
            if t != "mem_ref" and kind != "resource tracker":
                worst = max(worst, v, v2)
    table("RSS per process, MiB: idle after start, and idle again 2 s after 3 s of c=64 load", ["target", "process",
          "idle", "after load"], rows, "mem_ours: `python -m proxy`; mem_ref: "
          "bench/ref_proxy.py; mem_w2: `--workers 2` (a supervisor, two workers and multiprocessing's resource tracker).")
    goal("4a", "met" if worst <= 60 else "MISSED", f"idle RSS per process (goal <= 60 MB): largest {worst:.1f} MiB")
    dl = d["download"]
    rows = [[x["target"], "yes" if x["ok"] else "NO",
             " / ".join(f"{r['mb_per_s']:.0f}" for r in x["runs"]) if "runs" in x else f"{x['mb_per_s']:.0f}",
             f"{x['rss_before_mb']:.1f}", f"{x['rss_peak_mb']:.1f}", f"{x['growth_mb']:.1f}",
             " / ".join(f"{r['proxy_cpu_s']:.2f}" for r in x["runs"]) if "runs" in x else f"{x['proxy_cpu_s']:.2f}"]
            for x in dl]
    direct = d.get("download_direct") or []
    table(f"Relaying a {dl[0]['size'] // 2**20} MiB download, twice per target (streamed and sha256-checked by the client)",
          ["target", "bytes and hash ok", "MiB/s (1st / 2nd)", "RSS before", "RSS peak", "growth MiB",
           "proxy CPU s (1st / 2nd)"], rows,
          "Direct from nginx: " + ", ".join(f"{x['mb_per_s']:.0f} MiB/s" for x in direct) + " (the first read also "
          "loads the sparse file into the page cache).")
    ours = next(x for x in dl if x["target"] == "mem_ours")
    goal("4b", "met" if ours["growth_mb"] < 16 and ours["ok"] else "MISSED",
         f"RSS growth relaying {ours['size'] // 2**20} MiB (goal < 16 MB): {ours['growth_mb']:.1f} MiB")
    ss = d["sse_streams"]
    x0 = ss[0]
    table(f"{x0['streams']} concurrent SSE streams, one event every {x0['gap_ms']} ms, {x0['events_per_stream']} events each",
          ["", *[x["target"] for x in ss]],
          [["streams complete (status 200, every event, [DONE])", *[f"{x['ok_streams']}/{x['streams']}" for x in ss]],
           ["events per stream, min-max", *[f"{x['events_min']}-{x['events_max']}" for x in ss]],
           ["events lost", *[x["events_lost"] for x in ss]],
           ["RSS before / at 5 s / at the end / peak / after, MiB",
            *[f"{x['rss_before_mb']:.1f} / {x['rss_at_5s_mb']:.1f} / {x['rss_at_end_mb']:.1f} / {x['rss_peak_mb']:.1f}"
              f" / {x['rss_after_mb']:.1f}" for x in ss]],
           ["RSS growth from 5 s to the end, MiB", *[f"{x['growth_5s_to_end_mb']:+.1f}" for x in ss]],
           ["proxy CPU per relayed event (each event arrives alone)", *[f"{x['cpu_us_per_event']:.1f} µs" for x in ss]],
           ["= events per proxy CPU-second", *[f"{1e6 / x['cpu_us_per_event']:.0f}" for x in ss]]],
          "mem_sse_ours: `python -m proxy`; mem_sse_ref: bench/ref_proxy.py; upstream bench/sse_upstream.py.")
    SSE_PLOT["paced"] = {x["target"]: 1e6 / x["cpu_us_per_event"] for x in ss}
    for x in ss[:1]:
        flat = abs(x["growth_5s_to_end_mb"]) < 2 and x["events_lost"] == 0 and x["ok_streams"] == x["streams"]
        goal("4c", "met" if flat else "MISSED",
             f"{x['streams']} slow SSE streams: {x['ok_streams']}/{x['streams']} complete, {x['events_lost']} events lost, "
             f"RSS {x['rss_at_5s_mb']:.1f} -> {x['rss_at_end_mb']:.1f} MiB from 5 s to the end (peak {x['rss_peak_mb']:.1f})")
    rows = []
    for x in d["slow_reader"]:
        q = x["queues_at_end_of_stall"]
        rows.append([x["target"], f"{x['client_read'] / 2**20:.2f}", f"{x['rss_before_mb']:.1f}",
                     f"{x['rss_peak_mb']:.1f}", f"{x['growth_mb']:.1f}", f"{x['rss_after_close_mb']:.1f}",
                     f"{q['proxy_tx_to_client'] / 2**20:.1f}", f"{q['proxy_rx_from_upstream'] / 2**20:.1f}",
                     f"{q['upstream_tx'] / 2**20:.1f}"])
    s0 = d["slow_reader"][0]
    table(f"Slow reader: {s0['size'] // 2**20} MiB download read at 64 KiB/s for {s0['read_s']} s, then not read for "
          f"{s0['stall_s']} s, then closed",
          ["target", "client read MiB", "RSS before", "RSS peak", "growth MiB", "RSS after close",
           "kernel: proxy->client send queue MiB", "kernel: proxy's unread upstream bytes MiB", "kernel: nginx send queue MiB"],
          rows, "Kernel queues from /proc/net/tcp at the end of the stall: bytes held in socket buffers (charged to "
          "the pod's memory cgroup, not to RSS).")
    st = d.get("stalled_reader") or []
    if st:
        table(f"Stalled reader: 64 KiB read of a 256 MiB download, then no reads for {st[0]['stall_s']:.0f} s; the proxy "
              f"runs with `timeouts: {{idle: 2s, total: {st[0]['total_s']:.0f}s}}`",
              ["target", "client connection cut by the proxy after", "kernel bytes held at the end (proxy send queue + "
               "unread upstream)", "then the client got", "request line: category, duration"],
              [[x["target"], f"{x['cut_after_s']:.1f} s" if x["cut_after_s"] else f"never (>= {x['stall_s']:.0f} s)",
                f"{(x['held_kernel_bytes_at_end'] or 0) / 2**20:.1f} MiB", f"{x['client_got_mb']:.1f} MiB, {x['end']}",
                f"{x['log_category']}, {x['log_duration_ms']} ms"] for x in st],
              "`total` is documented as bounding the whole exchange, response body included.")
        so = st[0]
        bounded = so["cut_after_s"] is not None and so["cut_after_s"] <= so["total_s"] + 2
        goal("4e", "met" if bounded else "MISSED",
             f"a stalled reader is cut at timeouts.total ({so['total_s']:.0f} s): "
             + (f"cut after {so['cut_after_s']:.1f} s" if so["cut_after_s"] else
                f"NOT cut within {so['stall_s']:.0f} s; the handler, its upstream connection and "
                f"{(so['held_kernel_bytes_at_end'] or 0) / 2**20:.1f} MiB of socket buffers stay held"))
    ours = next(x for x in d["slow_reader"] if x["target"] == "mem_ours")
    goal("4d", "met" if ours["growth_mb"] < 32 else "MISSED",
         f"slow reader RSS growth (goal < 32 MB): {ours['growth_mb']:.1f} MiB; body not buffered: read "
         f"{ours['client_read'] / 2**20:.2f} of {ours['size'] // 2**20} MiB")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for x in dl:
        t, v = zip(*x["rss_series"])
        axes[0].plot(t, v, label=x["target"])
    axes[0].set_title(f"RSS relaying {dl[0]['size'] // 2**20} MiB")
    for x in d["sse_streams"]:
        t, v = zip(*x["rss_series"])
        axes[1].plot(t, v, label=x["target"])  # noqa: B007
    axes[1].set_title(f"RSS, {d['sse_streams'][0]['streams']} SSE streams (100 ms/event)")
    for x in d["slow_reader"]:
        t, v = zip(*x["rss_series"])
        axes[2].plot(t, v, label=x["target"])
    axes[2].set_title("RSS, slow reader (64 KiB/s, then stalled)")
    for ax in axes:
        ax.set_xlabel("s")
        ax.set_ylabel("RSS MiB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "bench_memory.png", dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ scaling


def report_scaling(d, plots: Path) -> None:
    rec = d["records"]
    concs = sorted({r["conc"] for r in by(rec, **{"pass": "conc"})})
    rows = []
    series = {}
    for c in concs:
        row = [c]
        for t in ("sc_ref", "sc_ours"):
            rs = by(rec, **{"pass": "conc", "target": t, "conc": c})
            row += [mmm(vals(rs, "rps"), ".0f"), mmm(vals(rs, "cpu_us"), ".1f"), mmm(vals(rs, "p50"), ".2f")]
            series.setdefault(("conc", t), []).append((c, med(vals(rs, "rps")), med(vals(rs, "cpu_us"))))
        row.append(mmm(paired(rec, "conc", "sc_ours", "sc_ref", "rps", RATIO, conc=c), ".3f"))
        rows.append(row)
    table("Against concurrency (small JSON POST)", ["c", "ref req/s", "ref CPU µs/req", "ref p50 ms", "ours req/s",
          "ours CPU µs/req", "ours p50 ms", "ours/ref req/s"], rows,
          f"Other processes: {other(by(rec, **{'pass': 'conc'}))} cores.")
    sizes = sorted({r["x"] for r in by(rec, **{"pass": "size"})})
    rows = []
    for s in sizes:
        row = [_size(s)]
        for t in ("sc_ref", "sc_ours"):
            rs = by(rec, **{"pass": "size", "target": t, "x": s})
            cpu = med(vals(rs, "cpu_us"))
            row += [mmm(vals(rs, "rps"), ".0f"), mmm(vals(rs, "cpu_us"), ".0f"),
                    f"{cpu / (s / 2**20) / 1e3:.2f}" if cpu else "n/a"]
            series.setdefault(("size", t), []).append((s, med(vals(rs, "rps")), cpu))
        row.append(mmm(paired(rec, "size", "sc_ours", "sc_ref", "cpu_us", RATIO, x=s), ".3f"))
        rows.append(row)
    table("Against response size (GET of a static file, c=10)", ["size", "ref req/s", "ref CPU µs/req", "ref CPU ms/MiB",
          "ours req/s", "ours CPU µs/req", "ours CPU ms/MiB", "ours/ref CPU"], rows,
          f"Bodies up to 64 KiB are read whole before the response starts (SMALL_BODY), larger ones streamed. "
          f"Other processes: {other(by(rec, **{'pass': 'size'}))} cores.")
    rows = []
    flat_ok = True
    base = {}
    for n in (1, 100, 1000):
        row = [n]
        for kind in ("last", "default", "unique"):
            rs = by(rec, **{"pass": "routes", "target": f"rt{n}", "kind": kind})
            cpu = med(vals(rs, "cpu_us"))
            row += [mmm(vals(rs, "rps"), ".0f"), mmm(vals(rs, "cpu_us"), ".1f")]
            series.setdefault(("routes", kind), []).append((n, med(vals(rs, "rps")), cpu))
            if n == 1:
                base[kind] = cpu
            elif kind != "unique" and cpu and base.get(kind) and cpu > base[kind] * 1.10:
                flat_ok = False
        plain = by(rec, **{"pass": "routes", "target": f"rt{n}", "kind": "last"})
        scraped = by(rec, **{"pass": "routes", "target": f"rt{n}", "kind": "scraped"})
        stimes = [t for r in scraped for t in r.get("scrapes", []) if t >= 0]
        row += [f"{med(vals(plain, 'p99')):.2f} / {max(vals(plain, 'max')):.1f}" if plain else "n/a",
                f"{med(vals(scraped, 'p99')):.2f} / {max(vals(scraped, 'max')):.1f}" if scraped else "n/a",
                f"{med(stimes) * 1e3:.0f}" if stimes else "n/a"]
        idle = d["routes_idle_rss"][str(n)]["total_mb"] if str(n) in d["routes_idle_rss"] else d["routes_idle_rss"][n]["total_mb"]
        sc = d["routes_metrics_scrape"].get(str(n)) or d["routes_metrics_scrape"].get(n)
        row += [f"{idle:.1f}", f"{sc['bytes'] / 1024:.0f} KiB / {sc['seconds'] * 1e3:.0f} ms"]
        rows.append(row)
    table("Against the number of configured routes (POST, c=10)",
          ["routes", "last route req/s", "CPU µs/req", "default route req/s", "CPU µs/req",
           "new path each request req/s", "CPU µs/req", "last route p99 / max ms", "same, /metrics scraped every 1 s",
           "scrape ms (median)", "idle RSS MiB", "/metrics size / scrape time after the runs"], rows,
          "last: POST /v1/chat/completions, the last route; default: a path no route matches (cached per "
          "(method, path) after the first request); new path: every request a path never seen (bench/uniq.lua), so the "
          "match cache cannot answer and every request is looked up in the route trie. In a single process the scrape "
          "is rendered in a thread of the traffic process: under the GIL it still takes turns with the event loop.")
    kinds = {k: [c for _, _, c in series[("routes", k)]] for k in ("last", "default", "unique")}
    rss = [d["routes_idle_rss"].get(str(n), d["routes_idle_rss"].get(n, {})).get("total_mb") for n in (1, 100, 1000)]
    goal("5c", "met" if rss[-1] <= 60 else "MISSED", "idle RSS with 1/100/1000 routes (goal <= 60 MB per process): "
         + "/".join(f"{x:.1f}" for x in rss) + " MiB")
    goal("5", "met" if flat_ok else "MISSED",
         "route matching flat with 1/100/1000 routes (cached paths, within 10 %): CPU µs/req last "
         + "/".join(f"{c:.0f}" for c in kinds["last"]) + ", default " + "/".join(f"{c:.0f}" for c in kinds["default"])
         + "; a new path per request: " + "/".join(f"{c:.0f}" for c in kinds["unique"]))
    fl = d.get("sse_flood") or []
    rows = []
    for t in ("direct_sse", "sse_ref", "sse_ours"):
        rs = [x for x in fl if x["target"] == t]
        rows.append([t, "yes" if all(x["ok"] for x in rs) else "NO", mmm([x["events_per_s"] for x in rs], ".0f"),
                     mmm([x.get("cpu_us_per_event") for x in rs], ".2f"),
                     mmm([x.get("events_per_cpu_s") for x in rs], ".0f"),
                     mmm([x["upstream_cpu_s"] / x["wall_s"] for x in rs], ".2f")])
    if fl:
        table(f"SSE events relayed as fast as the upstream writes them ({fl[0]['streams']} streams x "
              f"{fl[0]['events_per_stream']} events of ~250 B)",
              ["target", "all events arrived", "events/s", "proxy CPU µs/event", "events per proxy CPU-second (per core)",
               "upstream cores"], rows)
        o = [x.get("events_per_cpu_s") for x in fl if x["target"] == "sse_ours"]
        goal("5b", "info", f"SSE relay: {mmm(o, '.0f')} events per proxy CPU-second "
             f"({mmm([x['events_per_s'] for x in fl if x['target'] == 'sse_ours'], '.0f')} events/s wall)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    label = {"sc_ref": "reference (bench/ref_proxy.py)", "sc_ours": "ours"}
    for kind, xlabel, fname, logx in (("conc", "concurrency (wrk connections)", "bench_concurrency.png", True),
                                      ("size", "response size (bytes)", "bench_size.png", True)):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for t in ("sc_ref", "sc_ours"):
            xs, rps, cpu = zip(*series[(kind, t)])
            a1.plot(xs, rps, marker="o", label=label[t])
            a2.plot(xs, cpu, marker="o", label=label[t])
        for a, yl in ((a1, "req/s"), (a2, "CPU µs / request")):
            a.set_xlabel(xlabel)
            a.set_ylabel(yl)
            if logx:
                a.set_xscale("log")
            if kind == "size":
                a.set_yscale("log")
            else:
                a.set_ylim(bottom=0)
            a.grid(alpha=0.3, which="both")
            a.legend()
        fig.suptitle(f"Cost against {kind if kind != 'conc' else 'concurrency'} (median of rounds)")
        fig.tight_layout()
        fig.savefig(plots / fname, dpi=90)
        plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, lab in (("last", "last route (cached)"), ("default", "default route (cached)"),
                   ("unique", "new path every request (no cache)")):
        xs, rps, cpu = zip(*series[("routes", k)])
        a1.plot(xs, rps, marker="o", label=lab)
        a2.plot(xs, cpu, marker="o", label=lab)
    for a, yl in ((a1, "req/s"), (a2, "CPU µs / request")):
        a.set_xscale("log")
        a.set_xlabel("configured routes")
        a.set_ylabel(yl)
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.suptitle("Cost against the number of routes (ours, c=10)")
    fig.tight_layout()
    fig.savefig(plots / "bench_routes.png", dpi=90)
    plt.close(fig)
    SSE_PLOT["flood"] = {t: med([x.get("events_per_cpu_s") for x in fl if x["target"] == t])
                         for t in ("sse_ref", "sse_ours")} if fl else None


SSE_PLOT: dict = {}


def plot_sse(plots: Path) -> None:
    """Events per proxy CPU-second: batched (flood, scaling part) and one event per read (memory part)."""
    if not SSE_PLOT.get("flood") and not SSE_PLOT.get("paced"):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, a = plt.subplots(figsize=(7, 4))
    groups = [(k, lab) for k, lab in (("paced", "one event per read\n(200 streams, 10 events/s each)"),
                                      ("flood", "as fast as the upstream writes\n(events arrive batched)"))
              if SSE_PLOT.get(k)]
    w = 0.38
    for i, (who, lab) in enumerate((("ref", "reference"), ("ours", "ours"))):
        ys = [next((v for t, v in SSE_PLOT[k].items() if t.endswith(who)), 0) or 0 for k, _ in groups]
        bars = a.bar([j + (i - 0.5) * w for j in range(len(groups))], ys, w, label=lab)
        a.bar_label(bars, fmt="%.0f", fontsize=8)
    a.set_xticks(range(len(groups)), [lab for _, lab in groups])
    a.set_ylabel("SSE events per proxy CPU-second")
    a.set_title("SSE events relayed per core")
    a.grid(alpha=0.3, axis="y")
    a.legend()
    fig.tight_layout()
    fig.savefig(plots / "bench_sse.png", dpi=90)
    plt.close(fig)


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 1024} KiB"


# ------------------------------------------------------------------------------------------ breaker


def report_breaker(d) -> None:
    rec = d["records"]
    rows = []
    for t, lab in (("br_normal", "forwarded (upstream nginx)"), ("br_open", "breaker open (503 circuit_open)")):
        r10 = by(rec, **{"pass": "breaker10", "target": t})
        r1 = by(rec, **{"pass": "breaker1", "target": t})
        rows.append([lab, mmm(vals(r10, "rps"), ".0f"), mmm(vals(r10, "p50"), ".3f"), mmm(vals(r10, "cpu_us"), ".1f"),
                     mmm(vals(r1, "p50"), ".3f"), mmm(vals(r1, "cpu_us"), ".1f")])
    ratio = paired(rec, "breaker10", "br_open", "br_normal", "cpu_us", RATIO)
    table("Answering with an open breaker vs forwarding", ["", "req/s c=10", "p50 ms c=10", "CPU µs/req c=10",
          "p50 ms c=1", "CPU µs/req c=1"], rows,
          f"open/forwarded CPU µs/req at c=10, paired: {mmm(ratio, '.3f')}. Every open-breaker answer is a 503 "
          f"(wrk counts them as status errors: expected). Trip check: {d['trip']}; /metrics of the open one: "
          f"{d['open_metrics']}.")
    o = by(rec, **{"pass": "breaker10", "target": "br_open"})
    n = by(rec, **{"pass": "breaker10", "target": "br_normal"})
    goal("7", "info", f"open breaker at c=10: {med(vals(o, 'rps')):.0f} req/s, p50 {med(vals(o, 'p50')):.3f} ms, "
         f"{med(vals(o, 'cpu_us')):.1f} µs CPU/req vs forwarded {med(vals(n, 'rps')):.0f} req/s, "
         f"{med(vals(n, 'cpu_us')):.1f} µs")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--plots", default=None)
    a = ap.parse_args()
    d = Path(a.results)
    plots = Path(a.plots) if a.plots else d
    plots.mkdir(parents=True, exist_ok=True)
    head = []
    for part, fn in (("core", report_core), ("workers", report_workers), ("memory", report_memory),
                     ("scaling", report_scaling), ("breaker", report_breaker)):
        doc = load(d, part)
        if doc is None:
            continue
        if not head:
            m, v = doc["machine"], doc["versions"]
            head = [f"machine: {m['cpus']} CPU {m['model']}, kernel {m['kernel']}, {m['mem_mb']} MiB, load {m['loadavg']}",
                    "versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
                    f"proxy code: {doc['code']} (imported from {doc['imported_from']})"]
            if doc.get("quick"):
                head.append("QUICK run: 1 round of 1 s per measurement, a plumbing check; the figures are not measurements")
        TABLES.append(f"### part: {part}" + (" (QUICK: plumbing check, not a measurement)" if doc.get("quick") else "")
                      + f"  — waited {doc.get('quiet_wait_s', 0):.0f} s for other processes\n")
        try:
            fn(doc, plots) if part in ("memory", "scaling") else fn(doc)
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
            import traceback
            traceback.print_exc()
            GOALS.append(f"GOAL ?   ERROR  part {part}: {exc!r}")
    try:
        plot_sse(plots)
    except ImportError:
        pass
    for f in sorted(d.glob("*.failed")):
        GOALS.append(f"GOAL ?   ERROR  part {f.stem} failed: {f.read_text()}")
    text = "\n".join(head) + "\n\n" + "\n".join(TABLES)
    (d / "tables.md").write_text(text)
    (d / "summary.txt").write_text("\n".join(head + [""] + GOALS) + "\n")
    print("\n".join(head + GOALS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
