"""How much arithmetic BN-LeNet does per image: the FLOP count behind a throughput's fraction of the machine's peak.

Counted: the multiply-adds of the convolutions and dense layers, 2 FLOPs each (what a matrix unit does, and what
a peak matrix-product figure measures). Not counted: bias additions, normalisation, activations, pooling, the
loss and the SGD update: elementwise, a few operations per value against the 25 to 150 multiply-adds behind each
output of a convolution; so a fraction of peak computed from this count slightly understates the work done. Not
counted either, and not elementwise: --norm whiten's covariances, Newton-Schulz products and whitening products
(common.norms), so a whiten run's fraction of peak understates its work by more.

Training, per image: the forward, and in the backward each layer's weight gradient (as many multiply-adds as its
forward) and its input gradient (as many again), except the first convolution's, whose input is the image and
needs none: 3 x forward - conv1's forward.
"""

from __future__ import annotations

from .config import ModelSpec
from .init import layer_shapes

PEAK_MATMUL = 2048  # the side of the square matrix product whose speed compare.bench reports as the peak


def matmul_gflops_per_s(size: int, seconds: float) -> float:
    """The rate of an n x n by n x n matrix product that took `seconds`: n^3 multiply-adds, 2 FLOPs each, per
    second, in GFLOP/s (the peak compare.bench divides by)."""
    return 2 * size**3 / seconds / 1e9


def layer_macs(spec: ModelSpec) -> dict:
    """Multiply-adds per image of each convolution and dense layer's forward, in network order."""
    shapes = layer_shapes(spec)
    side = spec.side
    out = {}
    for layer, shape in shapes.items():
        if layer.startswith("conv"):
            channels_out, channels_in, kh, kw = shape
            side = side - kh + 1  # a valid convolution, stride 1
            out[layer] = channels_out * side * side * channels_in * kh * kw
            side //= 2  # the 2x2 pooling after it
        else:
            out[layer] = shape[0] * shape[1]
    return out


def forward_flops(spec: ModelSpec) -> int:
    """FLOPs of one image's forward (2 per multiply-add)."""
    return 2 * sum(layer_macs(spec).values())


def training_flops(spec: ModelSpec) -> int:
    """FLOPs of one image's training step: forward, weight gradients and input gradients (none for the image)."""
    macs = layer_macs(spec)
    return 2 * (3 * sum(macs.values()) - macs["conv1"])
