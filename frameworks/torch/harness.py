"""PyTorch's layer harness (common.harness): one normalisation layer run on numpy arrays, for the tests.

A layer of spec.norm / spec.variant is built as the model builds it (lenet.make_norm), set from canonical
state, run forward in the given mode and backward of sum(dy * y); mixed precision is torch.autocast around
a float32 layer with bfloat16 input, as in a run.
"""

import numpy as np
import torch

from common.norms import norm_layer

from .backend import DTYPES
from .lenet import canonical_to_torch, make_norm


def run_norm(spec, x, state, dy, *, training, dtype):
    """See common.harness: one normalisation layer's forward and backward, numpy in and out."""
    mixed = dtype == "mixed-bfloat16"  # the layer in float32, its input (and dy) in bfloat16, under autocast
    dt = DTYPES["float32" if mixed else dtype]
    layer = make_norm(norm_layer(spec, x.shape[1], np.ndim(x)), dtype)
    attrs = {suffix: canonical_to_torch(f"bn1.{suffix}", spec).split(".")[1] for suffix in state}
    with torch.no_grad():
        for suffix, value in state.items():
            getattr(layer, attrs[suffix]).copy_(torch.as_tensor(np.asarray(value)))
    layer.train(training)
    compute = torch.bfloat16 if mixed else dt
    xt = torch.tensor(np.asarray(x), dtype=compute, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        y = layer(xt)
    after_forward = {suffix: getattr(layer, attr).detach().double().numpy().copy() for suffix, attr in attrs.items()}
    (y * torch.as_tensor(np.asarray(dy)).to(compute)).sum().backward()
    after = {suffix: getattr(layer, attr).detach() for suffix, attr in attrs.items()}
    return {
        "y": y.detach().double().numpy(),
        "dx": xt.grad.double().numpy(),
        "dgamma": getattr(layer, attrs["gamma"]).grad.double().numpy(),
        "dbeta": getattr(layer, attrs["beta"]).grad.double().numpy(),
        "state": {suffix: value.double().numpy() for suffix, value in after.items()},
        "after_forward": after_forward,
        "dtypes": {
            "y": str(y.dtype).replace("torch.", ""),
            **{suffix: str(value.dtype).replace("torch.", "") for suffix, value in after.items()},
        },
    }
