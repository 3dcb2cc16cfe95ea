"""The one list of framework names, and the only deferred framework import.

tox envs, pytest ids, CLI choices and report columns all follow FRAMEWORKS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import BackendUnavailable, ConfigError


@dataclass(frozen=True)
class FrameworkInfo:
    name: str  # the name users type: --frameworks torch,mxnet
    import_name: str  # the module whose import proves the framework is there
    tox_env: str  # the tox environment that holds it
    label: str  # how reports print it
    nodes: bool = False  # whether its --replicas can span machines (--replica-nodes, docs/clusters.md)


FRAMEWORKS = {
    "torch": FrameworkInfo("torch", "torch", "torch", "PyTorch", nodes=True),
    "mxnet": FrameworkInfo("mxnet", "mxnet", "mxnet", "MXNet Gluon"),
    "tensorflow": FrameworkInfo("tensorflow", "tensorflow", "tensorflow", "TensorFlow/Keras"),
    "jax": FrameworkInfo("jax", "flax", "jax", "JAX/Flax"),  # flax imports jax: one proves both
}


# not a framework of the comparison: the env where compare.port --onnx-import brings ONNX models back into PyTorch
# (frameworks/torch/onnx_import.py)
ONNX_IMPORTER = FrameworkInfo("onnx2torch", "onnx2torch", "onnx-import", "PyTorch (onnx2torch)")


def framework_info(name: str) -> FrameworkInfo:
    try:
        return FRAMEWORKS[name]
    except KeyError:
        raise ConfigError(f"unknown framework {name!r}; choose from {', '.join(FRAMEWORKS)}") from None


def parse_frameworks(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError("no framework given; e.g. --frameworks torch,mxnet")
    for name in names:
        framework_info(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"framework listed twice in {text!r}")
    return names


def load_backend_module(name: str, module: str = "backend"):
    """Import frameworks.<name>.<module> (backend, or textbook for the benchmark);
    an ImportError says which env to create."""
    info = framework_info(name)
    try:
        return importlib.import_module(f"frameworks.{name}.{module}")
    except ImportError as exc:
        raise BackendUnavailable(
            f"cannot import {info.label} in this Python ({exc}). Run it in its own "
            f"environment: `tox -e {info.tox_env} --notest` creates one, or pass "
            f"--python {name}=/path/to/python"
        ) from exc
