"""Keras 3's own BN pitfalls (docs/conventions.md), shown on BatchNormalization.

TensorFlow-specific by nature, so this module runs in the tensorflow environment only.
"""

import numpy as np
import pytest

from common.reference import batch_norm_forward

FRAMEWORK = "tensorflow"


@pytest.fixture(scope="module")
def keras(native):
    import keras  # comes with TensorFlow 2.16+

    return keras


def _layer(keras, gamma, beta, rm, rv, **kwargs):
    layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="float64", **kwargs)
    layer.build((None, len(gamma)))
    layer.set_weights([gamma, beta, rm, rv])  # Keras order: gamma, beta, moving_mean, moving_variance
    return layer


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    return (
        rng.normal(2, 3, (16, 3)),
        rng.uniform(0.5, 2, 3),
        rng.normal(0, 1, 3),
        rng.normal(0, 1, 3),
        rng.uniform(0.5, 2, 3),
    )


def test_a_plain_call_is_inference(keras):
    """Pitfall 7 (and the textbook's TF slip): without training=True, BN never uses batch statistics."""
    x, gamma, beta, rm, rv = _inputs()
    layer = _layer(keras, gamma, beta, rm, rv)
    np.testing.assert_allclose(
        np.asarray(layer(x)), batch_norm_forward(x, gamma, beta, rm, rv, training=False)[0], rtol=1e-9
    )
    np.testing.assert_array_equal(layer.get_weights()[3], rv)
    y = layer(x, training=True)
    want, _, new_var, _ = batch_norm_forward(x, gamma, beta, rm, rv, training=True)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-9)
    np.testing.assert_allclose(layer.get_weights()[3], new_var, rtol=1e-9)


def test_trainable_false_means_inference(keras):
    x, gamma, beta, rm, rv = _inputs()
    layer = _layer(keras, gamma, beta, rm, rv)
    layer.trainable = False
    y = layer(x, training=True)
    np.testing.assert_allclose(np.asarray(y), batch_norm_forward(x, gamma, beta, rm, rv, training=False)[0], rtol=1e-9)
    np.testing.assert_array_equal(layer.get_weights()[3], rv)


def test_float64_input_to_a_default_layer_becomes_float32(keras):
    y = keras.layers.BatchNormalization()(np.ones((4, 3), dtype=np.float64), training=True)
    assert str(y.dtype) == "float32" or getattr(y.dtype, "name", "") == "float32"


def test_one_value_per_channel_is_silently_beta(keras):
    layer = keras.layers.BatchNormalization(momentum=0.9)
    layer.build((None, 3))
    layer.set_weights([np.ones(3), np.array([0.5, -1.0, 2.0]), np.zeros(3), np.ones(3)])
    y = layer(np.array([[3.0, 4.0, 5.0]], dtype=np.float32), training=True)
    np.testing.assert_allclose(np.asarray(y), [[0.5, -1.0, 2.0]], atol=1e-6)
    np.testing.assert_allclose(layer.get_weights()[3], 0.9, rtol=1e-6)  # pulled toward a variance of 0


# The other normalisations' built-in layers (tests/conventions.py NORM_BUILTIN_EPSILON) ---------------------
def test_layer_normalization_over_a_feature_map_has_a_gamma_per_element(keras):
    """LayerNormalization(axis=[1, 2, 3]) learns H*W*C gammas, the spec one per channel: after a convolution
    the suite's built-in layer normalisation is GroupNormalization(groups=1)."""
    layer = keras.layers.LayerNormalization(axis=[1, 2, 3])
    layer.build((None, 24, 24, 6))
    assert tuple(layer.gamma.shape) == (24, 24, 6)
    group = keras.layers.GroupNormalization(groups=1)
    group.build((None, 24, 24, 6))
    assert tuple(group.gamma.shape) == (6,)


def test_batch_renormalization_does_not_follow_the_renorm_spec(keras):
    """Keras 3's BatchNormalization(renorm=True) exists, but (1) r and d come from a second pair of moving
    averages (renorm_mean, renorm_stddev, with renorm_momentum) and (2) it keeps a moving average of the
    standard deviation and derives the moving variance from it, (EMA of std)^2 - eps, not the EMA of the
    variance; its clipping limits are constants (no warm-up). --norm renorm --variants builtin is therefore
    a clear error, and this pins the difference: after two training steps the moving variance is not the
    spec's."""
    import tensorflow as tf

    rng = np.random.RandomState(3)
    eps, decay = 1e-3, 0.9
    layer = keras.layers.BatchNormalization(
        renorm=True,
        momentum=decay,
        epsilon=eps,
        renorm_momentum=decay,
        renorm_clipping={"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0},
        dtype="float64",
    )
    layer.build((None, 3))
    assert {"renorm_mean", "renorm_stddev", "moving_stddev"} <= {w.path.split("/")[-1] for w in layer.weights}
    spec_var = np.ones(3)
    for scale in (3.0, 0.5):
        x = rng.normal(1, scale, (64, 3))
        layer(tf.constant(x), training=True)
        spec_var = decay * spec_var + (1 - decay) * x.var(axis=0)
    got = layer.moving_variance.numpy()
    np.testing.assert_allclose(got, (layer.moving_stddev.numpy() ** 2 - eps), rtol=1e-12)
    assert np.min(np.abs(got / spec_var - 1)) > 1e-3, (got, spec_var)
