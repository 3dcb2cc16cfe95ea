"""Scratch batch normalization, batch renormalisation and group normalisation for MXNet Gluon,
written with NDArray/Symbol ops (layer and instance normalisation are group normalisation with 1 and
C groups; common.norms has the spec).

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

from common.norms import renorm_limits


def batch_norm(F, x, gamma, beta, running_mean, running_var, mode, *, decay, epsilon, renorm=None):
    """Return (y, new_running_mean, new_running_var); see the module docstring for `mode`.
    renorm = (rmax, dmax), (1,)-shaped: batch renormalisation's correction by r and d (no gradient)
    where the batch statistics are used.

    x is (N, C) or (N, C, H, W). MXNet's CPU reduction and broadcast kernels are
    slow, so per-channel sums and the broadcasts back are matrix products with
    ones: the sums over H*W a FullyConnected (oneDNN; 0.10 ms against `dot`'s 0.57 ms
    for conv1's at batch 256, 2-core CPU), the rest `dot`; the arithmetic is the spec's, unchanged.

    x is centred once, with the mean in use: in training mode that is the batch
    mean, so `var` is the spec's two-pass variance of the centred values and the
    same centred values feed y; in prediction mode `var` is not used.
    """
    x3 = F.reshape(x, shape=(0, 0, -1))  # (N, C, S), S = H*W (1 for 2-D input)
    rows = F.reshape(x3, shape=(-3, -1))  # (N*C, S)
    ones_s = F.stop_gradient(F.ones_like(F.slice_axis(rows, axis=0, begin=0, end=1)))  # (1, S)
    ones_n = F.stop_gradient(
        F.ones_like(
            F.reshape(F.slice_axis(F.slice_axis(x3, axis=2, begin=0, end=1), axis=1, begin=0, end=1), shape=(-1, 1))
        )
    )  # (N, 1)
    per_row = F.slice_axis(x3, axis=2, begin=0, end=1)  # (N, C, 1): the shape of per-row sums
    count = F.sum(ones_s) * F.sum(ones_n)  # N * S values per channel

    def channel_mean(t):  # (N*C, S) -> (C,)
        row_sums = F.reshape(
            F.reshape_like(F.FullyConnected(t, ones_s, no_bias=True, num_hidden=1), per_row), shape=(0, -1)
        )
        return F.broadcast_div(F.reshape(F.dot(ones_n, row_sums, transpose_a=True), shape=(-1,)), count)

    def spread(v):  # (C,) -> (N*C, S)
        per_sample = F.dot(ones_n, F.reshape(v, shape=(1, -1)))  # (N, C)
        return F.dot(F.reshape(per_sample, shape=(-1, 1)), ones_s)

    use_batch = F.broadcast_like(mode, running_mean)
    mean = channel_mean(rows)
    mean_used = F.where(use_batch, mean, running_mean)
    centred = rows - spread(mean_used)
    var = channel_mean(F.square(centred))  # biased (1/n); the batch variance in training mode
    var_used = F.where(use_batch, var, running_var)
    scale, shift = gamma * F.rsqrt(var_used + epsilon), beta
    if renorm is not None:
        rmax, dmax = renorm
        sigma = F.sqrt(running_var + epsilon)
        r = F.broadcast_minimum(F.broadcast_maximum(F.sqrt(var + epsilon) / sigma, 1 / rmax), rmax)
        d = F.broadcast_minimum(F.broadcast_maximum((mean - running_mean) / sigma, -dmax), dmax)
        r = F.stop_gradient(F.where(use_batch, r, F.ones_like(r)))
        d = F.stop_gradient(F.where(use_batch, d, F.zeros_like(d)))
        scale, shift = scale * r, shift + gamma * d
    y = centred * spread(scale) + spread(shift)
    # stop_gradient: the running statistics must not carry autograd history
    new_mean = F.where(use_batch, decay * running_mean + (1 - decay) * F.stop_gradient(mean), running_mean)
    new_var = F.where(use_batch, decay * running_var + (1 - decay) * F.stop_gradient(var), running_var)
    return F.reshape_like(y, x), new_mean, new_var


def ghost_batch_norm(F, x, gamma, beta, running_mean, running_var, mode, *, ghost, num_dims, channels, **kwargs):
    """batch_norm with training-mode statistics per contiguous slice of `ghost` examples (ghost batches,
    common.norms): the slices become channels, (N, C, ...) -> (G, S * C, ...), gamma, beta and the running
    statistics are tiled S times and the new running statistics averaged back over the slices. A graph cannot
    branch on `mode`, so the running-statistics forward is computed beside it and `where` picks one."""
    spatial = (-2,) if num_dims == 4 else ()
    axes = (1, 0, 2, 3, 4) if num_dims == 4 else (1, 0, 2)
    sliced = F.reshape(x, shape=(-4, -1, ghost, -2))  # (S, G, C, ...)
    folded = F.reshape(F.transpose(sliced, axes=axes), shape=(0, -3, *spatial))  # (G, S * C, ...)
    per_slice = sliced
    for axis in range(num_dims, 0, -1):  # (S, C): the shape to tile the per-channel arrays to
        per_slice = F.slice_axis(per_slice, axis=axis, begin=0, end=1) if axis != 2 else per_slice
    per_slice = F.reshape(per_slice, shape=(0, -1))

    def tile(v):
        return F.reshape(F.broadcast_like(F.reshape(v, shape=(1, -1)), per_slice), shape=(-1,))

    one = F.ones_like(mode)
    y, new_mean, new_var = batch_norm(
        F, folded, *(tile(v) for v in (gamma, beta, running_mean, running_var)), one, **kwargs
    )
    y = F.reshape(F.transpose(F.reshape(y, shape=(0, -4, -1, channels, *spatial)), axes=axes), shape=(-3, -2))
    y_eval, _, _ = batch_norm(F, x, gamma, beta, running_mean, running_var, mode, **kwargs)
    train = F.broadcast_like(F.reshape(mode, shape=(1,) * num_dims), x)
    use_batch = F.broadcast_like(mode, running_mean)
    return (
        F.where(train, y, y_eval),
        F.where(use_batch, F.mean(F.reshape(new_mean, shape=(-1, channels)), axis=0), running_mean),
        F.where(use_batch, F.mean(F.reshape(new_var, shape=(-1, channels)), axis=0), running_var),
    )


def group_norm(F, x, gamma, beta, *, groups, num_dims, epsilon):
    """Per example, over each of `groups` groups of consecutive channels (with H x W for 4-D input)."""
    g = F.reshape(x, shape=(0, groups, -1))
    centred = F.broadcast_sub(g, F.mean(g, axis=2, keepdims=True))
    y = F.reshape_like(F.broadcast_mul(centred, F.rsqrt(F.mean(F.square(centred), axis=2, keepdims=True) + epsilon)), x)
    per_channel = (1, -1) if num_dims == 2 else (1, -1, 1, 1)
    return F.broadcast_add(F.broadcast_mul(y, F.reshape(gamma, shape=per_channel)), F.reshape(beta, shape=per_channel))


class GroupNorm(HybridBlock):
    """gamma and beta per channel; no running statistics, so train and eval mode are the same."""

    def __init__(self, num_features, num_dims, groups, *, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if num_dims not in (2, 4) or num_features % groups:
            raise ValueError(
                f"group_norm needs 2-D or 4-D input and groups dividing the channels, got num_dims="
                f"{num_dims}, {groups} groups of {num_features} channels"
            )
        self.num_features, self.num_dims, self.groups, self.epsilon = num_features, num_dims, groups, epsilon
        with self.name_scope():
            self.gamma = self.params.get("gamma", shape=(num_features,), init=mx.init.One())
            self.beta = self.params.get("beta", shape=(num_features,), init=mx.init.Zero())

    def hybrid_forward(self, F, x, gamma, beta):
        return group_norm(F, x, gamma, beta, groups=self.groups, num_dims=self.num_dims, epsilon=self.epsilon)


class BatchNorm(HybridBlock):
    """gamma, beta (trainable) and running_mean, running_var (grad_req='null')."""

    state = ("running_mean", "running_var")  # what a training forward returns after y, for store()

    def __init__(self, num_features, num_dims, *, decay=0.9, epsilon=1e-5, ghost=0, **kwargs):
        super().__init__(**kwargs)
        if num_dims not in (2, 4):
            raise ValueError(f"batch_norm expects 2-D (N, C) or 4-D (N, C, H, W) input, got num_dims={num_dims}")
        self.num_features, self.num_dims, self.decay, self.epsilon = num_features, num_dims, decay, epsilon
        self.ghost = ghost  # ghost batches (common.norms): training-mode statistics per slice of this many examples
        with self.name_scope():
            self.gamma = self.params.get("gamma", shape=(num_features,), init=mx.init.One())
            self.beta = self.params.get("beta", shape=(num_features,), init=mx.init.Zero())
            self.running_mean = self.params.get(
                "running_mean", shape=(num_features,), init=mx.init.Zero(), grad_req="null", differentiable=False
            )
            self.running_var = self.params.get(
                "running_var", shape=(num_features,), init=mx.init.One(), grad_req="null", differentiable=False
            )

    def forward(self, x, mode):
        if isinstance(x, nd.NDArray):  # imperative call or the first trace: shapes are known
            if x.ndim != self.num_dims:
                raise ValueError(
                    f"batch_norm expects 2-D (N, C) or 4-D (N, C, H, W) input matching num_dims="
                    f"{self.num_dims}, got shape {x.shape}; flatten or reshape before the BN layer"
                )
            if self.ghost and x.shape[0] % self.ghost:
                raise ValueError(f"ghost batches of {self.ghost} do not divide the batch of {x.shape[0]}")
            if x.size // x.shape[1] < 2 and mode.asscalar() == 1:  # only synchronises in this corner
                raise ValueError(
                    f"training-mode batch_norm needs more than one value per channel, got input "
                    f"shape {x.shape}; use a batch of at least 2 or eval mode"
                )
        return super().forward(x, mode)

    def hybrid_forward(self, F, x, mode, gamma, beta, running_mean, running_var):
        state = (F, x, gamma, beta, running_mean, running_var, mode)
        constants = dict(decay=self.decay, epsilon=self.epsilon)
        if self.ghost:
            return ghost_batch_norm(
                *state, ghost=self.ghost, num_dims=self.num_dims, channels=self.num_features, **constants
            )
        return batch_norm(*state, **constants)

    def store(self, *new_state):
        """Write the state (self.state) a training forward returned (asynchronous, no sync)."""
        for name, value in zip(self.state, new_state):
            getattr(self, name).data()[:] = value


class BatchRenorm(BatchNorm):
    """BatchNorm plus `steps` (grad_req='null': the training steps taken), which sets the clipping limits."""

    state = ("running_mean", "running_var", "steps")

    def __init__(self, num_features, num_dims, *, decay=0.9, epsilon=1e-5, rmax=3.0, dmax=5.0, warmup=1000, **kwargs):
        super().__init__(num_features, num_dims, decay=decay, epsilon=epsilon, **kwargs)
        self.rmax, self.dmax, self.warmup = rmax, dmax, warmup
        with self.name_scope():
            self.steps = self.params.get(
                "steps", shape=(1,), init=mx.init.Zero(), grad_req="null", differentiable=False
            )

    def hybrid_forward(self, F, x, mode, gamma, beta, running_mean, running_var, steps):
        limits = renorm_limits(steps, self.rmax, self.dmax, self.warmup, minimum=F.minimum, ones_like=F.ones_like)
        y, new_mean, new_var = batch_norm(
            F, x, gamma, beta, running_mean, running_var, mode, decay=self.decay, epsilon=self.epsilon, renorm=limits
        )
        return y, new_mean, new_var, steps + mode
