"""BN folded into the layer before it: the textbook's "equivalent transformation" of exercise 1, for inference.

In eval mode a BN layer is an affine map per channel, y = gamma (h - mean) / sqrt(var + eps) + beta with its
running statistics, so it can be merged into the convolution or dense layer h = w x + b before it:

    s = gamma / sqrt(var + eps)          (per output channel)
    w' = w * s                           (each output channel's filter, or each dense row, scaled)
    b' = (b - mean) * s + beta           (b = 0 where the layer has no bias)

and w' x + b' is the BN layer's output exactly, in exact arithmetic. The folded network is BN-LeNet without BN
(variant none) with these weights: the same function in eval mode, one pass over each layer's output fewer. It
cannot be done in training mode, where mean and var are the batch's and change with every batch.

Only BN and batch renormalisation (whose eval mode is BN's) fold this way, and only where the normalisation sits
between the layer and its activation (--norm-placement before_activation, the textbook's); a noisy run's eval
mode (--noise-eval expectation) folds with the noise's expectation already in gamma and beta. Everything is
numpy on canonical arrays (common.init), so every framework loads the result as it loads any parameters.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .config import ModelSpec
from .errors import ConfigError
from .init import has_bias, layer_shapes
from .norms import NORM_NAMES, noise_folded


def check_foldable(spec: ModelSpec) -> None:
    """A ConfigError saying why a model's normalisation cannot be folded into the layer before it."""
    if not spec.has_norm:
        raise ConfigError(f"variant {spec.variant} has no normalisation layer to fold")
    if spec.row.kind not in ("batch", "renorm"):
        raise ConfigError(
            f"--norm {spec.norm} does not fold into the layer before it: in eval mode only BN (and batch "
            "renormalisation, whose eval mode is BN's) is an affine map per channel"
        )
    if spec.norm_placement != "before_activation":
        raise ConfigError(
            "--norm-placement after_activation puts the activation between the layer and BN, so BN folds into "
            "the layer after it, not before; fold runs with the textbook's before_activation"
        )


def folded_spec(spec: ModelSpec) -> ModelSpec:
    """The model the folded parameters belong to: the same network without its normalisation layers."""
    check_foldable(spec)
    return replace(spec, variant="none", norm_noise=False, ghost_batch=0)


def fold(params: dict, spec: ModelSpec, epsilon: float) -> dict:
    """Canonical parameters of folded_spec(spec) from a trained model's (spec's, every normalisation layer's
    running statistics as its eval mode uses them: the canonical running_var is what the layer stores, biased or
    not, and eval mode divides by it), with epsilon the layers' own (a framework's default one for
    builtin-defaults: Backend.describe()'s bn_epsilon)."""
    check_foldable(spec)
    if spec.norm_noise and spec.noise_eval == "expectation":
        params = noise_folded(params, spec)
    target = folded_spec(spec)
    out = {}
    for layer, shape in layer_shapes(spec).items():
        weight = np.asarray(params[f"{layer}.weight"], np.float64)
        bias = np.asarray(params[f"{layer}.bias"], np.float64) if has_bias(spec, layer) else np.zeros(shape[0])
        if spec.norm_at(layer):
            bn = NORM_NAMES[layer]
            scale = np.asarray(params[f"{bn}.gamma"], np.float64) / np.sqrt(
                np.asarray(params[f"{bn}.running_var"], np.float64) + epsilon
            )
            weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            bias = (bias - np.asarray(params[f"{bn}.running_mean"], np.float64)) * scale + np.asarray(
                params[f"{bn}.beta"], np.float64
            )
        dtype = np.asarray(params[f"{layer}.weight"]).dtype
        out[f"{layer}.weight"] = weight.astype(dtype)
        if has_bias(target, layer):
            out[f"{layer}.bias"] = bias.astype(dtype)
    return out
