#!/usr/bin/env bash
# Profile our proxy under load: wrk c=10 (small JSON POST, wrk pinned to CPU 1) against
# `python bench/run_proxy.py` -> nginx fake upstream, sampled with py-spy or traced with cProfile.
#
#   bench/profile.sh                 # py-spy (pip install py-spy): collapsed stacks + top table
#                                    # (for a flame view: py-spy record --format speedscope -p PID by hand)
#   PROFILER=cprofile bench/profile.sh   # cProfile (deterministic, slower): call counts per request
#   PROFILE_TARGET=ref bench/profile.sh  # the same for bench/ref_proxy.py (py-spy only)
#
# Knobs: DUR (15 s sampled/traced) CONC (10) RATE (250 Hz, py-spy) REV (commit to profile, as in
# compare.sh) US_PER_REQ (CPU us/request measured by compare.sh: buckets in us) PY. Output: /tmp/orp_profile.XXXXXX/ (pyspy.raw or cprofile.out)
# and the top functions on stdout. Bounded: every step has a timeout; everything started is
# stopped by process group on exit. Every port is one the OS hands out.
set -u
cd "$(dirname "$0")"
BENCH=$PWD
ROOT=$(cd .. && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x /tmp/venv/bin/python ]; then PY=/tmp/venv/bin/python; else PY=$ROOT/.venv/bin/python; fi
fi
DUR=${DUR:-15}; CONC=${CONC:-10}; RATE=${RATE:-250}; PROFILER=${PROFILER:-pyspy}
PROFILE_TARGET=${PROFILE_TARGET:-ours}; REV=${REV:-}
PYSPY=${PYSPY:-$(dirname "$PY")/py-spy}
RUN=$(mktemp -d /tmp/orp_profile.XXXXXX)
mkdir -p "$RUN/nginx/www" && cp nginx/sse_body.txt "$RUN/nginx/www/"
chmod a+rx "$RUN" "$RUN/nginx" "$RUN/nginx/www"  # nginx's workers drop root: they must reach the body file
# shellcheck source=lib.sh
. "$BENCH/lib.sh"   # start, stop_groups, archive_rev, free_ports, PGID
read -r P_UP PORT_T < <(free_ports 2)
sed -e "s/127.0.0.1:18000/127.0.0.1:$P_UP/" -e "s#/tmp/bench_run#$RUN/nginx#g" nginx/upstream.conf >"$RUN/nginx/upstream.conf"
if [ "$PROFILER" = pyspy ] && ! [ -x "$PYSPY" ]; then echo "no py-spy at $PYSPY: $PY -m pip install py-spy" >&2; exit 1; fi

trap stop_groups EXIT
trap 'exit 1' INT TERM HUP

start upstream "$P_UP" nginx -e "$RUN/nginx_up.err" -c "$RUN/nginx/upstream.conf" -g 'daemon off;'
archive_rev
printf 'admin:\n  host: 127.0.0.1\n' >"$RUN/proxy.yaml"
if [ "$PROFILE_TARGET" = ref ]; then
  start ref "$PORT_T" env PORT="$PORT_T" UPSTREAM="http://127.0.0.1:$P_UP" "$PY" "$BENCH/ref_proxy.py"
else
  CPROF=()
  [ "$PROFILER" = cprofile ] && CPROF=(env BENCH_CPROFILE="$RUN/cprofile.out")
  start ours "$PORT_T" "${CPROF[@]}" "${SRC_ENV[@]}" "$PY" "$BENCH/run_proxy.py" --config "$RUN/proxy.yaml" \
    --upstream "http://127.0.0.1:$P_UP" --port "$PORT_T" --admin-port 0
fi
TPID=${PGID[ours]:-${PGID[ref]}}  # the one started above
echo "profiling $PROFILE_TARGET (pid $TPID) with $PROFILER, ${DUR}s at c=$CONC; proxy code: ${REV:-work tree}" >&2

URL=http://127.0.0.1:$PORT_T/v1/chat/completions
# 2 s of load before sampling starts, 2 s after it ends
taskset -c 1 timeout $((DUR + 15)) wrk -t1 -c"$CONC" -d$((DUR + 4))s --timeout 5s -s post.lua "$URL" >"$RUN/wrk.out" 2>&1 &
WRK=$!
sleep 2
if [ "$PROFILER" = pyspy ]; then
  timeout $((DUR + 20)) "$PYSPY" record -p "$TPID" -d "$DUR" -r "$RATE" --format raw -o "$RUN/pyspy.raw" >"$RUN/pyspy.log" 2>&1
  wait "$WRK"
  [ -s "$RUN/pyspy.raw" ] || { echo "py-spy failed:" >&2; tail -5 "$RUN/pyspy.log" >&2; exit 1; }
  sed -n 's/^WRKJSON //p' "$RUN/wrk.out"
  "$PY" pyspy_top.py "$RUN/pyspy.raw" 25 ${US_PER_REQ:-}  # US_PER_REQ: CPU us/req from compare.sh
else
  wait "$WRK"
  sed -n 's/^WRKJSON //p' "$RUN/wrk.out"
  kill -TERM "$TPID"   # the proxy drains (no requests left) and run_proxy.py writes the stats
  for _ in $(seq 1 100); do [ -s "$RUN/cprofile.out" ] && ! kill -0 "$TPID" 2>/dev/null && break; sleep 0.1; done
  [ -s "$RUN/cprofile.out" ] || { echo "no cProfile output" >&2; exit 1; }
  reqs=$(sed -n 's/^WRKJSON {"requests":\([0-9]*\).*/\1/p' "$RUN/wrk.out")
  "$PY" - "$RUN/cprofile.out" "${reqs:-0}" <<'PYEOF'
import pstats, sys
st = pstats.Stats(sys.argv[1])
reqs = int(sys.argv[2]) or 1
rows = []
for (path, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
    short = path.split("site-packages/")[-1].split("/work/main/")[-1]
    rows.append((tt, ct, nc, f"{fn} ({short}:{line})"))
total = sum(r[0] for r in rows)
print(f"cProfile: {reqs} requests, {total:.2f} s traced; per request: us self, us cumulative, calls")
for tt, ct, nc, name in sorted(rows, reverse=True)[:40]:
    print(f"  {tt * 1e6 / reqs:7.1f} {ct * 1e6 / reqs:7.1f} {nc / reqs:6.2f}  {name}")
PYEOF
fi
