"""common and compare import no framework (checked in a fresh interpreter)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.registry import FRAMEWORKS

pytestmark = pytest.mark.every_env  # the framework installed in each env is what these check against

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "common.config",
    "common.data",
    "common.init",
    "common.reference",
    "common.interface",
    "common.loop",
    "common.records",
    "common.registry",
    "compare.run",
    "compare.report",
    "compare.execution.envs",
    "compare.execution.worker",
    "compare.execution.progress",
    "compare.bench",
    "compare.reporting.stats",
    "common.layout",
    "common.population",
    "compare.reporting.tracking",
    "compare.study",
    "compare.port",
    "compare.job",
    "compare.reporting.figures",
    "compare.reporting.images",
    "common.fold",
]
# every framework's top-level package, and the one each registry entry imports to prove it (flax for jax)
PACKAGES = sorted(set(FRAMEWORKS) | {info.import_name for info in FRAMEWORKS.values()})


def test_common_and_compare_import_no_framework():
    code = (
        f"import importlib, json, sys\nfor m in {MODULES!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], "a framework was imported by common/compare"


def compare_modules() -> dict:
    """compare's modules (dotted name -> path)."""
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted((ROOT / "compare").rglob("*.py"))
    }


def test_compare_has_no_import_cycle_and_each_module_says_what_it_owns():
    """compare's folders show its jobs: every module opens with a docstring, and no module imports
    (at the top or inside a function) one that imports it back, however long the loop."""
    import ast

    modules = compare_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{name} has no docstring saying what it owns"
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"}
        graph[name] = edges

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return seen

    cycles = sorted(name for name in graph if name in reach(name))
    assert not cycles, f"modules in an import cycle: {cycles}"
    # the commands are thin: none imports another, and nothing they build on imports one (compare.job and the
    # reporting, studies and execution packages hold what they share)
    commands = {f"compare.{c}" for c in ("run", "study", "bench", "report", "port")}
    importing = {name: sorted(graph[name] & commands) for name in graph if graph[name] & commands}
    assert not importing, f"modules that import a command: {importing}"


def test_no_test_module_imports_another():
    """What tests share lives in modules made for it (tests/helpers.py, tests/made.py, tests/conventions.py, ...),
    so a test module can be read, moved or split on its own."""
    import ast

    tests = Path(__file__).resolve().parent
    importing = {}
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.test_"):
                importing.setdefault(path.name, []).append(node.module)
            elif isinstance(node, ast.Import):
                named = [a.name for a in node.names if a.name.startswith("tests.test_")]
                importing.setdefault(path.name, []).extend(named)
    assert not {k: v for k, v in importing.items() if v}, importing
