# Shared by bench/compare.sh and bench/profile.sh (sourced; RUN, ROOT and STARTUP_S set by the caller).
# Every process started leads its own process group (setsid); stop_groups stops them all.

PIDS=()   # each one leads its own process group
declare -A PGID PORT

port_open() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

free_ports() {  # N -> N distinct ports the OS hands out on 127.0.0.1 (held together while chosen)
  "$PY" -c 'import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))' "$1"
}

start() {  # name port cmd...   (env for the command: set it in the caller's environment with env)
  local name=$1 port=$2; shift 2
  if port_open "$port"; then echo "port $port already in use: is another benchmark running?" >&2; exit 1; fi
  setsid "$@" >"$RUN/$name.log" 2>&1 </dev/null &
  local pid=$!; PIDS+=("$pid"); PGID[$name]=$pid; PORT[$name]=$port
  for _ in $(seq 1 $((${STARTUP_S:-15} * 10))); do
    port_open "$port" && { echo "$name up on 127.0.0.1:$port (pgid $pid) at ${SECONDS}s" >&2; return 0; }
    kill -0 "$pid" 2>/dev/null || { echo "$name exited; log:" >&2; tail -20 "$RUN/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "$name did not open port $port within ${STARTUP_S:-15}s; log:" >&2; tail -20 "$RUN/$name.log" >&2; exit 1
}

stop_groups() {  # SIGTERM every group, SIGKILL what is left after 5 s; trim big logs in $RUN
  for p in "${PIDS[@]}"; do kill -TERM -- -"$p" 2>/dev/null; done
  for _ in $(seq 1 50); do
    alive=0; for p in "${PIDS[@]}"; do kill -0 -- -"$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL -- -"$p" 2>/dev/null; done
  wait 2>/dev/null
  # our proxy logs one JSON line per request (~400 B): keep the head and tail of big logs only
  for f in "$RUN"/*.log; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 2000000 ] || continue
    { head -n 50 "$f"; echo "... $(wc -l <"$f") lines, trimmed by ${0##*/} ..."; tail -n 50 "$f"; } >"$f.trim" && mv "$f.trim" "$f"
  done
  echo "stopped process groups: ${PIDS[*]:-none} (files in $RUN)" >&2
}

SRC_ENV=()   # REV=<commit>: run our proxy from `git archive REV proxy/` instead of the work tree
archive_rev() {  # REV -> SRC_ENV
  [ -n "${REV:-}" ] || return 0
  local sha
  sha=$(git -C "$ROOT" rev-parse --verify --quiet "$REV^{commit}") || { echo "REV=$REV: no such commit" >&2; exit 1; }
  mkdir -p "$RUN/src" && git -C "$ROOT" archive "$sha" proxy | tar -x -C "$RUN/src" || { echo "git archive failed" >&2; exit 1; }
  SRC_ENV=(env PYTHONPATH="$RUN/src")
}
