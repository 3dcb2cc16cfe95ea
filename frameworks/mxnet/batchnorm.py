"""Scratch batch normalization for MXNet Gluon, written with NDArray/Symbol ops.

Layout: NCHW (4-D) or NC (2-D). A hybridized graph freezes any Python branch
on `autograd.is_training()` at trace time and cannot assign to parameters, so:
- the mode is an input `mode` (1 = batch statistics, 0 = running statistics),
  chosen with `where`, which selects exactly; the owner sets it from Gluon's
  training flag at every call (BNLeNet.forward);
- the layer returns the new running statistics and the owner stores them
  (BatchNorm.store) after a training forward.
Running statistics are Parameters with grad_req='null', so they are saved,
loaded and moved with the model. The raw `BatchNorm` operator is not used
here (its defaults, fix_gamma=True and eps 1e-3, are a classic trap).
"""
import mxnet as mx
from mxnet import nd
from mxnet.gluon import HybridBlock


def batch_norm(F, x, gamma, beta, running_mean, running_var, mode, *, axes, decay, epsilon):
    """Return (y, new_running_mean, new_running_var); see the module docstring for `mode`."""
    mean = F.mean(x, axis=axes, keepdims=True)
    var = F.mean(F.square(F.broadcast_sub(x, mean)), axis=axes, keepdims=True)  # biased (1/n)
    mean, var = F.reshape(mean, shape=(-1,)), F.reshape(var, shape=(-1,))
    use_batch = F.broadcast_like(mode, running_mean)
    mean_used = F.where(use_batch, mean, running_mean)
    var_used = F.where(use_batch, var, running_var)
    shape = (1, -1) if axes == (0,) else (1, -1, 1, 1)
    inv_std = F.rsqrt(var_used + epsilon)
    y = F.broadcast_mul(F.broadcast_sub(x, F.reshape(mean_used, shape=shape)), F.reshape(inv_std, shape=shape))
    y = F.broadcast_add(F.broadcast_mul(y, F.reshape(gamma, shape=shape)), F.reshape(beta, shape=shape))
    # stop_gradient: the running statistics must not carry autograd history
    new_mean = F.where(use_batch, decay * running_mean + (1 - decay) * F.stop_gradient(mean), running_mean)
    new_var = F.where(use_batch, decay * running_var + (1 - decay) * F.stop_gradient(var), running_var)
    return y, new_mean, new_var


class BatchNorm(HybridBlock):
    """gamma, beta (trainable) and running_mean, running_var (grad_req='null')."""

    def __init__(self, num_features, num_dims, *, decay=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if num_dims not in (2, 4):
            raise ValueError(f"num_dims must be 2 or 4, got {num_dims}")
        self.num_features, self.num_dims, self.decay, self.epsilon = num_features, num_dims, decay, epsilon
        self.axes = (0,) if num_dims == 2 else (0, 2, 3)
        with self.name_scope():
            self.gamma = self.params.get("gamma", shape=(num_features,), init=mx.init.One())
            self.beta = self.params.get("beta", shape=(num_features,), init=mx.init.Zero())
            self.running_mean = self.params.get("running_mean", shape=(num_features,), init=mx.init.Zero(),
                                                grad_req="null", differentiable=False)
            self.running_var = self.params.get("running_var", shape=(num_features,), init=mx.init.One(),
                                               grad_req="null", differentiable=False)

    def forward(self, x, mode):
        if isinstance(x, nd.NDArray):  # imperative call or the first trace: shapes are known
            if x.ndim != self.num_dims:
                raise ValueError(f"batch_norm expects 2-D (N, C) or 4-D (N, C, H, W) input matching num_dims="
                                 f"{self.num_dims}, got shape {x.shape}; flatten or reshape before the BN layer")
            if x.size // x.shape[1] < 2 and mode.asscalar() == 1:  # only synchronises in this corner
                raise ValueError(f"training-mode batch_norm needs more than one value per channel, got input "
                                 f"shape {x.shape}; use a batch of at least 2 or eval mode")
        return super().forward(x, mode)

    def hybrid_forward(self, F, x, mode, gamma, beta, running_mean, running_var):
        return batch_norm(F, x, gamma, beta, running_mean, running_var, mode,
                          axes=self.axes, decay=self.decay, epsilon=self.epsilon)

    def store(self, new_mean, new_var):
        """Write the running statistics a training forward returned (asynchronous, no sync)."""
        self.running_mean.data()[:] = new_mean
        self.running_var.data()[:] = new_var
