#!/usr/bin/env bash
# The whole benchmark of docs/benchmarks.md in one command: bench/suite.py (every part, each an
# interleaved run of its own), then bench/report.py (tables, PNG plots, one summary line per goal).
#
#   bench/run_all.sh                      # all parts, ~13-15 min; plots into docs/
#   bench/run_all.sh memory breaker       # some parts only (core workers memory scaling breaker)
#   REV=HEAD bench/run_all.sh             # our proxy from `git archive <commit> proxy/` (figures belong
#                                         # to a commit, not to a work tree being edited)
#   QUICK=1 bench/run_all.sh              # 1 round of 1 s everywhere: checks the plumbing in ~4 min
#
# Env: PY (python with the project installed; default /tmp/venv/bin/python, else .venv/bin/python),
# OUT (results directory; default /tmp/orp_suite/run-<time>), PLOTS (default docs/ of the repo; a
# QUICK run writes its plots into OUT instead), ROUNDS / DUR (override every part's), QUIET_WAIT_S,
# QUIET_BUDGET_S (waiting for other processes to leave the CPU, see suite.py).
# Needs nginx, wrk, taskset (`apt-get install -y nginx wrk`) and matplotlib for the plots.
# Ports 28000-28999 and 29000-29999 on 127.0.0.1; every process started is stopped on exit.
# Exit status: 0 when every part ran (goals met or missed alike), 1 when a part failed.
set -u
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x /tmp/venv/bin/python ]; then PY=/tmp/venv/bin/python; else PY=$ROOT/.venv/bin/python; fi
fi
OUT=${OUT:-/tmp/orp_suite/run-$(date +%Y%m%d-%H%M%S)}
if [ "${QUICK:-0}" = 1 ]; then PLOTS=${PLOTS:-$OUT}; else PLOTS=${PLOTS:-$ROOT/docs}; fi
[ $# -gt 0 ] || set -- all
ARGS=(--out "$OUT")
[ -n "${REV:-}" ] && ARGS+=(--rev "$REV")
SECONDS=0
PY=$PY "$PY" suite.py "${ARGS[@]}" "$@"
rc=$?
"$PY" report.py "$OUT" --plots "$PLOTS" || rc=1
echo "results: $OUT (tables.md, summary.txt, *.json, logs/); plots: $PLOTS; took ${SECONDS}s" >&2
exit $rc
