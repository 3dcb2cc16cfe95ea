"""JAX/Flax's layer harness (common.harness): one normalisation layer run on numpy arrays, for the tests.

Functional: the forward returns the new running statistics and the backward cannot change them, so the
state after the forward is the state after both. NCHW in and out; the module runs channels last.
"""

import jax
import jax.numpy as jnp
import numpy as np

from common.layout import nchw_to_nhwc, nhwc_to_nchw
from common.norms import norm_layer

from .backend import enable_float64
from .lenet import FLAX_LEAVES, SCRATCH_LEAVES, make_norm, mode_kwargs


def run_norm(spec, x, state, dy, *, training, dtype):
    """See common.harness: one normalisation layer's forward and backward, numpy in and out (NCHW in and out)."""
    mixed = dtype == "mixed-bfloat16"  # the module computing in bfloat16 with float32 parameters, as in a run
    params_dtype = "float32" if mixed else dtype
    enable_float64(params_dtype)
    layer = make_norm(norm_layer(spec, x.shape[1], np.ndim(x)), dtype)
    leaves = SCRATCH_LEAVES if spec.variant == "scratch" else FLAX_LEAVES
    variables = {"params": {}, "batch_stats": {}}
    for suffix, value in state.items():
        collection, leaf = leaves[suffix]
        variables[collection][leaf] = jnp.asarray(np.asarray(value, dtype=params_dtype))
    xt, dyt = (
        jnp.asarray(nchw_to_nhwc(a).astype(params_dtype)).astype(jnp.bfloat16 if mixed else params_dtype)
        for a in (x, dy)
    )

    def forward(x, params):
        return layer.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            mutable=["batch_stats"],
            **mode_kwargs(layer, training),
        )

    y, backward, updates = jax.vjp(forward, xt, variables["params"], has_aux=True)
    dx, dparams = backward(dyt.astype(y.dtype))
    after = {**variables["params"], **variables["batch_stats"], **updates.get("batch_stats", {})}
    after = {suffix: after[leaves[suffix][1]] for suffix in state}

    def f64(a):
        return np.asarray(a.astype(jnp.float32 if a.dtype == jnp.bfloat16 else a.dtype), dtype=np.float64)

    return {
        "y": nhwc_to_nchw(f64(y)),
        "dx": nhwc_to_nchw(f64(dx)),
        "dgamma": f64(dparams[leaves["gamma"][1]]),
        "dbeta": f64(dparams[leaves["beta"][1]]),
        "state": {suffix: f64(value) for suffix, value in after.items()},
        "after_forward": {suffix: f64(value) for suffix, value in after.items()},  # functional: the same
        "dtypes": {"y": str(y.dtype), **{suffix: str(value.dtype) for suffix, value in after.items()}},
    }
