"""Scratch batch normalization, batch renormalisation, group normalisation, group whitening and the probability
integral transforms for TensorFlow / Keras 3 (layer and instance normalisation are group normalisation with 1 and C
groups; common.norms has the spec).

Layout: NHWC (4-D, normalised over batch and spatial axes per channel) or NC
(2-D). Training mode is the `training` argument, passed explicitly at every
call and defaulting to False in the signature (Keras 3 Sequential needs a
default; a plain call is inference, as in Keras's own layers). The running
statistics are non-trainable weights, updated with assign in training mode.
The normalisation is written (x - mean) * inv_std * gamma + beta, not
TensorFlow's x * inv + (beta - mean * inv), which cancels when |mean| >> std.

Mixed precision (common.precision; Keras' mixed_bfloat16 policy casts a layer's
input to bfloat16): the weights are created with autocast=False, so they are
read in float32, and a bfloat16 input is normalised in float32, the statistics
and the running blend included; the result is returned in the input's dtype.
"""

import math

import keras
import tensorflow as tf

from common.norms import renorm_limits, whiten_mask


def closed_form_batch_norm(x, gamma, beta, epsilon):
    """Training-mode BN with its backward written out (--norm-backward closed-form), channels last: (y, mean, var),
    the statistics without gradient. With x_hat = (x - mean) / sigma over the n values of each channel, the
    backward is dbeta = sum(dy), dgamma = sum(dy x_hat), dx = gamma / sigma (dy - dbeta / n - x_hat dgamma / n):
    what autodiff derives from batch_norm's forward, in fewer passes (docs/reference/benchmark.md)."""
    axes = list(range(x.shape.rank - 1))

    @tf.custom_gradient
    def normalise(x, gamma, beta):
        mean = tf.reduce_mean(x, axis=axes)
        centred = x - mean
        var = tf.reduce_mean(tf.square(centred), axis=axes)
        rstd = tf.math.rsqrt(var + epsilon)
        x_hat = centred * rstd

        def backward(dy, _mean, _var):
            n = tf.cast(tf.size(dy) // tf.shape(dy)[-1], dy.dtype)
            dbeta, dgamma = tf.reduce_sum(dy, axis=axes), tf.reduce_sum(dy * x_hat, axis=axes)
            return (gamma * rstd) * (dy - dbeta / n - x_hat * (dgamma / n)), dgamma, dbeta

        return (x_hat * gamma + beta, tf.stop_gradient(mean), tf.stop_gradient(var)), backward

    # the variables' values as tensors: a custom gradient over a Keras variable itself must handle `variables`
    return normalise(x, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


def batch_norm(x, gamma, beta, running_mean, running_var, *, training, decay, epsilon, renorm=None, closed_form=False):
    """Return (y, new_running_mean, new_running_var); eval mode returns the running ones.
    renorm = (rmax, dmax): batch renormalisation's training mode (r and d carry no gradient).
    closed_form: training mode through closed_form_batch_norm (the same values, BN's backward written out)."""
    rank = x.shape.rank
    if rank not in (2, 4):
        raise ValueError(
            f"batch_norm expects 2-D (N, C) or 4-D (N, H, W, C) input, got shape {tuple(x.shape)}; "
            f"flatten or reshape before the BN layer"
        )
    axes = [0] if rank == 2 else [0, 1, 2]
    out_dtype, x = x.dtype, in_float32(x)
    if training:
        per_channel = 1
        for axis in axes:
            per_channel = None if per_channel is None or x.shape[axis] is None else per_channel * x.shape[axis]
        if per_channel is not None and per_channel < 2:
            raise ValueError(
                f"training-mode batch_norm needs more than one value per channel, got input shape "
                f"{tuple(x.shape)}; use a batch of at least 2 or eval mode"
            )
        if closed_form and renorm is None:
            y, mean, var = closed_form_batch_norm(x, gamma, beta, epsilon)
            new_mean = decay * running_mean + (1.0 - decay) * mean
            new_var = decay * running_var + (1.0 - decay) * var
            return tf.cast(y, out_dtype), new_mean, new_var
        mean = tf.reduce_mean(x, axis=axes)
        # Biased (1/n), two passes. The mean inside carries no gradient: the variance's gradient through it is
        # -2 * mean(x - mean) = 0, so this drops only rounding, and a backward pass over x, as tf.nn.moments
        # does under Keras's layer (docs/benchmark.md, "Execution modes", has what it saves).
        var = tf.reduce_mean(tf.square(x - tf.stop_gradient(mean)), axis=axes)
        # stop_gradient: the running statistics must not carry autograd history
        new_mean = decay * running_mean + (1.0 - decay) * tf.stop_gradient(mean)
        new_var = decay * running_var + (1.0 - decay) * tf.stop_gradient(var)
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    y = (x - mean) * tf.math.rsqrt(var + epsilon)  # channel-last: broadcasts over the last axis
    if training and renorm is not None:
        rmax, dmax = renorm
        sigma = tf.sqrt(running_var + epsilon)
        r = tf.clip_by_value(tf.sqrt(tf.stop_gradient(var) + epsilon) / sigma, 1.0 / rmax, rmax)
        d = tf.clip_by_value((tf.stop_gradient(mean) - running_mean) / sigma, -dmax, dmax)
        y = y * r + d
    return tf.cast(y * gamma + beta, out_dtype), new_mean, new_var


def ghost_batch_norm(x, gamma, beta, running_mean, running_var, *, ghost, **kwargs):
    """batch_norm in training mode with statistics per contiguous slice of `ghost` examples (ghost batches,
    common.norms): the slices become channels, (N, ..., C) -> (G, ..., S * C), gamma, beta and the running
    statistics are tiled S times, and the new running statistics are averaged back over the slices."""
    n, c, rest = x.shape[0], x.shape[-1], list(x.shape[1:-1])
    if n is not None and n % ghost:
        raise ValueError(f"ghost batches of {ghost} do not divide the batch of {n} (input shape {tuple(x.shape)})")
    s = tf.shape(x)[0] // ghost  # the batch may be unknown while a tf.function traces
    order = [1, *range(2, len(rest) + 2), 0, len(rest) + 2]  # (S, G, ..., C) -> (G, ..., S, C)
    folded = tf.reshape(tf.transpose(tf.reshape(x, [s, ghost, *rest, c]), order), [ghost, *rest, s * c])
    y, mean, var = batch_norm(
        folded, *(tf.tile(v, [s]) for v in (gamma, beta, running_mean, running_var)), training=True, **kwargs
    )
    back = [len(rest) + 1, 0, *range(1, len(rest) + 1), len(rest) + 2]  # (G, ..., S, C) -> (S, G, ..., C)
    y = tf.reshape(tf.transpose(tf.reshape(y, [ghost, *rest, s, c]), back), tf.shape(x))
    return y, tf.reduce_mean(tf.reshape(mean, [s, c]), axis=0), tf.reduce_mean(tf.reshape(var, [s, c]), axis=0)


class Replicas:
    """This replica's view of a data-parallel step (inside strategy.run): whether BN pools the whole batch's
    statistics (pooled: global sync) and the mean of a value over the replicas (the replica context's all_reduce,
    which has an all_reduce for its gradient)."""

    def __init__(self, context, pooled):
        self.context, self.pooled = context, pooled

    def mean(self, value, differentiable=True):
        return self.context.all_reduce(tf.distribute.ReduceOp.MEAN, value)


def synced_batch_norm(x, gamma, beta, running_mean, running_var, *, replicas, decay, epsilon):
    """batch_norm's training mode inside a data-parallel step (strategy.run; x is this replica's slice, replicas a
    Replicas). Global sync (replicas.pooled): the whole batch's mean and biased variance, two passes (the replicas'
    mean of their slice means, then of their slices' mean squared deviations from it: the slices are equal, so these
    are the global batch's; averaging the replicas' variances instead would drop the spread of their means); local
    sync: the slice's own. Either way the running statistics blend the replicas' mean of the statistics used, so
    every replica holds the same ones."""
    out_dtype, x = x.dtype, in_float32(x)
    axes = [0] if x.shape.rank == 2 else [0, 1, 2]
    if replicas.pooled:
        mean = replicas.mean(tf.reduce_mean(x, axis=axes))
        var = replicas.mean(tf.reduce_mean(tf.square(x - mean), axis=axes))
        used_mean, used_var = tf.stop_gradient(mean), tf.stop_gradient(var)
    else:
        mean = tf.reduce_mean(x, axis=axes)
        var = tf.reduce_mean(tf.square(x - tf.stop_gradient(mean)), axis=axes)
        used = replicas.mean(tf.stop_gradient(tf.stack([mean, var])), differentiable=False)
        used_mean, used_var = used[0], used[1]
    y = (x - mean) * tf.math.rsqrt(var + epsilon)
    new_mean = decay * running_mean + (1.0 - decay) * used_mean
    new_var = decay * running_var + (1.0 - decay) * used_var
    return tf.cast(y * gamma + beta, out_dtype), new_mean, new_var


def replica_context():
    """The replica context of a data-parallel step (inside strategy.run over more than one replica), else None."""
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def in_float32(x):
    """A reduced-precision input (mixed precision) in float32; float32 and float64 unchanged."""
    return tf.cast(x, tf.float32) if x.dtype in (tf.bfloat16, tf.float16) else x


def group_norm(x, gamma, beta, *, groups, epsilon):
    """Per example, over each of `groups` groups of consecutive channels (with H x W for 4-D NHWC input)."""
    rank = x.shape.rank
    if rank not in (2, 4):
        raise ValueError(f"group_norm expects 2-D (N, C) or 4-D (N, H, W, C) input, got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    if channels % groups:
        raise ValueError(f"{groups} groups do not divide the {channels} channels of input shape {tuple(x.shape)}")
    out_dtype, x = x.dtype, in_float32(x)
    g = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [groups, channels // groups]], axis=0))
    axes = [2] if rank == 2 else [1, 2, 4]  # of (N, G, C/G) or (N, H, W, G, C/G)
    mean = tf.reduce_mean(g, axis=axes, keepdims=True)
    var = tf.reduce_mean(tf.square(g - mean), axis=axes, keepdims=True)
    y = tf.reshape((g - mean) * tf.math.rsqrt(var + epsilon), tf.shape(x))
    return tf.cast(y * gamma + beta, out_dtype)


class BatchNorm(keras.layers.Layer):
    """gamma, beta (trainable) and running_mean, running_var (non-trainable weights)."""

    def __init__(self, num_features, *, decay=0.9, epsilon=1e-5, ghost=0, pooled=False, closed_form=False, **kwargs):
        super().__init__(**kwargs)
        self.num_features, self.decay, self.epsilon, self.ghost = num_features, decay, epsilon, ghost
        self.closed_form = closed_form
        self.pooled = pooled  # inside a data-parallel step: global sync (synced_batch_norm)

    def build(self, input_shape):
        shape = (self.num_features,)
        self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta", autocast=False)
        self.running_mean = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="running_mean", autocast=False
        )
        self.running_var = self.add_weight(
            shape=shape, initializer="ones", trainable=False, name="running_var", autocast=False
        )

    def limits(self):
        """(rmax, dmax) of batch renormalisation; None: plain BN."""
        return None

    def normalise(self, *state, training, **constants):
        """(y, new running mean, new running variance) of one call outside the ghost batches."""
        return batch_norm(*state, training=training, renorm=self.limits(), closed_form=self.closed_form, **constants)

    def call(self, x, training=False):
        state = (x, self.gamma, self.beta, self.running_mean, self.running_var)
        constants = dict(decay=self.decay, epsilon=self.epsilon)
        context = replica_context() if training and type(self) is BatchNorm else None
        if context is not None:
            y, new_mean, new_var = synced_batch_norm(*state, replicas=Replicas(context, self.pooled), **constants)
        elif training and self.ghost and x.shape[0] != self.ghost:
            y, new_mean, new_var = ghost_batch_norm(*state, ghost=self.ghost, **constants)
        else:
            y, new_mean, new_var = self.normalise(*state, training=bool(training), **constants)
        if training:
            self.running_mean.assign(new_mean)
            self.running_var.assign(new_var)
            self.count_step()
        return y

    def count_step(self):
        pass


class BatchRenorm(BatchNorm):
    """BatchNorm plus `steps` (a non-trainable weight: the training steps taken), which sets the clipping limits."""

    def __init__(self, num_features, *, decay=0.9, epsilon=1e-5, rmax=3.0, dmax=5.0, warmup=1000, **kwargs):
        super().__init__(num_features, decay=decay, epsilon=epsilon, **kwargs)
        self.rmax, self.dmax, self.warmup = rmax, dmax, warmup

    def build(self, input_shape):
        super().build(input_shape)
        self.steps = self.add_weight(shape=(1,), initializer="zeros", trainable=False, name="steps", autocast=False)

    def limits(self):
        return renorm_limits(self.steps, self.rmax, self.dmax, self.warmup, minimum=tf.minimum, ones_like=tf.ones_like)

    def count_step(self):
        self.steps.assign_add(tf.ones_like(self.steps))


class GroupNorm(keras.layers.Layer):
    """gamma and beta per channel; no running statistics, so train and eval mode are the same."""

    def __init__(self, num_features, groups, *, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.num_features, self.groups, self.epsilon = num_features, groups, epsilon

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(self.num_features,), initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=(self.num_features,), initializer="zeros", name="beta", autocast=False)

    def call(self, x, training=False):
        return group_norm(x, self.gamma, self.beta, groups=self.groups, epsilon=self.epsilon)


def whiten(x, gamma, beta, running_mean, running_cov, mask, *, training, decay, epsilon, iterations):
    """Group whitening (common.norms) of channel-last x: returns (y, new_running_mean, new_running_cov). mask:
    whiten_mask's (C, C) block indicator. Training: the batch's mean and covariance within the blocks, blended into
    the running ones (within the blocks only); eval: the running ones."""
    out_dtype, x = x.dtype, in_float32(x)
    channels = mask.shape[0]
    values = tf.reshape(x, [-1, channels])  # (m, C): channel-last, each row one position of one example
    if training:
        mean = tf.reduce_mean(values, axis=0)
        centred = values - mean
        count = tf.cast(tf.shape(values)[0], x.dtype)
        cov = tf.matmul(centred, centred, transpose_a=True) / count * mask
        new_mean = decay * running_mean + (1.0 - decay) * tf.stop_gradient(mean)
        blend = decay * running_cov + (1.0 - decay) * tf.stop_gradient(cov)
        new_cov = mask * blend + (1.0 - mask) * running_cov
    else:
        mean, cov = running_mean, running_cov * mask
        centred = values - mean
        new_mean, new_cov = running_mean, running_cov
    eye = tf.eye(channels, dtype=x.dtype)
    sigma = cov + epsilon * eye
    trace = tf.linalg.matvec(mask, tf.linalg.diag_part(sigma))  # each channel's group's trace
    normalised = sigma / trace[:, None]
    y_k, z_k = normalised, eye  # coupled Newton-Schulz (common.norms): z_k -> normalised^(-1/2)
    for _ in range(iterations):
        t_k = 0.5 * (3.0 * eye - z_k @ y_k)
        y_k, z_k = y_k @ t_k, t_k @ z_k
    x_hat = tf.reshape(tf.matmul(centred, z_k / tf.sqrt(trace)[:, None], transpose_b=True), tf.shape(x))
    return tf.cast(x_hat * gamma + beta, out_dtype), new_mean, new_cov


def mid_ranks(x):
    """Each value's mid-rank within its channel over the batch (and positions), (rank - 1/2) / m with ties sharing
    their mean rank, by two stable sorts (XLA lowers tf.searchsorted to an m x m comparison: 1 TB for conv1 at
    batch 256). A block of ties at sorted places a..b keeps its order in the ascending sort of x and in that of -x,
    so its k-th value is at a + k in the first and at m - 1 - b + k in the second: a + b = first - second + m - 1,
    and (a + b + 1) / (2m) is the mid-rank's grid value."""
    rows = tf.transpose(tf.reshape(x, [-1, x.shape[-1]]))  # (C, m)

    def places(values):  # each value's place in the stable ascending sort of its row
        return tf.argsort(tf.argsort(values, axis=1, stable=True), axis=1, stable=True)

    count = tf.cast(tf.shape(rows)[1], x.dtype)
    grid = (tf.cast(places(rows) - places(-rows), x.dtype) + count) / (2.0 * count)
    return tf.reshape(tf.transpose(grid), tf.shape(x))


def pit(x, gamma, beta, running_mean, running_var, *, training, decay, epsilon, rank=False, standard=False):
    """The Gaussian probability integral transform of BN's x_hat, or (rank) in training mode the mid-ranks with
    its gradient (straight through), standardised to sqrt(12) (u - 1/2) where `standard`; returns (y,
    new_running_mean, new_running_var) as batch_norm."""
    out_dtype, x = x.dtype, in_float32(x)
    ones = tf.ones_like(gamma, dtype=x.dtype)
    x_hat, new_mean, new_var = batch_norm(
        x, ones, tf.zeros_like(ones), running_mean, running_var, training=training, decay=decay, epsilon=epsilon
    )
    u = 0.5 * (1.0 + tf.math.erf(x_hat / math.sqrt(2.0)))
    if rank and training:
        u = u + tf.stop_gradient(mid_ranks(x) - u)
    if standard:
        u = math.sqrt(12.0) * (u - 0.5)
    return tf.cast(u * gamma + beta, out_dtype), new_mean, new_var


class Whiten(keras.layers.Layer):
    """gamma, beta (trainable), running_mean and running_cov (non-trainable weights); whitening groups of `group`
    channels with `iterations` Newton-Schulz iterations."""

    def __init__(self, num_features, *, group=4, iterations=5, decay=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.num_features, self.group, self.iterations = num_features, group, iterations
        self.decay, self.epsilon = decay, epsilon

    def build(self, input_shape):
        c = self.num_features
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta", autocast=False)
        self.running_mean = self.add_weight(
            shape=(c,), initializer="zeros", trainable=False, name="running_mean", autocast=False
        )
        self.running_cov = self.add_weight(
            shape=(c, c), initializer="identity", trainable=False, name="running_cov", autocast=False
        )

    def call(self, x, training=False):
        y, new_mean, new_cov = whiten(
            x,
            self.gamma,
            self.beta,
            self.running_mean,
            self.running_cov,
            tf.constant(whiten_mask(self.num_features, self.group), dtype=self.running_cov.dtype),
            training=bool(training),
            decay=self.decay,
            epsilon=self.epsilon,
            iterations=self.iterations,
        )
        if training:
            self.running_mean.assign(new_mean)
            self.running_cov.assign(new_cov)
        return y


class PIT(BatchNorm):
    """BatchNorm's weights; the Gaussian (rank False) or empirical (rank True) probability integral transform."""

    def __init__(self, num_features, *, rank=False, standard=False, decay=0.9, epsilon=1e-5, **kwargs):
        super().__init__(num_features, decay=decay, epsilon=epsilon, **kwargs)
        self.rank, self.standard = rank, standard

    def normalise(self, *state, training, **constants):
        return pit(*state, training=training, rank=self.rank, standard=self.standard, **constants)
