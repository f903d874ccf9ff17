"""Deploy checks: the Helm chart rendered by a real helm, the Dockerfile linted and parsed.

The tools come from scripts/install-deploy-tools.sh (helm and promtool in .tools/bin/, the Python
ones in the venv). A test whose tool is absent skips and names the script; with
DEPLOY_TOOLS_REQUIRED=1 (CI) an absent tool fails the test instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = ROOT / "helm"
CHART = HELM_DIR / "openai-resilience-proxy"
EXAMPLE = HELM_DIR / "examples" / "example-app"
TOOLS = ROOT / ".tools" / "bin"
KUBE_VERSION = "1.30.0"  # the schemas manifests are validated against, and the default render's cluster
INSTALL = "scripts/install-deploy-tools.sh"


def missing_tool(what: str) -> None:
    """Skip (or fail, where DEPLOY_TOOLS_REQUIRED=1) because a tool is not installed."""
    reason = f"{what} is not installed: run `{INSTALL} .venv` (CI does)"
    if os.environ.get("DEPLOY_TOOLS_REQUIRED") == "1":
        pytest.fail(reason + " [DEPLOY_TOOLS_REQUIRED=1]", pytrace=False)
    pytest.skip(reason)


def find_tool(name: str) -> str | None:
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_tool("helm")
    if path is None:
        missing_tool("helm (.tools/bin/helm or on PATH)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        missing_tool("promtool (.tools/bin/promtool or on PATH)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        missing_tool("kubernetes-validate (PyPI)")
    return kv


def run(cmd: list[str], *, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Rendered:
    """One `helm template` result: the documents, looked up by kind (and name)."""

    docs: list[dict[str, Any]]
    text: str

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    def pod_spec(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


Render = Callable[..., Rendered]


def _template(helm: str, chart: Path, values: dict[str, Any] | None, args: tuple[str, ...],
              tmp: Path, release: str) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", release, str(chart), "--namespace", "ai", "--kube-version", KUBE_VERSION]
    if values is not None:
        text = yaml.safe_dump(values)
        vf = tmp / f"values-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
        vf.write_text(text)
        cmd += ["-f", str(vf)]
    return run([*cmd, *args], check=False)


@pytest.fixture(scope="session")
def example_chart(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """helm/ copied aside with the example app's file:// dependency built (offline), so the
    work tree gets no charts/*.tgz or Chart.lock."""
    copy = tmp_path_factory.mktemp("helm") / "helm"
    shutil.copytree(HELM_DIR, copy, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    chart = copy / "examples" / "example-app"
    run([helm, "dependency", "build", str(chart)])
    return chart


@pytest.fixture(scope="session")
def render(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Render:
    """render(chart=CHART, values=None, *extra_args) -> Rendered; fails on a helm error."""
    tmp = tmp_path_factory.mktemp("values")
    cache: dict[str, Rendered] = {}

    def _render(chart: Path = CHART, values: dict[str, Any] | None = None, *args: str,
                release: str = "rel") -> Rendered:
        key = repr((str(chart), yaml.safe_dump(values), args, release))
        if key not in cache:
            proc = _template(helm, chart, values, args, tmp, release)
            if proc.returncode != 0:
                raise AssertionError(f"helm template {chart.name} failed:\n{proc.stderr}")
            docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
            cache[key] = Rendered(docs, proc.stdout)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def render_error(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """render_error(chart, values, *args) -> helm's error text; fails if the render succeeds."""
    tmp = tmp_path_factory.mktemp("bad-values")

    def _render_error(chart: Path = CHART, values: dict[str, Any] | None = None, *args: str) -> str:
        proc = _template(helm, chart, values, args, tmp, "rel")
        assert proc.returncode != 0, f"helm template succeeded but should have failed:\n{proc.stdout[:2000]}"
        return proc.stderr

    return _render_error


ALL_OPTIONAL = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "podDisruptionBudget": {"enabled": True},
    "dashboard": {"enabled": True},
}

