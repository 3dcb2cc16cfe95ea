"""MXNet's layer harness (common.harness): one normalisation layer run on numpy arrays, for the tests.

On the CPU the built-in BatchNorm writes its running statistics in the backward: after_forward and state (after
the backward) tell the two apart. The scratch layers return their new state from the forward, stored once the
graph is freed, as the model does.
"""

import mxnet as mx
import numpy as np
from mxnet import autograd, nd

from common.norms import norm_layer

from .lenet import check_dtype, make_norm


def run_norm(spec, x, state, dy, *, training, dtype):
    """See common.harness: one normalisation layer's forward and backward, numpy in and out."""
    check_dtype(spec, dtype)
    layer = make_norm(norm_layer(spec, x.shape[1], np.ndim(x)), dtype)
    layer.initialize(ctx=mx.cpu())
    layer.cast(dtype)
    xt = nd.array(x, dtype=dtype)
    for suffix, value in state.items():  # a built-in Gluon block's shapes are known after a first call
        getattr(layer, suffix).shape = np.shape(value)
    layer(xt, nd.array([0.0], dtype=dtype)) if hasattr(layer, "state") else layer(xt)
    for suffix, value in state.items():
        getattr(layer, suffix).set_data(nd.array(value, dtype=dtype))
    xt.attach_grad()
    with autograd.record(train_mode=training):
        out = layer(xt, nd.array([float(training)], dtype=dtype)) if hasattr(layer, "state") else layer(xt)
        y = out[0] if isinstance(out, (list, tuple)) else out
        # what the forward left: the layer's arrays, and for our layers the state the forward returned
        after_forward = {suffix: getattr(layer, suffix).data().asnumpy() for suffix in state}
        if hasattr(layer, "state"):
            after_forward.update({name: value.asnumpy() for name, value in zip(layer.state, out[1:]) if name in state})
        loss = (y * nd.array(dy, dtype=dtype)).sum()
    loss.backward()
    if hasattr(layer, "state") and training:  # our layers: store what the forward returned
        layer.store(*out[1:])
    return {
        "y": y.asnumpy(),
        "dx": xt.grad.asnumpy(),
        "dgamma": layer.gamma.grad().asnumpy(),
        "dbeta": layer.beta.grad().asnumpy(),
        "state": {suffix: getattr(layer, suffix).data().asnumpy() for suffix in state},
        "after_forward": after_forward,
    }
