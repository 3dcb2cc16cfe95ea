"""MXNet's own BN pitfalls (CONVENTIONS.md 4-6), shown on the built-in operator and layer.

MXNet-specific by nature, so this module runs in the mxnet environment only.
"""
import numpy as np
import pytest

from common.reference import batch_norm_forward


FRAMEWORK = "mxnet"


@pytest.fixture(scope="module")
def mx(native):
    return native


def _inputs(seed=0, n=16, c=3):
    rng = np.random.RandomState(seed)
    return (rng.normal(2, 3, (n, c)), rng.uniform(0.5, 2, c), rng.normal(0, 1, c),
            rng.normal(0, 1, c), rng.uniform(0.5, 2, c))


def test_raw_operator_defaults_fix_gamma_and_eps_1e3(mx):
    """Pitfall 4: nd.BatchNorm ignores gamma (fix_gamma=True) and uses eps 1e-3 unless told."""
    from mxnet import autograd, nd
    x, gamma, beta, rm, rv = _inputs()
    args = [nd.array(a, dtype="float64") for a in (x, gamma, beta, rm, rv)]
    with autograd.record(train_mode=True):
        y = nd.BatchNorm(*args)
    want, _, _, _ = batch_norm_forward(x, np.ones(3), beta, rm, rv, training=True, epsilon=1e-3)
    np.testing.assert_allclose(y.asnumpy(), want, rtol=1e-9, err_msg="defaults: gamma ignored, eps 1e-3")
    np.testing.assert_array_equal(args[1].asnumpy(), 1.0, err_msg="the caller's gamma was overwritten with 1")
    args[1] = nd.array(gamma, dtype="float64")
    with autograd.record(train_mode=True):
        y = nd.BatchNorm(*args, fix_gamma=False, eps=1e-5)
    want, _, _, _ = batch_norm_forward(x, gamma, beta, rm, rv, training=True, epsilon=1e-5)
    np.testing.assert_allclose(y.asnumpy(), want, rtol=1e-9, err_msg="fix_gamma=False, eps=1e-5: the spec")


def test_gluon_layer_is_in_inference_mode_outside_record(mx):
    """Pitfall 6: the mode is autograd's training flag, not 'the layer was created for training'."""
    from mxnet import autograd, nd
    from mxnet.gluon import nn
    x, gamma, beta, rm, rv = _inputs()
    layer = nn.BatchNorm(in_channels=3)
    layer.initialize()
    layer.cast("float64")
    for name, value in zip(("gamma", "beta", "running_mean", "running_var"), (gamma, beta, rm, rv)):
        getattr(layer, name).set_data(nd.array(value, dtype="float64"))
    plain = layer(nd.array(x, dtype="float64")).asnumpy()
    np.testing.assert_allclose(plain, batch_norm_forward(x, gamma, beta, rm, rv, training=False)[0], rtol=1e-9)
    with autograd.record():  # train_mode=True by default
        recorded = layer(nd.array(x, dtype="float64")).asnumpy()
    np.testing.assert_allclose(recorded, batch_norm_forward(x, gamma, beta, rm, rv, training=True)[0], rtol=1e-9)


def test_one_value_per_channel_is_silently_beta(mx):
    """The built-in layer does not refuse a one-example training batch: it outputs beta."""
    from mxnet import autograd, nd
    from mxnet.gluon import nn
    layer = nn.BatchNorm(in_channels=3)
    layer.initialize()
    layer.beta.set_data(nd.array([0.5, -1.0, 2.0]))
    with autograd.record():
        y = layer(nd.array([[3.0, 4.0, 5.0]]))
    np.testing.assert_allclose(y.asnumpy(), [[0.5, -1.0, 2.0]], atol=1e-6)
