"""The orchestrator's packages: the ones every report needs (checked before a run starts), and the optional
ones, Ray (for --executor ray), MLflow (for --mlflow) and ONNX Runtime (for compare.port's ONNX part).

A first run installs only what every run uses (requirements/compare.txt). Each
optional package is pinned in requirements/<name>.txt and installed the first
time an option needs it, with a line saying so, into the orchestrator's own
tox env (`tox -e run`, `study`, `bench`), as framework environments are
created on first use. Outside a tox env of this repository nothing is
installed behind the user's back: the error says the one command that does it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]  # the repository

# import name -> (what needs it, requirements file)
EXTRAS = {
    "ray": ("--executor ray", "requirements/ray.txt"),
    "mlflow": ("--mlflow", "requirements/tracking.txt"),
    "onnxruntime": ("compare.port's ONNX part (--no-onnx: without it)", "requirements/onnx.txt"),
}


# what writing a report takes (requirements/compare.txt): tables, Parquet, plots, intervals, progress bars
REPORTING = ("pandas", "pyarrow", "matplotlib", "scipy", "tqdm")


def require_reporting(command: str = "compare.run") -> None:
    """Import what a report needs, before anything runs: a Python without it fails here, in a second, with the
    line that installs it, instead of after the training."""
    missing = []
    for module in REPORTING:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(module)
        except Exception as exc:  # noqa: BLE001 - installed, but breaks while importing (a numpy it was not built for)
            missing.append(f"{module} ({type(exc).__name__}: {exc})")
    if missing:
        raise ConfigError(
            f"python -m {command} writes its report with {', '.join(REPORTING)}, and this Python "
            f"({sys.executable}) cannot import {', '.join(missing)}: install them with "
            f"`{sys.executable} -m pip install -r {ROOT / 'requirements' / 'compare.txt'}`, or run through tox "
            f"(`tox -e run -- ...`), which does"
        )


def in_own_tox_env(prefix: str | None = None) -> bool:
    """Whether this interpreter is one of this repository's tox envs (where installing is ours to do)."""
    work = Path(os.environ.get("TOX_WORK_DIR", ROOT / ".tox")).resolve()
    return Path(prefix or sys.prefix).resolve().parent == work


def ensure(module: str, *, log=None, prefix: str | None = None) -> None:
    """Import `module` (a key of EXTRAS), installing its pinned requirements first where this is one of the
    repository's tox envs; elsewhere a ConfigError says how to install it."""
    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    needed_by, requirements = EXTRAS[module]
    command = [sys.executable, "-m", "pip", "install", "-q", "-r", str(ROOT / requirements)]
    if not in_own_tox_env(prefix):
        raise ConfigError(
            f"{needed_by} needs {module}, which this environment ({sys.prefix}) lacks: install it "
            f"with `{Path(sys.executable).name} -m pip install -r {requirements}`, or run through "
            f"tox (`tox -e run -- ...`), which installs it on first use"
        )
    (log or (lambda text: print(text, file=sys.stderr, flush=True)))(
        f"{needed_by}: installing {module} into {sys.prefix} (once; pinned in {requirements})"
    )
    proc = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise ConfigError(
            f"{needed_by}: installing {module} failed (pip exit {proc.returncode}, output above); "
            f"try `{' '.join(command)}` yourself"
        )
    importlib.invalidate_caches()
    importlib.import_module(module)
