"""The float64 reference itself: checked against finite differences and by hand."""

import numpy as np
import pytest

from common.config import ModelSpec
from common.init import init_params, parameter_shapes
from common.reference import batch_norm_backward, batch_norm_forward, conv2d, lenet_forward, softmax_cross_entropy


def _inputs(shape, seed=0):
    rng = np.random.RandomState(seed)
    c = shape[1]
    return (
        rng.normal(0.5, 2.0, shape),
        rng.uniform(0.5, 1.5, c),
        rng.normal(0, 0.5, c),
        rng.normal(0, 1, c),
        rng.uniform(0.5, 2, c),
        rng.normal(0, 1, shape),
    )


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(shape, training):
    x, gamma, beta, rm, rv, dy = _inputs(shape)

    def loss(x_, g_, b_):
        return float(np.sum(dy * batch_norm_forward(x_, g_, b_, rm, rv, training=training)[0]))

    _, _, _, cache = batch_norm_forward(x, gamma, beta, rm, rv, training=training)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    h = 1e-6
    for arr, grad, name in ((x, dx, "x"), (gamma, dgamma, "gamma"), (beta, dbeta, "beta")):
        numeric = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args = {"x": (x, gamma, beta), "gamma": (x, gamma, beta), "beta": (x, gamma, beta)}[name]
            a_plus = [plus if a is arr else a for a in args]
            a_minus = [minus if a is arr else a for a in args]
            numeric[idx] = (loss(*a_plus) - loss(*a_minus)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7, err_msg=f"d{name}, training={training}")


def test_training_forward_and_running_update_by_hand():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])
    y, rm, rv, _ = batch_norm_forward(
        x, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), training=True, decay=0.9, epsilon=0.0
    )
    # column 0: mean 3, biased var 8/3; column 1: mean 12, biased var 8
    np.testing.assert_allclose(y[:, 0], (x[:, 0] - 3) / np.sqrt(8 / 3))
    np.testing.assert_allclose(rm, [0.3, 1.2])
    np.testing.assert_allclose(rv, [0.9 + 0.1 * 8 / 3, 0.9 + 0.1 * 8])


def test_eval_forward_uses_running_statistics_and_keeps_them():
    x = np.array([[2.0], [4.0]])
    y, rm, rv, _ = batch_norm_forward(
        x, np.array([2.0]), np.array([1.0]), np.array([1.0]), np.array([4.0]), training=False, epsilon=0.0
    )
    np.testing.assert_allclose(y[:, 0], [2 * (2 - 1) / 2 + 1, 2 * (4 - 1) / 2 + 1])
    np.testing.assert_array_equal(rm, [1.0])
    np.testing.assert_array_equal(rv, [4.0])


def test_bad_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="2-D or 4-D"):
        batch_norm_forward(np.zeros((2, 3, 4)), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True)


def test_conv2d_matches_a_direct_loop():
    rng = np.random.RandomState(1)
    x, w, b = rng.normal(size=(2, 3, 7, 6)), rng.normal(size=(4, 3, 3, 2)), rng.normal(size=4)
    out = conv2d(x, w, b)
    direct = np.zeros((2, 4, 5, 5))
    for n in range(2):
        for o in range(4):
            for i in range(5):
                for j in range(5):
                    direct[n, o, i, j] = np.sum(x[n, :, i : i + 3, j : j + 2] * w[o]) + b[o]
    np.testing.assert_allclose(out, direct, rtol=1e-12)


def test_lenet_forward_shapes_and_cross_entropy():
    spec = ModelSpec()
    params = init_params(spec, 0, "float64")
    assert set(params) == set(parameter_shapes(spec))
    x = np.random.RandomState(0).uniform(size=(5, 1, 28, 28))
    logits, stats = lenet_forward(params, spec, x, training=True)
    assert logits.shape == (5, 10)
    assert sorted(stats) == ["bn1", "bn2", "bn3", "bn4"]
    labels = np.array([0, 1, 2, 3, 4])
    z = logits - logits.max(1, keepdims=True)
    expected = -np.mean(z[np.arange(5), labels] - np.log(np.exp(z).sum(1)))
    assert softmax_cross_entropy(logits, labels) == pytest.approx(expected, rel=1e-12)
