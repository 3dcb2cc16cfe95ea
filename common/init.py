"""Seeded initial parameters of BN-LeNet in the canonical layout.

The canonical layout is PyTorch's: conv weight (out, in, kh, kw), dense weight
(out, in), flatten order (C, H, W). BN layers are named bn1..bn4 after the
layer they follow (whatever the normalisation, --norm) and hold gamma and beta (per
channel / feature), plus the state of its row of common.norms.NORMALISATIONS: running_mean and
running_var for batch, renorm, pit and pit-rank, and for renorm `steps`, the training steps it has
taken, which set its clipping limits; whiten keeps running_mean and running_cov, a (C, C)
covariance used only within its whitening groups' diagonal blocks (zero elsewhere), initially I.
Every backend converts to its own layout on load and back on export.
"""

from __future__ import annotations

import numpy as np

from .config import ModelSpec
from .norms import CHANNELS, NORM_NAMES, array_role


def norm_suffixes(spec: ModelSpec) -> tuple:
    """The canonical arrays of one normalisation layer of spec.norm (common.norms.NORMALISATIONS: its state)."""
    return ("gamma", "beta") + spec.row.state


def norm_state_shape(suffix: str, features: int) -> tuple:
    """The shape of one normalisation array of a layer of `features` channels (features)."""
    return {"steps": (1,), "running_cov": (features, features)}.get(suffix, (features,))


def layer_shapes(spec: ModelSpec) -> dict:
    """Weight shape of each conv/dense layer, in network order."""
    return {
        "conv1": (CHANNELS["conv1"], 1, 5, 5),
        "conv2": (CHANNELS["conv2"], CHANNELS["conv1"], 5, 5),
        "fc1": (CHANNELS["fc1"], spec.flat_size),
        "fc2": (CHANNELS["fc2"], CHANNELS["fc1"]),
        "fc3": (10, CHANNELS["fc2"]),
    }


def has_bias(spec: ModelSpec, layer: str) -> bool:
    """A layer followed by BN keeps its bias only when spec.bias_before_norm is set."""
    return not spec.norm_at(layer) or spec.bias_before_norm


def norm_features(spec: ModelSpec) -> dict:
    """Canonical normalisation layer name (bn1 ... bn4) -> number of features, for the layers the spec has."""
    shapes = layer_shapes(spec)
    return {NORM_NAMES[pos]: shapes[pos][0] for pos in NORM_NAMES if spec.norm_at(pos)}


def parameter_shapes(spec: ModelSpec) -> dict:
    """Every canonical array (trainable and BN running statistics), in network order."""
    out = {}
    for layer, shape in layer_shapes(spec).items():
        out[f"{layer}.weight"] = shape
        if has_bias(spec, layer):
            out[f"{layer}.bias"] = (shape[0],)
        if layer in NORM_NAMES and spec.norm_at(layer):
            bn = NORM_NAMES[layer]
            for suffix in norm_suffixes(spec):
                out[f"{bn}.{suffix}"] = norm_state_shape(suffix, shape[0])
    return out


def is_trainable(name: str, spec: ModelSpec) -> bool:
    suffix = name.split(".")[1]
    if array_role(name) != "parameter":  # running statistics and counters (the normalisations' table)
        return False
    if suffix in ("gamma", "beta"):
        return not spec.freeze_gamma_beta
    return True


def init_params(spec: ModelSpec, seed: int, dtype: str = "float32") -> dict:
    """Glorot-uniform weights, zero biases, gamma 1, beta 0, running mean 0, running var 1, running cov I, steps 0."""
    rng = np.random.RandomState([seed, 0, 2])  # RandomState: the same stream on numpy 1.23 and 2.x
    params = {}
    for name, shape in parameter_shapes(spec).items():
        suffix = name.split(".")[1]
        if suffix == "weight":
            receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            value = rng.uniform(-limit, limit, size=shape)
        elif suffix in ("gamma", "running_var"):
            value = np.ones(shape)
        elif suffix == "running_cov":
            value = np.eye(shape[0])
        else:  # bias, beta, running_mean, steps
            value = np.zeros(shape)
        params[name] = value.astype(dtype)
    return params


def check_params(params: dict, spec: ModelSpec) -> None:
    """Raise a ValueError naming every missing, extra or misshapen array."""
    expected = parameter_shapes(spec)
    problems = [f"missing {n}" for n in expected if n not in params]
    problems += [f"unexpected {n}" for n in params if n not in expected]
    problems += [
        f"{n} has shape {tuple(np.shape(params[n]))}, expected {s}"
        for n, s in expected.items()
        if n in params and tuple(np.shape(params[n])) != s
    ]
    if problems:
        raise ValueError("canonical parameters do not fit the model spec: " + "; ".join(problems))
