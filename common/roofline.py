"""The normalisation layer against the machine's memory bandwidth: what compare.bench --layer measures.

BN does almost no arithmetic (a few operations per value), so its limit is the memory it must move. In training
mode, one forward and backward of a layer over N activation values must at least

- forward: read x, write y (2 N values);
- backward: read dy and x, write dx (3 N values);
- per channel: read gamma, beta and the running mean and variance and write the two running statistics in the
  forward, read gamma and write dgamma and dbeta in the backward (9 C values).

That is the layer's minimal traffic, `norm_bytes`: (5 N + 9 C) values of the dtype's size. An implementation that
reads x twice in the forward (once for the statistics, once to normalise) and x and dy twice in the backward (the
two sums, then dx) moves 8 N: at full bandwidth it reaches 5/8 of this roofline, the most a two-pass layer can.

The bandwidth is a STREAM triad, a = b + s c, on arrays as large as the layer's input, in the framework's own
fused kernel (frameworks/<fw>/bare.py triad_step), and numpy's a = b + c (`numpy_add`), each 3 values moved per
element as STREAM counts them (`triad_bytes`), timed in the same worker and alternating with the layers
(`time_alternating`); the faster of the two in each round is the memory's speed (a framework's per-call
dispatch can slow its own triad at small sizes, and numpy runs on one core). Measured at the layer's size, so
on a CPU whose caches hold the arrays both figures are cache bandwidth, and the fraction compares like with like.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .config import ModelSpec
from .init import CHANNELS

KERNEL = 5  # BN-LeNet's convolutions: 5 x 5, valid, stride 1, each followed by 2 x 2 pooling

ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def norm_input_shapes(spec: ModelSpec, batch_size: int) -> dict:
    """The NCHW shape of the input of each convolution's normalisation (bn1 after conv1, bn2 after conv2) in
    BN-LeNet at the spec's image size: at 28 x 28, (B, 6, 24, 24) and (B, 16, 8, 8)."""
    side1 = spec.side - KERNEL + 1
    side2 = side1 // 2 - KERNEL + 1
    return {
        "bn1": (batch_size, CHANNELS["conv1"], side1, side1),
        "bn2": (batch_size, CHANNELS["conv2"], side2, side2),
    }


def norm_bytes(shape, dtype: str) -> int:
    """The minimal memory traffic of one training-mode forward and backward of a normalisation layer over an NCHW
    input of `shape` (the module docstring's count): (5 N + 9 C) values."""
    values = math.prod(shape)
    return (5 * values + 9 * shape[1]) * ITEMSIZE[dtype]


def triad_bytes(elements: int, dtype: str) -> int:
    """The memory traffic STREAM counts for a triad over `elements` values: read b and c, write a."""
    return 3 * elements * ITEMSIZE[dtype]


def numpy_add(elements: int, dtype: str):
    """STREAM's add, a = b + c, over `elements` values in numpy (one kernel, one core): a call that runs one."""
    rng = np.random.RandomState(0)
    b, c = (rng.standard_normal(elements).astype(dtype) for _ in "bc")
    a = np.empty_like(b)
    return lambda: np.add(b, c, out=a)


def memory_rates(nbytes: int, *seconds_per_round) -> list:
    """Each round's memory bandwidth: the fastest of the given kernels' rates (each moving nbytes) in that
    round."""
    return [max(bytes_per_s(nbytes, s) for s in one) for one in zip(*seconds_per_round)]


def bytes_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds


def calls_for(once, seconds: float = 0.05, most: int = 1000) -> int:
    """How many calls of `once` (a callable that runs and waits, untimed here) fill about `seconds`: timed one
    call at a time, a layer of a few microseconds would measure the timer."""
    began = time.perf_counter()
    once()
    took = time.perf_counter() - began
    return max(1, min(most, math.ceil(seconds / max(took, 1e-9))))


def time_alternating(steps: dict, rounds: int, seconds: float = 0.05) -> dict:
    """Each step's seconds per call in each of `rounds` rounds. A round times every step in turn (the order
    rotating each round), each over as many calls as fill about `seconds`, fixed after two untimed warm-up
    calls (which compile, in a compiled mode); so the steps of one round ran next to each other, and a ratio
    taken within a round cancels the machine's drift (compare.reporting.stats.paired_ratio)."""
    names = list(steps)
    for name in names:
        steps[name]()
    calls = {name: calls_for(steps[name], seconds) for name in names}
    out = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            began = time.perf_counter()
            for _ in range(calls[name]):
                steps[name]()
            out[name].append((time.perf_counter() - began) / calls[name])
    return out
