#!/usr/bin/env bash
# Our proxy vs the bare aiohttp reference proxy (bench/ref_proxy.py), in one interleaved run.
#
#   bench/compare.sh                     # the standard comparison, ~2 min
#   SMALL_BODY_AB=1 bench/compare.sh     # + our proxy with proxy.attempt.SMALL_BODY=0 (A/B, see below)
#   AB=1 AB_ARGS='--log-level warning' AB_LABEL='no request log lines' bench/compare.sh   # any other A/B
#
# Not part of the test suite (pytest collects tests/ only); needs nginx, wrk, taskset, setsid, curl
# (`apt-get install -y nginx wrk`) and a Python with the project installed (PY, default
# /tmp/venv/bin/python, else .venv/bin/python).
#
# Starts, all on 127.0.0.1, each in its own process group (setsid), all stopped by PGID on exit. The
# ports below name the targets in this comment only: each is a free port the OS hands out, unless
# set in the environment (P_UP P_SSE P_REF P_OURS P_REF_SSE P_OURS_SSE P_OURS_B):
#   upstream  :18000  nginx fake OpenAI upstream (bench/nginx/upstream.conf): 636-byte chat.completion
#                     for any POST, a 30-event 8078-byte SSE file (with Content-Length) for POST /sse/...
#   sse_up    :18002  bench/slow_sse_upstream.py: chunked SSE, one event every 20 ms (first at once)
#   ref       :18090  bench/ref_proxy.py -> :18000        (asyncio loop: run WITHOUT --uvloop, the anchor)
#   ours      :18091  python -m proxy -> :18000           (admin on any free port; uses uvloop itself)
#   ref_sse   :18092  bench/ref_proxy.py -> :18002
#   ours_sse  :18093  python -m proxy -> :18002           (admin on any free port)
#   A/B mode (AB=1): `ours` runs as bench/run_proxy.py (same code as -m proxy) and one more target starts:
#   ours_b    :18094  bench/run_proxy.py with env AB_ENV (VAR=value ...) and extra flags AB_ARGS
#   SMALL_BODY_AB=1 is AB=1 with AB_ENV=BENCH_SMALL_BODY=0: the shipped SMALL_BODY (64 KiB: a known-length
#   body <= 64 KiB is read whole, then sent in one write) vs 0 (every body streamed chunk by chunk).
# Our proxy gets a 2-line config file that only binds its admin listener to 127.0.0.1 (default 0.0.0.0).
#
# Passes (wrk -t1 pinned to CPU $WRK_CPU, POST small JSON via post.lua; targets interleaved in
# every round; a proxy's CPU time is utime+stime of its process group from /proc, taken just
# before and just after each measured wrk run, divided by the requests wrk completed):
#   tput   c=$CONC, ROUNDS rounds: ref, ours[, ours_b]; WARM s discarded + DUR s measured each
#   tput8k (A/B mode only) same on POST /sse/v1/chat/completions (8078-byte body): ours, ours_b
#   lat    c=1, LAT_DUR s each, same rounds: direct, ref, ours[, ours_b]; added = target - direct,
#          paired per round (at c=10 "direct" is bound by wrk's own core, so added latency is taken at c=1)
#   ttfb   bench/ttfb.py TTFB_N rounds, paired: direct (:18002), ref_sse, ours_sse: time to the first
#          SSE chunk; added = target - direct in the same round
# Prints medians with min-max on stderr (also $RUN/summary.txt) and one final line on stdout:
#   ours_rps/ref_rps=<r> ours_cpu_us/ref_cpu_us=<r> added_p50_ms ours=<x> ref=<y> first_chunk_added_ms ours=<x> ref=<y>
# (the two ratios: median over rounds of the per-round ratio, tput pass). Exit 0 on success; 1 on a
# setup error or missing data; 2 if a proxy answered non-2xx or had socket errors/timeouts while measured.
# REV=<git rev> runs our proxy from that commit (git archive into the run dir, PYTHONPATH) instead of
# the work tree: figures then belong to a commit, whatever is being edited.
# Knobs: ROUNDS (5; 3 in A/B mode) DUR (5) WARM (1) CONC (10) LAT_DUR (2) TTFB_N (80)
#        TTFB (1: run the ttfb pass; 0 in A/B mode) WRK_CPU (1) STARTUP_S (15) PY
#        LIMIT_S (175: a step that would end later is skipped and reported missing -> exit 1)
# Typical total: ~2 min 10 s (A/B mode: ~2 min).
# Runtime files: a mktemp dir /tmp/orp_bench.XXXXXX (logs, results.jsonl, summary.txt, and nginx's
# config, pid, error log and SSE body file under nginx/).
# Ports: the defaults above, or P_UP P_SSE P_REF P_OURS P_REF_SSE P_OURS_SSE P_OURS_B from the
# environment (tests/bench/ passes ports the OS gave it); the proxies' admin listeners take any free
# port. With the default ports, do not run two at once, nor next to /work/shared/bench/compare.sh.
set -u
cd "$(dirname "$0")"
BENCH=$PWD
ROOT=$(cd .. && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x /tmp/venv/bin/python ]; then PY=/tmp/venv/bin/python; else PY=$ROOT/.venv/bin/python; fi
fi
SMALL_BODY_AB=${SMALL_BODY_AB:-0}; AB=${AB:-0}; AB_ENV=${AB_ENV:-}; AB_ARGS=${AB_ARGS:-}; AB_LABEL=${AB_LABEL:-}
if [ "$SMALL_BODY_AB" = 1 ]; then
  AB=1; AB_ENV="BENCH_SMALL_BODY=0 $AB_ENV"
  AB_LABEL=${AB_LABEL:-"ours = SMALL_BODY 64 KiB (read whole), ours_b = SMALL_BODY 0 (always streamed)"}
fi
AB_LABEL=${AB_LABEL:-"ours_b = ours with env '$AB_ENV' and flags '$AB_ARGS'"}
if [ "$AB" = 1 ]; then ROUNDS=${ROUNDS:-3}; TTFB=${TTFB:-0}; fi  # more targets: fewer rounds
ROUNDS=${ROUNDS:-5}; DUR=${DUR:-5}; WARM=${WARM:-1}; CONC=${CONC:-10}; LAT_DUR=${LAT_DUR:-2}
TTFB_N=${TTFB_N:-80}; TTFB=${TTFB:-1}; WRK_CPU=${WRK_CPU:-1}; LIMIT_S=${LIMIT_S:-175}
STARTUP_S=${STARTUP_S:-15}; REV=${REV:-}
RUN=$(mktemp -d /tmp/orp_bench.XXXXXX)
RES=$RUN/results.jsonl
: >"$RES"
# shellcheck source=lib.sh
. "$BENCH/lib.sh"   # start, stop_groups, archive_rev, free_ports, PGID/PORT
read -r F1 F2 F3 F4 F5 F6 F7 < <(free_ports 7)  # every port from the OS, unless set in the environment
P_UP=${P_UP:-$F1}; P_SSE=${P_SSE:-$F2}; P_REF=${P_REF:-$F3}; P_OURS=${P_OURS:-$F4}
P_REF_SSE=${P_REF_SSE:-$F5}; P_OURS_SSE=${P_OURS_SSE:-$F6}; P_OURS_B=${P_OURS_B:-$F7}
mkdir -p "$RUN/nginx/www" && cp nginx/sse_body.txt "$RUN/nginx/www/"
chmod a+rx "$RUN" "$RUN/nginx" "$RUN/nginx/www"  # nginx's workers drop root: they must reach the body file
# upstream.conf with this run's port and runtime directory
sed -e "s/127.0.0.1:18000/127.0.0.1:$P_UP/" -e "s#/tmp/bench_run#$RUN/nginx#g" nginx/upstream.conf >"$RUN/nginx/upstream.conf"

for tool in nginx wrk taskset setsid curl timeout; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y nginx wrk)" >&2; exit 1; }
done
"$PY" -c 'import proxy, aiohttp' 2>/dev/null || { echo "PY=$PY cannot import proxy and aiohttp" >&2; exit 1; }

MONPID=
cleanup() {
  [ -n "$MONPID" ] && kill -TERM "$MONPID" 2>/dev/null
  stop_groups
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

printf 'admin:\n  host: 127.0.0.1\n' >"$RUN/proxy.yaml"
archive_rev
OURS=("${SRC_ENV[@]}" "$PY" -m proxy --config "$RUN/proxy.yaml")
B=()   # the extra target of A/B mode
if [ "$AB" = 1 ]; then OURS=("${SRC_ENV[@]}" "$PY" "$BENCH/run_proxy.py" --config "$RUN/proxy.yaml"); B=(ours_b); fi

UP=http://127.0.0.1:$P_UP; SSE=http://127.0.0.1:$P_SSE
start upstream "$P_UP" nginx -e "$RUN/nginx_up.err" -c "$RUN/nginx/upstream.conf" -g 'daemon off;'
start sse_up "$P_SSE" env PORT="$P_SSE" GAP_MS=20 EVENTS=6 "$PY" "$BENCH/slow_sse_upstream.py"
start ref "$P_REF" env PORT="$P_REF" UPSTREAM="$UP" "$PY" "$BENCH/ref_proxy.py"
start ours "$P_OURS" "${OURS[@]}" --upstream "$UP" --port "$P_OURS" --admin-port 0
start ref_sse "$P_REF_SSE" env PORT="$P_REF_SSE" UPSTREAM="$SSE" "$PY" "$BENCH/ref_proxy.py"
start ours_sse "$P_OURS_SSE" "${OURS[@]}" --upstream "$SSE" --port "$P_OURS_SSE" --admin-port 0
if [ "$AB" = 1 ]; then
  # shellcheck disable=SC2086 # AB_ENV and AB_ARGS are word lists
  start ours_b "$P_OURS_B" env $AB_ENV "${OURS[@]}" --upstream "$UP" --port "$P_OURS_B" --admin-port 0 $AB_ARGS
  echo "A/B: $AB_LABEL" >&2
  grep -h 'run_proxy: SMALL_BODY=' "$RUN/ours.log" "$RUN/ours_b.log" >&2
fi
PORT[direct]=$P_UP
PORT[direct_sse]=$P_SSE

KEY="Authorization: Bearer sk-bench-0000000000000000000000000000"
sanity() {  # name path expect
  local code
  code=$(curl -s -m 10 -o "$RUN/sanity_$1.out" -w '%{http_code}' -X POST -H "$KEY" -H 'Content-Type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}' "http://127.0.0.1:${PORT[$1]}$2")
  if [ "$code" != 200 ] || ! grep -q "$3" "$RUN/sanity_$1.out"; then
    echo "sanity request to $1 failed: HTTP $code: $(head -c 200 "$RUN/sanity_$1.out")" >&2; exit 1
  fi
}
for t in ref ours "${B[@]}"; do
  sanity "$t" /v1/chat/completions '"object":"chat.completion"'
  sanity "$t" /sse/v1/chat/completions 'data: \[DONE\]'
done
for t in ref_sse ours_sse; do sanity "$t" /v1/chat/completions 'data: \[DONE\]'; done
echo "sanity checks passed at ${SECONDS}s" >&2

measure() {  # pass round target conc warm_s dur_s path
  local pass=$1 r=$2 t=$3 c=$4 warm=$5 dur=$6 path=$7 mon=null w wj
  if [ $((SECONDS + warm + dur + 2)) -gt "$LIMIT_S" ]; then
    echo "time limit ${LIMIT_S}s: skipping $pass round $r $t" >&2; return
  fi
  local u="http://127.0.0.1:${PORT[$t]}$path"
  if [ "$warm" -gt 0 ]; then
    w=$(taskset -c "$WRK_CPU" timeout $((warm + 5)) wrk -t1 -c"$c" -d"${warm}s" --timeout 5s -s post.lua "$u" 2>&1 \
        | sed -n 's/^WRKJSON //p')
    printf '{"pass":"%s","round":%d,"target":"%s","warmup":true,"wrk":%s}\n' "$pass" "$r" "$t" "${w:-null}" >>"$RES"
  fi
  if [ -n "${PGID[$t]:-}" ] && [ "$t" != upstream ]; then
    "$PY" procmon.py $((dur + 15)) "p=${PGID[$t]}" >"$RUN/mon.out" 2>"$RUN/mon.err" & MONPID=$!
    for _ in $(seq 1 50); do grep -q PROCMON_READY "$RUN/mon.err" 2>/dev/null && break; sleep 0.05; done
  fi
  wj=$(taskset -c "$WRK_CPU" timeout $((dur + 5)) wrk -t1 -c"$c" -d"${dur}s" --timeout 5s -s post.lua "$u" 2>&1 \
       | sed -n 's/^WRKJSON //p')
  if [ -n "$MONPID" ]; then
    kill -TERM "$MONPID" 2>/dev/null; wait "$MONPID" 2>/dev/null; MONPID=
    mon=$(sed -n 's/^PROCMON //p' "$RUN/mon.out"); [ -n "$mon" ] || mon=null
  fi
  printf '{"pass":"%s","round":%d,"target":"%s","conc":%d,"path":"%s","wrk":%s,"mon":%s}\n' \
    "$pass" "$r" "$t" "$c" "$path" "${wj:-null}" "$mon" >>"$RES"
  echo "[${SECONDS}s] $pass r$r $t c$c: $(echo "${wj:-no wrk result}" | cut -c2-110)" >&2
}

TPUT=(ref ours "${B[@]}"); LAT=(direct ref ours "${B[@]}")
for r in $(seq 1 "$ROUNDS"); do
  for t in "${TPUT[@]}"; do measure tput "$r" "$t" "$CONC" "$WARM" "$DUR" /v1/chat/completions; done
  if [ "$AB" = 1 ]; then
    for t in ours ours_b; do measure tput8k "$r" "$t" "$CONC" "$WARM" "$DUR" /sse/v1/chat/completions; done
  fi
  for t in "${LAT[@]}"; do measure lat "$r" "$t" 1 0 "$LAT_DUR" /v1/chat/completions; done
done

TTFB_RC=skip
if [ "$TTFB" = 1 ]; then
  TTFB_RC=0
  # ~0.11 s per streamed request (6 events, 20 ms apart) x 3 targets x (TTFB_N + 5 warm-up)
  est=$(( (TTFB_N + 5) * 3 * 12 / 100 + 2 ))
  if [ $((SECONDS + est)) -gt "$LIMIT_S" ]; then
    echo "time limit ${LIMIT_S}s: skipping the ttfb pass (needs ~${est}s)" >&2
  else
    timeout $((est * 2 + 10)) "$PY" ttfb.py "$TTFB_N" direct="$SSE/v1/chat/completions" \
      ref="http://127.0.0.1:$P_REF_SSE/v1/chat/completions" ours="http://127.0.0.1:$P_OURS_SSE/v1/chat/completions" \
      >"$RUN/ttfb.out" 2>"$RUN/ttfb.err"
    TTFB_RC=$?
    [ $TTFB_RC = 0 ] || { echo "ttfb.py failed (rc $TTFB_RC):" >&2; tail -5 "$RUN/ttfb.err" >&2; }
    sed -n 's/^TTFB //p' "$RUN/ttfb.out" | while read -r line; do
      printf '{"pass":"ttfb","ttfb":%s}\n' "$line" >>"$RES"
    done
    echo "[${SECONDS}s] ttfb done" >&2
  fi
fi

# every proxy must still be alive after the measurements
DEAD=0
for t in ref ours ref_sse ours_sse "${B[@]}"; do
  kill -0 "${PGID[$t]}" 2>/dev/null || { echo "$t died during the run; log tail:" >&2; tail -5 "$RUN/$t.log" >&2; DEAD=1; }
done

{
  echo "machine: $(nproc) CPU, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), kernel $(uname -r)"
  echo "versions: $("$PY" -c 'import sys, aiohttp, uvloop, multidict, yarl; print("python", sys.version.split()[0], "aiohttp", aiohttp.__version__, "uvloop", uvloop.__version__, "multidict", multidict.__version__, "yarl", yarl.__version__)'), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  if [ -n "$REV" ]; then
    echo "proxy code: commit $(git -C "$ROOT" rev-parse --short "$REV") (REV=$REV, from git archive)"
  else
    echo "proxy code: work tree at commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" status --porcelain -- proxy 2>/dev/null | grep -q . && echo ' + uncommitted changes in proxy/')"
  fi
  echo "proxy imported from: $("${SRC_ENV[@]}" "$PY" -c 'import os, proxy; print(os.path.dirname(proxy.__file__))')"
  echo "load avg before summary: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RUN/env.txt"

"$PY" summarize.py "$RES" "$RUN/env.txt" "$RUN/summary.txt" "$TTFB_RC" "$DEAD" "$AB_LABEL"
