"""A run's precision (--precision): float32, float64, or mixed bfloat16, framework-free.

Mixed bfloat16 is each framework's own mixed-precision mechanism, switched on as its users would:
PyTorch `torch.autocast(dtype=torch.bfloat16)`, Keras' `mixed_bfloat16` dtype policy, Flax modules
with `dtype=bfloat16` and float32 `param_dtype`. The contract in every framework: parameters, the
optimizer update and the loss stay float32 (RunConfig.dtype is float32); convolutions and dense layers
compute in bfloat16.

The scratch BN layers in mixed precision follow one spec: the batch statistics (two passes) and the
running-statistics blend in float32 from the bfloat16 input, the normalisation in float32, the output
in the input's dtype. Computing the statistics in bfloat16 instead (8 bits of mantissa), as
E[x^2] - E[x]^2, cancels when |mean| >> std: at mean 1000 and std 1, E[x^2] = 1e6 has a bfloat16 ulp
of 4096 (tests/test_precision.py measures it).
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "float64", "mixed-bfloat16")
MIXED_PRECISIONS = {"mixed-bfloat16": "bfloat16"}  # precision -> the compute dtype of the mixed mechanism
# bfloat16 keeps 8 significant bits: a rounding moves a value by at most half an ulp, 2^-8 of it relative
BFLOAT16_EPS = 2.0**-8


def dtype_and_mixed(precision: str) -> tuple:
    """(dtype, mixed) of RunConfig for a --precision value."""
    if precision in MIXED_PRECISIONS:
        return "float32", MIXED_PRECISIONS[precision]
    return precision, "off"


def to_bfloat16(values) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even), returned as float32: numpy has no bfloat16."""
    a = np.ascontiguousarray(values, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).reshape(a.shape)
