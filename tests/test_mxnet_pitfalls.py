"""MXNet's own BN pitfalls (docs/conventions.md), shown on the built-in operator and layer.

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
    return (
        rng.normal(2, 3, (n, c)),
        rng.uniform(0.5, 2, c),
        rng.normal(0, 1, c),
        rng.normal(0, 1, c),
        rng.uniform(0.5, 2, c),
    )


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


# The other normalisations' built-in blocks (tests/conventions.py NORM_BUILTIN_EPSILON) ----------------------
def test_gluon_group_norm_has_a_gamma_per_group_and_needs_a_feature_map(mx):
    """Gluon's GroupNorm (MXNet 1.9.1) learns one gamma and beta per group, not per channel, and refuses 2-D
    input: it fits no position of the spec, so --norm group --variants builtin is a clear error."""
    from mxnet.gluon import nn

    layer = nn.GroupNorm(num_groups=2)
    layer.initialize()
    layer(mx.nd.ones((4, 6, 5, 5)))
    assert layer.gamma.shape == (2,) and layer.beta.shape == (2,)
    with pytest.raises(mx.base.MXNetError, match="ndim"):
        layer(mx.nd.ones((4, 6))).wait_to_read()


def test_gluon_instance_norm_does_not_learn_gamma_by_default_and_is_float32_only(mx):
    """nn.InstanceNorm's scale=False (its default) does not drop gamma: gamma still multiplies the output but
    is never trained (grad_req 'null'), so it stays at its initial 1; the suite passes scale=True. Its
    operator has a float32 kernel only."""
    from mxnet.gluon import nn

    layer = nn.InstanceNorm(in_channels=3)
    layer.initialize()
    assert layer._kwargs["scale"] is False and layer.gamma.grad_req == "null"
    assert nn.InstanceNorm(in_channels=3, scale=True).gamma.grad_req == "write"
    x = mx.nd.array(np.random.RandomState(0).normal(2, 3, (4, 3, 5, 5)))
    plain = layer(x).asnumpy()
    layer.gamma.set_data(mx.nd.array([2.0, 3.0, 4.0]))
    np.testing.assert_allclose(layer(x).asnumpy(), plain * np.array([2.0, 3.0, 4.0]).reshape(1, 3, 1, 1), rtol=1e-6)
    layer64 = nn.InstanceNorm(in_channels=3, scale=True)
    layer64.initialize()
    layer64.cast("float64")
    with pytest.raises(mx.base.MXNetError, match="Unsupported data type"):
        layer64(x.astype("float64")).wait_to_read()


def test_gluon_layer_norm_normalises_one_axis(mx):
    """nn.LayerNorm normalises along one axis (default -1): on a feature map that is each pixel's channels,
    or one row of W values, never C x H x W; after a dense layer it is the spec."""
    from mxnet.gluon import nn

    layer = nn.LayerNorm(axis=1, in_channels=3)
    layer.initialize()
    x = np.random.RandomState(1).normal(2, 3, (2, 3, 4, 4))
    y = layer(mx.nd.array(x)).asnumpy()
    np.testing.assert_allclose(y.mean(axis=1), 0, atol=1e-5)  # per pixel, over the channels only
    np.testing.assert_allclose(y.var(axis=1), 1, atol=1e-3)
    flat = x.reshape(2, -1)
    spec = (flat - flat.mean(axis=1, keepdims=True)) / np.sqrt(flat.var(axis=1, keepdims=True) + 1e-5)
    assert np.abs(y - spec.reshape(x.shape)).max() > 0.5  # the spec's layer normalisation is another transform


def test_amp_init_rewrites_the_operators_of_the_whole_process(mx):
    """Why MXNet runs refuse --precision mixed-bfloat16 (frameworks/mxnet/lenet.py NO_MIXED): amp.init wraps
    the functions of mx.nd and mx.sym in place, for every later network of the process, with no way back.
    Run in a subprocess, so that this test's process stays float32."""
    import subprocess
    import sys

    code = (
        "import mxnet as mx; from mxnet.contrib import amp; before = mx.nd.FullyConnected; "
        "amp.init(target_dtype='bfloat16'); print(mx.nd.FullyConnected is before, "
        "mx.nd.FullyConnected(mx.nd.ones((2, 3)), mx.nd.ones((4, 3)), no_bias=True, num_hidden=4).dtype, sep='|')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    replaced, dtype = out.stdout.strip().splitlines()[-1].split("|")
    assert replaced == "False"  # the module attribute itself was replaced
    assert "bfloat16" in dtype, dtype  # a float32 call now computes in, and returns, bfloat16


def test_erf_gradient_is_float32_accurate_even_in_float64(mx):
    """erf's backward multiplies by 2 / sqrt(pi) rounded to float32: a relative error of 3.0e-8 in float64, which
    breaks float64 parity; the scratch PIT writes the normal density out (frameworks/mxnet/batchnorm.py)."""
    from mxnet import autograd, nd

    x = nd.array([0.5, -1.0, 2.0], dtype="float64")
    x.attach_grad()
    with autograd.record():
        y = nd.erf(x)
    y.backward()
    exact = 2 / np.sqrt(np.pi) * np.exp(-(x.asnumpy() ** 2))
    relative = x.grad.asnumpy() / exact - 1
    assert np.ptp(relative) < 1e-14  # one constant factor, the same at every x...
    assert 1e-8 < np.abs(relative[0]) < 2.0**-24  # ...off by a float32 rounding (float64's would be ~1e-16)


def test_where_inside_stop_gradient_crashes_the_backward(mx):
    """A `where` of arrays that carry gradients, inside stop_gradient: the backward is a segmentation fault (MXNet
    1.9.1, CPU). The scratch pit-rank multiplies by its 0/1 mode instead. Run in a subprocess, which it ends."""
    import subprocess
    import sys

    def run(body):
        code = (
            "import mxnet as mx\nfrom mxnet import nd, autograd\n"
            "x = nd.array([[0.3], [-1.2]], dtype='float64'); x.attach_grad()\n"
            "train = nd.ones((2, 1), dtype='float64')\n"
            f"with autograd.record():\n    u = nd.sigmoid(x)\n    y = ({body}).sum()\n"
            "y.backward()\nprint(x.grad.asnumpy().sum())\n"
        )
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    crashed = run("u + nd.stop_gradient(nd.where(train, x * 2, u) - u)")
    # MXNet's own handler reports the signal and exits 255
    assert crashed.returncode != 0 and "Segmentation fault" in crashed.stderr, (crashed.returncode, crashed.stderr)
    product = run("u + nd.stop_gradient((x * 2 - u) * train)")
    assert product.returncode == 0, product.stderr[-500:]
