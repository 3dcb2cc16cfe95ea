"""Finds or creates each framework's Python environment.

Order: an explicit --python fw=PATH; the current interpreter if it can import
the framework; an existing tox env; creating that tox env; otherwise a clear
error saying how to get one. Import checks run in a subprocess, so the
orchestrator itself never imports a framework.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from common.errors import BackendUnavailable
from common.registry import framework_info

ROOT = Path(__file__).resolve().parents[2]  # the repository


def can_import(python: str, module: str) -> tuple:
    """(ok, message) for `python -c "import module"`, run in a subprocess."""
    try:
        proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if proc.returncode == 0:
        return True, ""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


def version(python: str, module: str) -> str:
    """module.__version__ as `python` imports it (in a subprocess: the orchestrator imports no framework)."""
    code = f"import {module}; print(getattr({module}, '__version__', '?'))"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else "?"


def source(framework: str, python: str, explicit: dict) -> str:
    """Where a framework's interpreter came from: --python, this Python, or its tox env."""
    if framework in explicit:
        return "--python"
    if python is None:
        return "the cluster's nodes"
    return "this Python" if Path(python) == Path(sys.executable) else "its tox env"


def tox_python(env: str, root: Path = ROOT) -> Path:
    work = Path(os.environ.get("TOX_WORK_DIR", root / ".tox"))
    return work / env / "bin" / "python"


def tox_command() -> list | None:
    if shutil.which("tox"):
        return [shutil.which("tox")]
    probe = subprocess.run([sys.executable, "-c", "import tox"], capture_output=True)
    return [sys.executable, "-m", "tox"] if probe.returncode == 0 else None


def resolve(framework: str, explicit: dict, *, create: bool = True, log=print, info=None) -> str:
    info = info or framework_info(framework)
    if framework in explicit:
        given = explicit[framework]
        # absolute, so that it works from the folders the checks and workers run in
        python = str(Path(given).absolute()) if Path(given).is_file() else shutil.which(given)
        if python is None:
            raise BackendUnavailable(f"--python {framework}={given}: no such interpreter")
        ok, why = can_import(python, info.import_name)
        if not ok:
            raise BackendUnavailable(f"--python {framework}={given} cannot import {info.import_name}: {why}")
        return python
    if can_import(sys.executable, info.import_name)[0]:
        found = version(sys.executable, info.import_name)
        log(
            f"[{framework}] this Python ({sys.executable}) has {info.label} {found}: running it here, not in the "
            f"pinned tox env '{info.tox_env}' (--python {framework}=PATH chooses another)"
        )
        return sys.executable
    python = tox_python(info.tox_env)
    if python.is_file():
        ok, why = can_import(str(python), info.import_name)
        if ok:
            return str(python)
        log(
            f"[{framework}] the tox env at {python.parent.parent} cannot import "
            f"{info.import_name} ({why}); recreating it"
        )
    hint = (
        f"create it with `tox -e {info.tox_env} --notest` (pip install tox first), "
        f"or pass --python {framework}=/path/to/python of an environment with {info.label}"
    )
    if not create:
        raise BackendUnavailable(f"no environment with {info.label} found; {hint}")
    tox = tox_command()
    if tox is None:
        raise BackendUnavailable(f"no environment with {info.label} found and tox is not installed; {hint}")
    log(f"[{framework}] creating the tox env '{info.tox_env}' (once; this downloads {info.label})")
    proc = subprocess.run(
        tox + ["-e", info.tox_env, "--notest", "--recreate"]
        if python.is_file()
        else tox + ["-e", info.tox_env, "--notest"],
        cwd=ROOT,
        stdout=sys.stderr,
        stderr=sys.stderr,
    )
    if proc.returncode != 0 or not python.is_file():
        raise BackendUnavailable(
            f"creating the tox env '{info.tox_env}' failed (exit {proc.returncode}); see the output above; {hint}"
        )
    ok, why = can_import(str(python), info.import_name)
    if not ok:
        raise BackendUnavailable(f"the new tox env '{info.tox_env}' cannot import {info.import_name}: {why}")
    return str(python)
