"""Imports run one way (design.md, Layers): each module imports only from its own tier or below,
observers are imported only by the wiring, nothing imports the mock upstream, and there is no
cycle. Parsed from the source, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

TIERS: tuple[frozenset[str], ...] = (
    # pure decisions and the data they read: no sockets, no clock reads of their own
    frozenset({"units", "masking", "classify", "backoff", "budget", "headers", "sse", "routes", "retry", "upstreams", "config",
               "errors", "events"}),
    frozenset({"breaker", "policy"}),  # live per-route state, built once
    frozenset({"body", "upstream", "client"}),  # one attempt's I/O
    frozenset({"attempt", "resume"}),  # the loop
    frozenset({"relay"}),  # the commit
    frozenset({"runtime", "handler"}),  # the running config, and the handler that reads it
    frozenset({"logs", "metrics", "exposition", "process_metrics"}),  # observers: they receive events, nobody below the wiring imports them
    frozenset({"reload", "app", "server", "workers", "__main__", "__init__"}),  # wiring
)
MOCK = "testing"  # the fault-injecting mock upstream: a tool of its own, imported by no proxy module


def tier(module: str) -> int:
    for i, members in enumerate(TIERS):
        if module in members:
            return i
    raise AssertionError(f"proxy/{module}.py is in no layer: add it to TIERS in {__file__}")


def imports(path: Path) -> set[str]:
    """The proxy modules `path` imports (`from . import x`, `from .x import y`, `import proxy.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "proxy":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("proxy."))
    return found - {"__version__"}  # `from . import __version__` is the package's own attribute


def graph() -> dict[str, set[str]]:
    return {p.stem: imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def test_every_import_points_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        if module == MOCK:
            continue
        for target in targets:
            if target == MOCK:
                wrong.append(f"{module} imports the mock upstream ({MOCK})")
            elif tier(target) > tier(module):
                wrong.append(f"{module} (tier {tier(module)}) imports {target} (tier {tier(target)})")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(sorted(wrong))


def test_the_mock_upstream_imports_no_proxy_module():
    if (PACKAGE / f"{MOCK}.py").exists():
        assert imports(PACKAGE / f"{MOCK}.py") == set()


def test_no_import_cycles():
    g = graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(g.get(node, ())):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(node)

    done: set[str] = set()
    for module in sorted(g):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_modules_and_functions_stay_small():
    """No module over 400 lines and no function over 60 (issue 14): a newcomer reads each whole.
    The mock upstream is a tool of its own and not counted."""
    big = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == MOCK:
            continue
        text = path.read_text()
        if text.count("\n") > 400:
            big.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    big.append(f"{path.name}: {node.name}() is {length} lines")
    assert not big, "too large to read whole:\n" + "\n".join(big)
