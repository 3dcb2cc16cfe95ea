"""The FLOP count (common.flops) against a count by hand, at the textbook's two input sizes, and the peak's."""

import pytest

from common.config import ModelSpec
from common.flops import forward_flops, layer_macs, matmul_gflops_per_s, training_flops


def test_lenet_multiply_adds_by_hand():
    # 28x28: conv1 5x5 -> 24x24x6, pool 12x12; conv2 5x5 over 6 channels -> 8x8x16, pool 4x4; fc 256-120-84-10
    at28 = {"conv1": 24 * 24 * 6 * 25, "conv2": 8 * 8 * 16 * 6 * 25, "fc1": 256 * 120, "fc2": 120 * 84, "fc3": 84 * 10}
    assert layer_macs(ModelSpec()) == at28
    assert sum(at28.values()) == 281_640
    # 96x96: conv1 -> 92x92x6, pool 46x46; conv2 -> 42x42x16, pool 21x21; fc1 takes 16 x 21 x 21 = 7,056 inputs
    at96 = {"conv1": 92 * 92 * 6 * 25, "conv2": 42 * 42 * 16 * 150, "fc1": 7056 * 120, "fc2": 120 * 84, "fc3": 840}
    assert layer_macs(ModelSpec(image_size=96)) == at96
    assert sum(at96.values()) == 6_360_840
    # padding to 32 is a 32x32 input as far as the arithmetic goes
    assert layer_macs(ModelSpec(input_size=32)) == layer_macs(ModelSpec(image_size=32))


def test_training_is_three_forwards_less_the_images_gradient():
    for spec in (ModelSpec(), ModelSpec(image_size=96)):
        macs = layer_macs(spec)
        assert forward_flops(spec) == 2 * sum(macs.values())
        assert training_flops(spec) == 3 * forward_flops(spec) - 2 * macs["conv1"]
    assert training_flops(ModelSpec()) == 2 * (3 * 281_640 - 86_400)


def test_the_peak_counts_two_flops_per_multiply_add():
    """A 2048 x 2048 product is 2048^3 = 8,589,934,592 multiply-adds, 17,179,869,184 FLOPs: in 0.5 s,
    34.359738368 GFLOP/s."""
    assert matmul_gflops_per_s(2048, 0.5) == pytest.approx(34.359738368, rel=1e-12)
    assert matmul_gflops_per_s(10, 1e-6) == pytest.approx(2.0, rel=1e-12)  # 2,000 FLOPs in 1 us: 2e9 per second
