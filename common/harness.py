"""The layer harness: one normalisation layer of a framework run on numpy arrays, for the tests.

Each frameworks/<fw>/harness.py implements the Harness protocol (its run_norm); everything else a test asks
of a single layer is built here on top of it, once: run_batch_norm is BN's case of run_norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import ModelSpec


class Harness(Protocol):
    def run_norm(
        self, spec: ModelSpec, x: np.ndarray, state: dict, dy: np.ndarray, *, training: bool, dtype: str
    ) -> dict:
        """One layer of spec.norm / spec.variant (any normalisation, common.norms) on canonical NCHW / NC numpy
        x: state maps the canonical suffixes of common.init.norm_suffixes(spec) to arrays; one forward in the
        given mode, then a backward of sum(dy * y). Returns y, dx, dgamma, dbeta; "after_forward", the layer's
        arrays right after the forward (for MXNet's scratch layers, what the forward returns: a recorded graph
        cannot be written to, so the layer stores them after the backward), and "state", its arrays after both
        (MXNet's built-in BatchNorm writes its running statistics in the backward on the CPU); as numpy
        (float64 in PyTorch, TensorFlow and JAX, the run's dtype in MXNet); and, in the frameworks that run mixed
        precision, "dtypes": the framework dtype name of y and of each state array. dtype "mixed-bfloat16": the
        layer as the framework's mixed-precision mechanism builds it (float32 parameters), its input and dy in
        bfloat16. A norm without a fitting built-in layer, or a framework without a mixed mechanism, raises
        BackendUnavailable, as the model does; bad input raises ValueError, as the layer does."""


@dataclass
class BNResult:
    """One BN layer's forward and backward, as numpy (see run_batch_norm)."""

    y: np.ndarray
    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray
    mean_after_forward: np.ndarray  # running statistics right after the forward...
    var_after_forward: np.ndarray
    mean_after_backward: np.ndarray  # ...and after the backward (MXNet on the CPU updates here)
    var_after_backward: np.ndarray


def run_batch_norm(
    harness: Harness,
    kind: str,
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    dy,
    *,
    training: bool,
    decay: float,
    epsilon: float,
    dtype: str,
) -> BNResult:
    """One BN layer: kind "scratch" is the project's batch_norm layer, "builtin" the framework's layer set to
    decay/epsilon, "builtin-defaults" the framework's layer as constructed by default (decay/epsilon ignored)."""
    spec = ModelSpec(variant=kind, decay=decay, epsilon=epsilon)
    state = {"gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var}
    out = harness.run_norm(spec, x, state, dy, training=training, dtype=dtype)
    forward, after = out["after_forward"], out["state"]
    return BNResult(
        y=out["y"],
        dx=out["dx"],
        dgamma=out["dgamma"],
        dbeta=out["dbeta"],
        mean_after_forward=forward["running_mean"],
        var_after_forward=forward["running_var"],
        mean_after_backward=after["running_mean"],
        var_after_backward=after["running_var"],
    )
