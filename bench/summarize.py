"""Summary of one bench/compare.sh run (results.jsonl): medians with min-max, paired ratios.

usage: summarize.py RESULTS_JSONL ENV_TXT SUMMARY_OUT TTFB_RC DEAD [AB_LABEL]
Writes the summary to stderr and SUMMARY_OUT, the final one-line verdict to stdout.
Exit 0 ok, 1 missing data, 2 a proxy had errors (non-2xx, socket errors, timeouts, ttfb failure, died).
"""
import json
import sys

from harness import med, mmm  # bench/ is the script's directory: on sys.path

PROXIES = ("ref", "ours", "ours_b")


def errors(w):
    return w["err_connect"] + w["err_read"] + w["err_write"] + w["err_status"] + w["err_timeout"]


def main() -> int:
    res_path, env_path, out_path, ttfb_rc, dead = sys.argv[1:6]
    ab_label = sys.argv[6] if len(sys.argv) > 6 else "ours_b"
    rows = [json.loads(line) for line in open(res_path) if line.strip()]
    lines = [line.rstrip("\n") for line in open(env_path)]
    missing = []
    err_total = 0
    err_notes = []

    runs = {}  # (pass, target) -> {round: metrics}
    for r in rows:
        if r["pass"] == "ttfb":
            continue
        w = r.get("wrk")
        if r.get("warmup"):
            if w and errors(w) and r["target"] in PROXIES:
                err_total += errors(w)
                err_notes.append(f"{r['pass']} r{r['round']} {r['target']} warm-up: {errors(w)} errors")
            continue
        if not w:
            missing.append(f"{r['pass']} r{r['round']} {r['target']}: no wrk result")
            continue
        m = {"rps": w["rps"], "p50": w["p50_us"] / 1e3, "p99": w["p99_us"] / 1e3, "err": errors(w),
             "cpu_us": None, "cores": None, "rss": None}
        mon = (r.get("mon") or {}).get("p")
        if mon and w["requests"]:
            m["cpu_us"] = mon["cpu_s"] * 1e6 / w["requests"]
            m["cores"] = mon["cpu_s"] / mon["wall_s"] if mon["wall_s"] else None
            m["rss"] = mon["rss_max_mb"]
        elif r["target"] in PROXIES:
            missing.append(f"{r['pass']} r{r['round']} {r['target']}: no CPU sample")
        if m["err"] and r["target"] in PROXIES:
            err_total += m["err"]
            err_notes.append(f"{r['pass']} r{r['round']} {r['target']}: {m['err']} errors "
                             f"(connect/read/write/status/timeout {w['err_connect']}/{w['err_read']}/"
                             f"{w['err_write']}/{w['err_status']}/{w['err_timeout']})")
        runs.setdefault((r["pass"], r["target"]), {})[r["round"]] = m

    out = lines + ["", "pass   target    n  req/s median [min-max]      p50 ms               p99 ms               "
                       "CPU us/req           cores  RSS MB  errors"]
    for (p, t), by_round in runs.items():
        ms = list(by_round.values())
        cpu = mmm([m["cpu_us"] for m in ms], ".1f")
        cores = med([m["cores"] for m in ms])
        rss = max([m["rss"] for m in ms if m["rss"] is not None], default=None)
        out.append(f"{p:6s} {t:9s} {len(ms)}  {mmm([m['rps'] for m in ms], '.0f'):26s} "
                   f"{mmm([m['p50'] for m in ms], '.3f'):20s} {mmm([m['p99'] for m in ms], '.3f'):20s} "
                   f"{cpu:20s} {format(cores, '.2f') if cores is not None else '-':6s} "
                   f"{format(rss, '.0f') if rss is not None else '-':7s} {sum(m['err'] for m in ms)}")

    def paired(pass_, a, b, key, op):
        ra, rb = runs.get((pass_, a), {}), runs.get((pass_, b), {})
        vals = [op(ra[k][key], rb[k][key]) for k in sorted(ra) if k in rb
                and ra[k][key] is not None and rb[k][key] is not None]
        return vals

    ratio = lambda x, y: x / y  # noqa: E731
    diff = lambda x, y: x - y  # noqa: E731
    out.append("")
    out.append("paired per round (median [min-max] over rounds):")
    rps_r = paired("tput", "ours", "ref", "rps", ratio)
    cpu_r = paired("tput", "ours", "ref", "cpu_us", ratio)
    out.append(f"  tput c=10  ours/ref req/s {mmm(rps_r, '.3f')}   ours/ref CPU us/req {mmm(cpu_r, '.3f')}")
    added = {}
    for t in ("ref", "ours", "ours_b"):
        if ("lat", t) in runs:
            a50 = paired("lat", t, "direct", "p50", diff)
            a99 = paired("lat", t, "direct", "p99", diff)
            added[t] = med(a50)
            out.append(f"  lat c=1    {t:8s} added p50 {mmm(a50, '.3f')} ms   added p99 {mmm(a99, '.3f')} ms")
    if ("tput", "ours_b") in runs:
        out.append(f"  A/B: {ab_label}")
        for p, label in (("tput", "636 B JSON"), ("tput8k", "8078 B SSE file")):
            r1 = paired(p, "ours", "ours_b", "rps", ratio)
            r2 = paired(p, "ours", "ours_b", "cpu_us", ratio)
            out.append(f"    {label:15s} c=10 ours/ours_b req/s {mmm(r1, '.3f')}  CPU us/req {mmm(r2, '.3f')}")
        a = paired("lat", "ours", "ours_b", "p50", diff)
        out.append(f"    636 B JSON      c=1  p50 ours - ours_b {mmm(a, '.3f')} ms")

    ttfb = {r["ttfb"]["target"]: r["ttfb"] for r in rows if r["pass"] == "ttfb"}
    first = {}
    if ttfb:
        out.append("")
        out.append("first SSE chunk (20 ms-gap upstream, paired vs direct in each round):")
        for t, x in ttfb.items():
            out.append(f"  {t:7s} n={x['n']} first p50 {x['first_p50_ms']:.3f} p90 {x['first_p90_ms']:.3f} ms"
                       f"  added p50 {x['added_first_p50_ms']:.3f} p90 {x['added_first_p90_ms']:.3f}"
                       f" p99 {x['added_first_p99_ms']:.3f} ms  events {x['events_min']}-{x['events_max']}")
            first[t] = x["added_first_p50_ms"]
    if ttfb_rc not in ("0", "skip"):
        err_total += 1
        err_notes.append(f"ttfb.py failed (rc {ttfb_rc})")
    elif ttfb_rc == "0" and not {"ours", "ref"} <= set(ttfb):
        missing.append("ttfb: no result")
    if dead != "0":
        err_total += 1
        err_notes.append("a proxy died during the run")

    for key in (("tput", "ref"), ("tput", "ours"), ("lat", "direct"), ("lat", "ref"), ("lat", "ours")):
        if key not in runs:
            missing.append(f"{key[0]} {key[1]}: no rounds kept")
    if missing:
        out.append("")
        out += ["MISSING: " + m for m in missing]
    if err_notes:
        out.append("")
        out += ["ERRORS: " + e for e in err_notes]

    f = lambda x, fmt: "na" if x is None else format(x, fmt)  # noqa: E731
    final = (f"ours_rps/ref_rps={f(med(rps_r), '.3f')} ours_cpu_us/ref_cpu_us={f(med(cpu_r), '.3f')} "
             f"added_p50_ms ours={f(added.get('ours'), '.3f')} ref={f(added.get('ref'), '.3f')} "
             f"first_chunk_added_ms ours={f(first.get('ours'), '.3f')} ref={f(first.get('ref'), '.3f')}")
    text = "\n".join(out)
    print("\n" + text, file=sys.stderr)
    with open(out_path, "w") as fh:
        fh.write(text + "\n\n" + final + "\n")
    print(final, flush=True)
    if err_total:
        return 2
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
