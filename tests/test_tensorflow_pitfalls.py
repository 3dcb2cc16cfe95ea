"""Keras 3's own BN pitfalls (CONVENTIONS.md 7-8), shown on BatchNormalization.

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
    return rng.normal(2, 3, (16, 3)), rng.uniform(0.5, 2, 3), rng.normal(0, 1, 3), rng.normal(0, 1, 3), \
        rng.uniform(0.5, 2, 3)


def test_a_plain_call_is_inference(keras):
    """Pitfall 7 (and the textbook's TF slip): without training=True, BN never uses batch statistics."""
    x, gamma, beta, rm, rv = _inputs()
    layer = _layer(keras, gamma, beta, rm, rv)
    np.testing.assert_allclose(np.asarray(layer(x)), batch_norm_forward(x, gamma, beta, rm, rv, training=False)[0],
                               rtol=1e-9)
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
    np.testing.assert_allclose(np.asarray(y), batch_norm_forward(x, gamma, beta, rm, rv, training=False)[0],
                               rtol=1e-9)
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
