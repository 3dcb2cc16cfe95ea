"""Ray and MLflow are the orchestrator's optional packages (compare.execution.extras): installed on first use
into this repository's own tox envs, never behind the user's back elsewhere. Framework-free; the install
itself is exercised by tox -e ray and tox -e tracking, whose envs hold the pinned versions."""

import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from compare.execution import extras

ROOT = Path(__file__).resolve().parent.parent


def test_only_this_repositorys_tox_envs_count_as_our_own(monkeypatch):
    monkeypatch.delenv("TOX_WORK_DIR", raising=False)
    assert extras.in_own_tox_env(str(ROOT / ".tox" / "run"))
    assert not extras.in_own_tox_env(str(ROOT / ".tox" / "run" / "lib"))
    assert not extras.in_own_tox_env(str(ROOT / ".venv"))
    assert not extras.in_own_tox_env("/usr")
    monkeypatch.setenv("TOX_WORK_DIR", "/somewhere/else")
    assert extras.in_own_tox_env("/somewhere/else/study") and not extras.in_own_tox_env(str(ROOT / ".tox" / "run"))


@pytest.mark.parametrize(
    "module, option, requirements",
    [("ray", "--executor ray", "requirements/ray.txt"), ("mlflow", "--mlflow", "requirements/tracking.txt")],
)
def test_outside_a_tox_env_the_error_says_how_to_install(module, option, requirements, monkeypatch):
    """Elsewhere nothing is installed: the error names the option, the package and the one command."""
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ConfigError) as err:
        extras.ensure(module, prefix="/usr")
    text = str(err.value)
    assert text.startswith(f"{option} needs {module}") and f"-m pip install -r {requirements}" in text
    assert "tox -e run" in text
    pinned = (ROOT / requirements).read_text()
    assert f"{module}==" in pinned  # a pinned version, as every other dependency


def test_an_installed_extra_is_simply_imported(monkeypatch):
    calls = []
    monkeypatch.setattr(extras.subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.setitem(sys.modules, "ray", sys)  # importable: any module object
    extras.ensure("ray", prefix="/usr")
    assert calls == []  # no pip
