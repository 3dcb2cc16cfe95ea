"""common and compare import no framework (checked in a fresh interpreter)."""
import json
import subprocess
import sys
from pathlib import Path

from common.registry import FRAMEWORKS

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["common.config", "common.data", "common.init", "common.reference", "common.interface",
           "common.loop", "common.records", "common.registry", "compare.run", "compare.report",
           "compare.envs", "compare.worker", "compare.progress", "compare.bench", "compare.stats", "common.layout",
           "common.population", "compare.tracking", "compare.study"]
# every framework's top-level package, and the one each registry entry imports to prove it (flax for jax)
PACKAGES = sorted(set(FRAMEWORKS) | {info.import_name for info in FRAMEWORKS.values()})


def test_common_and_compare_import_no_framework():
    code = (f"import importlib, json, sys\nfor m in {MODULES!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], "a framework was imported by common/compare"
