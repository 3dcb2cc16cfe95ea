"""Scratch batch normalization, batch renormalisation, group normalisation, group whitening and the probability
integral transforms for MXNet Gluon, written with NDArray/Symbol ops (layer and instance normalisation are group
normalisation with 1 and C groups; common.norms has the spec).

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

import math

import mxnet as mx
import numpy as np
from mxnet import nd
from mxnet.gluon import HybridBlock

from common.norms import renorm_limits, whiten_mask


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
        """Write the state (self.state) a training forward returned (asynchronous, no sync), into the copy on every
        context the layer lives on (data parallel: all of them hold the same)."""
        for name, value in zip(self.state, new_state):
            for copy in getattr(self, name).list_data():
                copy[:] = value


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


def channel_rows(F, x, num_dims):
    """(N, C) or (N, C, H, W) -> (C, m): each channel's m values in a row."""
    return F.transpose(x) if num_dims == 2 else F.reshape(F.transpose(x, axes=(1, 0, 2, 3)), shape=(0, -1))


def rows_back(F, rows, x, num_dims):
    """channel_rows' inverse, shaped like x."""
    if num_dims == 2:
        return F.transpose(rows)
    return F.transpose(F.reshape_like(rows, F.transpose(x, axes=(1, 0, 2, 3))), axes=(1, 0, 2, 3))


def whiten(F, x, gamma, beta, running_mean, running_cov, mask, mode, *, decay, epsilon, iterations, num_dims):
    """Group whitening (common.norms): returns (y, new_running_mean, new_running_cov). mask: whiten_mask's (C, C)
    block indicator; mode as batch_norm's (1: the batch's mean and covariance within the blocks, blended into the
    running ones within the blocks only; 0: the running ones)."""
    rows = channel_rows(F, x, num_dims)  # (C, m)
    count = F.sum(F.ones_like(F.slice_axis(rows, axis=0, begin=0, end=1)))  # (1,): m
    mean = F.mean(rows, axis=1)
    centred_batch = F.broadcast_sub(rows, F.reshape(mean, shape=(-1, 1)))
    cov = F.broadcast_div(F.dot(centred_batch, centred_batch, transpose_b=True), count) * mask
    use_batch = F.broadcast_like(mode, running_mean)
    use_batch_cov = F.broadcast_like(F.reshape(mode, shape=(1, 1)), running_cov)
    mean_used = F.where(use_batch, mean, running_mean)
    cov_used = F.where(use_batch_cov, cov, running_cov * mask)
    new_mean = F.where(use_batch, decay * running_mean + (1.0 - decay) * F.stop_gradient(mean), running_mean)
    blend = mask * (decay * running_cov + (1.0 - decay) * F.stop_gradient(cov)) + (1.0 - mask) * running_cov
    new_cov = F.where(use_batch_cov, blend, running_cov)
    centred = F.broadcast_sub(rows, F.reshape(mean_used, shape=(-1, 1)))
    eye = F.diag(F.diag(mask))  # the mask's diagonal is all ones
    sigma = cov_used + epsilon * eye
    trace = F.dot(mask, F.diag(sigma))  # each channel's group's trace
    normalised = F.broadcast_div(sigma, F.reshape(trace, shape=(-1, 1)))
    y_k, z_k = normalised, eye  # coupled Newton-Schulz (common.norms): z_k -> normalised^(-1/2)
    for _ in range(iterations):
        t_k = 0.5 * (3.0 * eye - F.dot(z_k, y_k))
        y_k, z_k = F.dot(y_k, t_k), F.dot(t_k, z_k)
    w = F.broadcast_div(z_k, F.reshape(F.sqrt(trace), shape=(-1, 1)))
    x_hat = rows_back(F, F.dot(w, centred), x, num_dims)
    per_channel = (1, -1) if num_dims == 2 else (1, -1, 1, 1)
    y = F.broadcast_add(F.broadcast_mul(x_hat, F.reshape(gamma, shape=per_channel)), F.reshape(beta, shape=per_channel))
    return y, new_mean, new_cov


def mid_ranks(F, x, num_dims, dtype):
    """Each value's mid-rank within its channel over the batch (and positions), (rank - 1/2) / m with ties sharing
    their mean rank. MXNet has no binary search and its argsort is not stable, so from the sorted channel's tie
    blocks: a value's block starts at a (#smaller) and ends at b (#smaller-or-equal - 1), and (a + b + 1) / (2m) is
    its mid-rank's grid value. The blocks' starts, sorted after the non-starts (-1), sit at positions m - blocks ..
    m - 1; their ends, sorted before the non-ends (2m), at 0 .. blocks - 1; a value's block is the count of starts
    up to it. Every value of a block gets the same number, so the order argsort gives ties does not matter."""
    rows = channel_rows(F, x, num_dims)  # (C, m)
    ordered = F.sort(rows, axis=1)
    one = F.ones_like(F.slice_axis(ordered, axis=1, begin=0, end=1))  # (C, 1)
    same = F.slice_axis(ordered, axis=1, begin=1, end=None) == F.slice_axis(ordered, axis=1, begin=0, end=-1)
    starts, ends = F.concat(one, 1 - same, dim=1), F.concat(1 - same, one, dim=1)  # (C, m) of 0/1
    position = F.broadcast_like(F.reshape(F.contrib.arange_like(rows, axis=1), shape=(1, -1)), rows)
    count = F.sum(F.ones_like(F.slice_axis(rows, axis=0, begin=0, end=1)))  # (1,): m
    block = F.cumsum(starts, axis=1) - 1  # each sorted value's block, from 0
    blocks = F.sum(starts, axis=1, keepdims=True)
    row = F.broadcast_like(F.reshape(F.contrib.arange_like(rows, axis=0), shape=(-1, 1)), rows)
    m = F.broadcast_like(F.reshape(count, shape=(1, 1)), rows)
    first = F.sort(F.where(starts, position, -F.ones_like(position)), axis=1)
    last = F.sort(F.where(ends, position, 2 * m), axis=1)
    a = F.take(F.reshape(first, shape=(-1,)), row * m + F.broadcast_sub(m, blocks) + block)
    b = F.take(F.reshape(last, shape=(-1,)), row * m + block)
    grid = (a + b + 1) / (2 * m)  # in sorted order
    inverse = F.argsort(F.argsort(rows, axis=1, dtype=dtype), axis=1, dtype=dtype)  # each value's sorted place
    return rows_back(F, F.take(F.reshape(grid, shape=(-1,)), row * m + inverse), x, num_dims)


def pit(
    F,
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    mode,
    *,
    decay,
    epsilon,
    num_dims,
    rank=False,
    standard=False,
    dtype="float32",
):
    """The Gaussian probability integral transform of BN's x_hat, or (rank) where mode is 1 the mid-ranks with its
    gradient (straight through), standardised to sqrt(12) (u - 1/2) where `standard`; returns (y, new_running_mean,
    new_running_var) as batch_norm. dtype: x's name (MXNet's argsort returns its indices in a dtype it is told)."""
    ones = F.ones_like(gamma)
    x_hat, new_mean, new_var = batch_norm(
        F, x, ones, F.zeros_like(ones), running_mean, running_var, mode, decay=decay, epsilon=epsilon
    )
    # MXNet's erf gradient multiplies by 2 / sqrt(pi) rounded to float32, even in float64 (relative error 3.0e-8,
    # tests/test_mxnet_pitfalls.py): the value is erf's, the gradient phi(x_hat) written out, by a straight-through
    # sum whose derivative is that of stop_gradient(phi) * x_hat
    density = F.stop_gradient(F.exp(-0.5 * F.square(x_hat)) / math.sqrt(2.0 * math.pi))
    linear = density * x_hat
    u = F.stop_gradient(0.5 * (1.0 + F.erf(x_hat / math.sqrt(2.0))) - linear) + linear
    if rank:
        train = F.broadcast_like(F.reshape(mode, shape=(1,) * num_dims), x)
        # a product with the 0/1 mode, not `where`: MXNet 1.9's backward crashes (a segmentation fault) on a `where`
        # inside stop_gradient whose inputs carry gradients (tests/test_mxnet_pitfalls.py)
        u = u + F.stop_gradient((mid_ranks(F, x, num_dims, dtype) - u) * train)
    if standard:
        u = math.sqrt(12.0) * (u - 0.5)
    per_channel = (1, -1) if num_dims == 2 else (1, -1, 1, 1)
    y = F.broadcast_add(F.broadcast_mul(u, F.reshape(gamma, shape=per_channel)), F.reshape(beta, shape=per_channel))
    return y, new_mean, new_var


class PIT(BatchNorm):
    """BatchNorm's parameters and running statistics; the Gaussian (rank False) or empirical (rank True) PIT."""

    def __init__(self, num_features, num_dims, *, rank=False, standard=False, decay=0.9, epsilon=1e-5, **kwargs):
        super().__init__(num_features, num_dims, decay=decay, epsilon=epsilon, **kwargs)
        self.rank, self.standard = rank, standard

    def hybrid_forward(self, F, x, mode, gamma, beta, running_mean, running_var):
        return pit(
            F,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            mode,
            decay=self.decay,
            epsilon=self.epsilon,
            num_dims=self.num_dims,
            rank=self.rank,
            standard=self.standard,
            dtype=np.dtype(self.gamma.dtype).name,
        )


class Whiten(BatchNorm):
    """gamma, beta (trainable), running_mean and running_cov (grad_req='null'), and the groups' block mask (a
    constant); whitening groups of `group` channels with `iterations` Newton-Schulz iterations."""

    state = ("running_mean", "running_cov")

    def __init__(self, num_features, num_dims, *, group=4, iterations=5, decay=0.9, epsilon=1e-5, **kwargs):
        HybridBlock.__init__(self, **kwargs)
        if num_dims not in (2, 4):
            raise ValueError(f"whiten expects 2-D (N, C) or 4-D (N, C, H, W) input, got num_dims={num_dims}")
        self.num_features, self.num_dims, self.decay, self.epsilon = num_features, num_dims, decay, epsilon
        self.group, self.iterations, self.ghost = group, iterations, 0
        with self.name_scope():
            self.gamma = self.params.get("gamma", shape=(num_features,), init=mx.init.One())
            self.beta = self.params.get("beta", shape=(num_features,), init=mx.init.Zero())
            self.running_mean = self.params.get(
                "running_mean", shape=(num_features,), init=mx.init.Zero(), grad_req="null", differentiable=False
            )
            self.running_cov = self.params.get(
                "running_cov",
                shape=(num_features, num_features),
                init=mx.init.Constant(nd.eye(num_features)),
                grad_req="null",
                differentiable=False,
            )
            self.mask = self.params.get_constant("mask", nd.array(whiten_mask(num_features, group)))

    def hybrid_forward(self, F, x, mode, gamma, beta, running_mean, running_cov, mask):
        return whiten(
            F,
            x,
            gamma,
            beta,
            running_mean,
            running_cov,
            mask,
            mode,
            decay=self.decay,
            epsilon=self.epsilon,
            iterations=self.iterations,
            num_dims=self.num_dims,
        )
