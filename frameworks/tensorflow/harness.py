"""TensorFlow's layer harness (common.harness): one normalisation layer run on numpy arrays, for the tests.

NCHW in and out; the layer runs channels last, as in the model, under the mixed_bfloat16 policy for mixed
precision.
"""

import numpy as np
import tensorflow as tf

from common.layout import nchw_to_nhwc, nhwc_to_nchw
from common.norms import norm_layer

from .lenet import BUILTIN_NAMES, make_norm


def run_norm(spec, x, state, dy, *, training, dtype):
    """See common.harness: one normalisation layer's forward and backward, numpy in and out (NCHW in and out)."""
    mixed = dtype == "mixed-bfloat16"  # the layer under the mixed_bfloat16 policy, its input (and dy) in bfloat16
    compute = tf.bfloat16 if mixed else dtype
    layer = make_norm(norm_layer(spec, x.shape[1], np.ndim(x)), dtype)
    xt = tf.cast(tf.constant(nchw_to_nhwc(x).astype(np.float32 if mixed else dtype)), compute)
    layer.build(xt.shape)
    names = {suffix: BUILTIN_NAMES.get(suffix, suffix) if spec.variant != "scratch" else suffix for suffix in state}
    for suffix, value in state.items():
        variable = getattr(layer, names[suffix])
        variable.assign(np.asarray(value, dtype=variable.dtype))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=training)
        after_forward = {suffix: tf.cast(getattr(layer, names[suffix]), tf.float64).numpy() for suffix in state}
        loss = tf.reduce_sum(
            tf.cast(y, tf.float32 if mixed else dtype)
            * tf.cast(
                tf.constant(nchw_to_nhwc(dy).astype(np.float32 if mixed else dtype)), tf.float32 if mixed else dtype
            )
        )
    dx, dgamma, dbeta = tape.gradient(loss, [xt, getattr(layer, names["gamma"]), getattr(layer, names["beta"])])
    after = {suffix: getattr(layer, names[suffix]) for suffix in state}

    def f64(t):
        return tf.cast(t, tf.float64).numpy()

    return {
        "y": nhwc_to_nchw(f64(y)),
        "dx": nhwc_to_nchw(f64(dx)),
        "dgamma": f64(dgamma),
        "dbeta": f64(dbeta),
        "state": {suffix: f64(v) for suffix, v in after.items()},
        "after_forward": after_forward,
        "dtypes": {
            "y": y.dtype.name,
            **{suffix: v.dtype.name if hasattr(v.dtype, "name") else str(v.dtype) for suffix, v in after.items()},
        },
    }
