"""Canonical (PyTorch, channels-first) arrays <-> the channels-last layout of TensorFlow and JAX/Flax.

numpy only. Both channels-last frameworks store a conv kernel as (kh, kw, in, out)
and a dense kernel as (in, out), and flatten NHWC feature maps in (H, W, C) order:
- conv kernel (O, I, kh, kw) <-> (kh, kw, I, O);
- dense kernel (out, in) <-> (in, out);
- fc1 follows the flatten, so its input rows are also permuted between the canonical
  (C, H, W) order and (H, W, C);
- everything else (biases, BN vectors) is the same in both.
"""

from __future__ import annotations

import numpy as np


def to_channels_last(name: str, value, spec):
    """A canonical array (name as in common.init) -> the layout of its channels-last variable."""
    layer, suffix = name.split(".")
    if suffix != "weight":
        return value
    if layer.startswith("conv"):
        return value.transpose(2, 3, 1, 0)
    if layer == "fc1":  # rows from (C, H, W) to (H, W, C) flatten order
        side = spec.flat_side
        return value.reshape(-1, 16, side, side).transpose(2, 3, 1, 0).reshape(spec.flat_size, -1)
    return value.T


def from_channels_last(name: str, value, spec):
    """The inverse of to_channels_last."""
    layer, suffix = name.split(".")
    if suffix != "weight":
        return value
    if layer.startswith("conv"):
        return value.transpose(3, 2, 0, 1)
    if layer == "fc1":  # rows from (H, W, C) back to (C, H, W) flatten order
        side = spec.flat_side
        return value.reshape(side, side, 16, -1).transpose(3, 2, 0, 1).reshape(-1, spec.flat_size)
    return value.T


def nchw_to_nhwc(x) -> np.ndarray:
    """Images or BN inputs (N, C, H, W) -> (N, H, W, C); 2-D (N, C) arrays are returned as they are."""
    x = np.asarray(x)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


def nhwc_to_nchw(x) -> np.ndarray:
    x = np.asarray(x)
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x
