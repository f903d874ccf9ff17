#!/usr/bin/env bash
# Build the image from ./Dockerfile and check that it runs: /readyz answers inside the container,
# the proxy runs as a non-root user, a config mounted at /etc/openai-resilience-proxy/config.yaml
# is read, and SIGTERM (docker stop) ends it with exit code 0.
#
# Not part of CI: it takes minutes. Needs root and Debian's docker.io and mmdebstrap (installed
# with apt-get when missing). Nothing is pulled from a container registry: the base image is made
# here with mmdebstrap (Debian bookworm: python3 3.11, as python:3.11-slim) and `docker import`ed,
# then passed to the Dockerfile as PYTHON_IMAGE. The build reaches PyPI through host networking
# (pip in the build stage); the container under test runs with --network none (loopback only).
#
# It starts its own dockerd (own socket, data and exec roots under $SMOKE_WORKDIR, no bridge, no
# iptables) and stops it by PID at the end. The data root is kept, so a second run reuses the base
# image and the build cache; SMOKE_CLEAN=1 removes it.
#
#   sudo scripts/docker-smoke.sh            # prints "docker smoke: OK ..." and exits 0 on success
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${SMOKE_WORKDIR:-/tmp/openai-resilience-proxy-smoke}
BASE=openai-resilience-proxy-smoke-base:bookworm
IMAGE=openai-resilience-proxy:smoke
NAME=openai-resilience-proxy-smoke
SUITE=bookworm

say() { printf 'docker smoke: %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (dockerd and mmdebstrap need it)"

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's client matches Debian's daemon (API 1.41); a newer client elsewhere on PATH may insist
# on BuildKit/buildx, which this daemon-only setup does not need.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker)

mkdir -p "$WORK"
SOCK="$WORK/docker.sock"
export DOCKER_HOST="unix://$SOCK"
DOCKERD_PID=""

cleanup() {
  local rc=$?
  if [ -n "$DOCKERD_PID" ]; then
    "$DOCKER" rm -f "$NAME" "$NAME-gw" >/dev/null 2>&1 || true
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID" 2>/dev/null || true
    # dockerd leaves its default network namespace mounted under the exec root
    awk -v root="$WORK/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null || true
  fi
  if [ "${SMOKE_CLEAN:-0}" = 1 ]; then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT

say "starting dockerd (log: $WORK/dockerd.log)"
dockerd --host "unix://$SOCK" --data-root "$WORK/data" --exec-root "$WORK/exec" \
        --pidfile "$WORK/dockerd.pid" --bridge=none --iptables=false \
        --ip-forward=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for i in $(seq 1 60); do
  "$DOCKER" info >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || fail "dockerd exited: $(tail -5 "$WORK/dockerd.log")"
  [ "$i" = 60 ] && fail "dockerd did not answer in 60 s: $(tail -5 "$WORK/dockerd.log")"
  sleep 1
done
say "dockerd $("$DOCKER" version --format '{{.Server.Version}}') up, storage driver $("$DOCKER" info --format '{{.Driver}}')"

# The base: Debian's python3 (3.11 in bookworm, as in python:3.11-slim) with the venv module.
# It trusts what this machine trusts: where outbound TLS is inspected by a proxy, pip in the
# build stage needs the host's CA bundle, so a copy goes into the base with PIP_CERT naming it
# (the base's business, not the Dockerfile's: a real python:3.11-slim needs nothing of the kind).
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  say "making the base image with mmdebstrap ($SUITE, minbase + python3)"
  HOST_CA=/etc/ssl/certs/ca-certificates.crt
  hooks=()
  changes=(--change 'CMD ["python3"]')
  if [ -s "$HOST_CA" ]; then
    hooks=(--customize-hook="install -m 0644 $HOST_CA \"\$1/etc/ssl/certs/build-host-ca.crt\"")
    changes+=(--change 'ENV PIP_CERT=/etc/ssl/certs/build-host-ca.crt')
  fi
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
             "${hooks[@]}" "$SUITE" "$WORK/base.tar"
  "$DOCKER" import "${changes[@]}" "$WORK/base.tar" "$BASE" >/dev/null
  rm -f "$WORK/base.tar"
fi

say "building $IMAGE on $BASE"
t0=$(date +%s)
DOCKER_BUILDKIT=0 "$DOCKER" build --quiet --network host --build-arg "PYTHON_IMAGE=$BASE" -t "$IMAGE" . >/dev/null \
  || fail "docker build"
say "built in $(( $(date +%s) - t0 )) s, $("$DOCKER" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

# The image's own metadata: user, entrypoint, ports.
user=$("$DOCKER" image inspect "$IMAGE" --format '{{.Config.User}}')
entry=$("$DOCKER" image inspect "$IMAGE" --format '{{json .Config.Entrypoint}}')
ports=$("$DOCKER" image inspect "$IMAGE" --format '{{json .Config.ExposedPorts}}')
[ "$user" = "10001:10001" ] || fail "image USER is '$user', expected 10001:10001"
[ "$entry" = '["/opt/venv/bin/openai-resilience-proxy"]' ] || fail "ENTRYPOINT is $entry"
case "$ports" in *8080/tcp*9090/tcp*|*9090/tcp*8080/tcp*) ;; *) fail "EXPOSE is $ports";; esac

# No compiler, no installer and no pip cache in the final image.
"$DOCKER" run --rm --network none --entrypoint /bin/sh "$IMAGE" -c '
  for t in gcc cc c++ make /opt/venv/bin/pip; do command -v "$t" >/dev/null 2>&1 && { echo "found $t"; exit 1; }; done
  for d in /root/.cache/pip /opt/venv/lib/python3*/site-packages/pip; do [ -e "$d" ] && { echo "found $d"; exit 1; }; done
  exit 0' || fail "build tools or pip left in the final image"

# The config mount point: a file there is read with no flag or variable naming it.
cfgdir=$(mktemp -d)
cat >"$cfgdir/config.yaml" <<'EOF'
listen: {host: 127.0.0.1, port: 8080}
admin: {host: 0.0.0.0, port: 9090}
upstream: {url: "http://127.0.0.1:9"}
shutdown_grace: 5s
EOF
chmod 0755 "$cfgdir"; chmod 0644 "$cfgdir/config.yaml"
checked=$("$DOCKER" run --rm --network none -v "$cfgdir:/etc/openai-resilience-proxy:ro" "$IMAGE" --check-config 2>&1) \
  || fail "--check-config: $checked"
case "$checked" in
  "# effective config (/etc/openai-resilience-proxy/config.yaml): valid"*) ;;
  *) fail "--check-config did not read /etc/openai-resilience-proxy/config.yaml: $(echo "$checked" | head -3)";;
esac

# Run it as Kubernetes would: read-only root, no capabilities, no privilege escalation.
"$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
"$DOCKER" run -d --name "$NAME" --network none --read-only --tmpfs /tmp --cap-drop ALL \
  --security-opt no-new-privileges -v "$cfgdir:/etc/openai-resilience-proxy:ro" "$IMAGE" >/dev/null
probe='import sys, urllib.request
for path in sys.argv[1:]:
    with urllib.request.urlopen("http://127.0.0.1:9090" + path, timeout=2) as r:
        body = r.read().decode()
        print(path, r.status, body.splitlines()[0] if body else "")
        if path == "/metrics" and "openai_proxy_requests_total" not in body:
            sys.exit("no openai_proxy_requests_total in /metrics")'
ok=""
for _ in $(seq 1 30); do
  if out=$("$DOCKER" exec "$NAME" python3 -c "$probe" /readyz /healthz /metrics 2>&1); then ok=1; break; fi
  [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 1
done
[ -n "$ok" ] || fail "/readyz did not answer inside the container: $out
$("$DOCKER" logs "$NAME" 2>&1 | tail -20)"
say "inside the container: $(echo "$out" | tr '\n' ';')"

# The traffic listener answers too: with no network the upstream is unreachable, so a proxy-made
# 502 upstream_connect_error in the OpenAI error shape.
fwd='import json, urllib.request, urllib.error
try:
    urllib.request.urlopen("http://127.0.0.1:8080/v1/models", timeout=10)
    raise SystemExit("expected a 502")
except urllib.error.HTTPError as e:
    body = json.loads(e.read())
    assert e.code == 502 and e.headers["x-proxy-error"] == "upstream_connect_error", (e.code, body)
    print(e.code, body["error"]["code"])'
out=$("$DOCKER" exec "$NAME" python3 -c "$fwd" 2>&1) || fail "the traffic listener: $out"
say "traffic listener: $out"

# Listening sockets (/proc/net/tcp, state 0A): traffic on 127.0.0.1:8080 as configured, admin on
# 0.0.0.0:9090; a gateway's PROXY_HOST=0.0.0.0 moves traffic to all interfaces.
listening() { "$DOCKER" exec "$1" awk '$4 == "0A" {print $2}' /proc/net/tcp | sort | tr '\n' ' '; }
[ "$(listening "$NAME")" = "00000000:2382 0100007F:1F90 " ] \
  || fail "listeners are '$(listening "$NAME")', expected 0.0.0.0:9090 and 127.0.0.1:8080"
"$DOCKER" rm -f "$NAME-gw" >/dev/null 2>&1 || true
"$DOCKER" run -d --name "$NAME-gw" --network none --read-only --cap-drop ALL -e PROXY_HOST=0.0.0.0 "$IMAGE" >/dev/null
for _ in $(seq 1 30); do
  [ "$(listening "$NAME-gw" 2>/dev/null)" = "00000000:1F90 00000000:2382 " ] && break
  sleep 1
done
[ "$(listening "$NAME-gw")" = "00000000:1F90 00000000:2382 " ] \
  || fail "with PROXY_HOST=0.0.0.0 the listeners are '$(listening "$NAME-gw")'"
"$DOCKER" rm -f "$NAME-gw" >/dev/null
say "listeners: 127.0.0.1:8080 by default, 0.0.0.0:8080 with PROXY_HOST=0.0.0.0; admin 0.0.0.0:9090"

uid=$("$DOCKER" exec "$NAME" awk '/^Uid:/ {print $2}' /proc/1/status)
cmd=$("$DOCKER" exec "$NAME" cat /proc/1/cmdline | tr '\0' ' ')
[ "$uid" != 0 ] || fail "PID 1 runs as root"
case "$cmd" in *openai-resilience-proxy*) ;; *) fail "PID 1 is '$cmd', not the proxy";; esac
say "PID 1 is '$cmd' with uid $uid"

# SIGTERM reaches the proxy (exec-form ENTRYPOINT): it drains and exits 0 well before docker's kill.
t0=$(date +%s)
"$DOCKER" stop --time 30 "$NAME" >/dev/null
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$NAME")
took=$(( $(date +%s) - t0 ))
[ "$code" = 0 ] || fail "exit code $code after docker stop: $("$DOCKER" logs "$NAME" 2>&1 | tail -5)"
[ "$took" -lt 30 ] || fail "docker stop took $took s: SIGTERM was not handled"
"$DOCKER" rm "$NAME" >/dev/null
rm -rf "$cfgdir"

say "OK: built on a local $SUITE base, /readyz 200 inside, uid $uid, config read from /etc, traffic 127.0.0.1 unless PROXY_HOST=0.0.0.0, SIGTERM -> exit 0 in ${took} s"
