"""Porting a trained BN model between frameworks, and the plausible mistakes of a port, on canonical arrays.

A port done right moves the canonical arrays (common.init: PyTorch's layout, flatten order (C, H, W)) and each
framework's backend lays them out its own way (common.layout), with the same epsilon and in eval mode: the
target then computes the source's function, exactly in float64. Each MISTAKE is one thing a porter plausibly
gets wrong, applied on purpose so that its cost can be measured beside the right port:

- `epsilon`: the target's layer left at its own default epsilon where the source trained with another (Keras'
  1e-3 where PyTorch, MXNet and Flax default to 1e-5, the suite's);
- `flatten`: the first dense layer's weights copied from a channels-last framework (rows in (H, W, C) order)
  into a channels-first one without reordering them, or the reverse;
- `variance`: the running variance "corrected" from unbiased to biased (times (m - 1) / m, m the values per
  channel of a training batch) where the source already stored what the target divides by;
- `gamma`: gamma ignored, as MXNet's `BatchNorm(fix_gamma=True)`, its default, does;
- `train-mode`: the target evaluated in train mode (PyTorch's missing `model.eval()`, Flax's
  `use_running_average=False`), each test batch normalised with its own statistics;
- `momentum`: PyTorch's momentum 0.1 copied into a framework whose momentum is the decay (Keras, Flax, MXNet):
  decay 0.1 where it was 0.9, which shows only once the target trains, so the port and the right one are each
  fine-tuned for one epoch in the target before they are compared.

numpy only; the frameworks evaluate (compare.execution.worker's port mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelSpec, RunConfig
from .norms import NORM_NAMES


@dataclass(frozen=True)
class Mistake:
    name: str
    what: str  # in words, as the porting guide's table says it


MISTAKES = {
    m.name: m
    for m in (
        Mistake("epsilon", "the target's default epsilon"),
        Mistake("flatten", "fc1's rows in the other flatten order"),
        Mistake("variance", "running variance 'corrected' by (m - 1) / m"),
        Mistake("gamma", "gamma ignored (MXNet's fix_gamma)"),
        Mistake("train-mode", "evaluated in train mode"),
        Mistake("momentum", "momentum 0.1 read as the decay, then one epoch of fine-tuning"),
    )
}
WRONG_DECAY = 0.1  # PyTorch's momentum 0.1 taken for the decay (Keras' and Flax's momentum, MXNet's momentum)


def values_per_channel(spec: ModelSpec, layer: str, batch_size: int) -> int:
    """m: how many values a training batch gives each channel of a normalisation layer (batch x H x W after a
    convolution, the batch after a dense layer)."""
    conv1 = spec.side - 4  # 5 x 5 convolutions without padding, 2 x 2 pooling (common.init)
    side = {"bn1": conv1, "bn2": conv1 // 2 - 4}.get(layer, 1)
    return batch_size * side * side


def flatten_permuted(weight: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """fc1's weight (out, C x H x W) with its columns in (H, W, C) order, as a channels-last framework's kernel
    transposed without reordering them."""
    side = spec.flat_side
    out = weight.shape[0]
    return weight.reshape(out, 16, side, side).transpose(0, 2, 3, 1).reshape(out, -1)


def apply(mistake: str, params: dict, config: RunConfig) -> dict:
    """Canonical parameters as the mistaken port leaves them (the mistakes that act on the arrays; `epsilon`,
    `train-mode` and `momentum` act on the target's configuration or evaluation and leave them as they are)."""
    if mistake not in MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}; one of {', '.join(MISTAKES)}")
    spec = config.model
    out = dict(params)
    if mistake == "flatten":
        out["fc1.weight"] = flatten_permuted(np.asarray(params["fc1.weight"]), spec).astype(params["fc1.weight"].dtype)
    elif mistake in ("variance", "gamma"):
        for layer in (NORM_NAMES[p] for p in spec.norm_positions):
            if mistake == "gamma" and f"{layer}.gamma" in params:
                out[f"{layer}.gamma"] = np.ones_like(params[f"{layer}.gamma"])
            if mistake == "variance" and f"{layer}.running_var" in params:
                m = values_per_channel(spec, layer, config.batch_size)
                out[f"{layer}.running_var"] = (params[f"{layer}.running_var"] * ((m - 1) / m)).astype(
                    params[f"{layer}.running_var"].dtype
                )
    return out
