"""Scratch batch normalization, batch renormalisation, group normalisation, group whitening and the probability
integral transforms for JAX / Flax (layer and instance normalisation are group normalisation with 1 and C groups;
common.norms has the spec).

`batch_norm` is a pure function: the running statistics go in and the new ones
come out, nothing is mutated, and the mode is a required keyword (there is no
default to forget). Layout NHWC (4-D, normalised over batch and spatial axes per
channel) or NC (2-D). The normalisation is written (x - mean) * inv_std * gamma + beta,
with the variance from the centred values (two passes), never E[x^2] - E[x]^2.

`BatchNorm` is the Flax (linen) layer around it: gamma and beta in the "params"
collection, running_mean and running_var in "batch_stats". In training mode the
caller must declare "batch_stats" mutable (`apply(..., mutable=["batch_stats"])`)
and keep the returned statistics; assigning to an immutable collection is Flax's
error, which we let through rather than silently dropping the update.

Mixed precision (common.precision; modules with dtype=bfloat16): a bfloat16
input is normalised in float32 (the layers' `dtype`, that of their parameters and
running statistics), the statistics and the running blend included, and the
result returned in the input's dtype.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from common.norms import renorm_limits, whiten_mask


def _closed_form_forward(x, gamma, beta, epsilon):
    """(y, mean, var) of training-mode BN, channels last, and what its written-out backward keeps."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=axes)
    rstd = lax.rsqrt(var + epsilon)
    x_hat = centred * rstd
    return (x_hat * gamma + beta, mean, var), (x_hat, gamma, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def closed_form_batch_norm(x, gamma, beta, epsilon):
    """Training-mode BN with its backward written out (--norm-backward closed-form), channels last: (y, mean, var),
    the statistics without gradient. With x_hat = (x - mean) / sigma over the n values of each channel, the
    backward is dbeta = sum(dy), dgamma = sum(dy x_hat), dx = gamma / sigma (dy - dbeta / n - x_hat dgamma / n):
    what autodiff derives from batch_norm's forward, in fewer passes (docs/reference/benchmark.md)."""
    return _closed_form_forward(x, gamma, beta, epsilon)[0]


def _closed_form_backward(epsilon, saved, cotangents):
    x_hat, gamma, rstd = saved
    dy = cotangents[0]  # the statistics' cotangents are zero: they feed only the running statistics
    axes = tuple(range(dy.ndim - 1))
    n = dy.size // dy.shape[-1]
    dbeta, dgamma = jnp.sum(dy, axis=axes), jnp.sum(dy * x_hat, axis=axes)
    return (gamma * rstd) * (dy - dbeta / n - x_hat * (dgamma / n)), dgamma, dbeta


closed_form_batch_norm.defvjp(_closed_form_forward, _closed_form_backward)


def batch_norm(x, gamma, beta, running_mean, running_var, *, training, decay, epsilon, renorm=None, closed_form=False):
    """Return (y, new_running_mean, new_running_var); eval mode returns the running ones unchanged.
    renorm = (rmax, dmax): batch renormalisation's training mode (r and d carry no gradient).
    closed_form: training mode through closed_form_batch_norm (the same values, BN's backward written out)."""
    if x.ndim not in (2, 4):
        raise ValueError(
            f"batch_norm expects 2-D (N, C) or 4-D (N, H, W, C) input, got shape {tuple(x.shape)}; "
            f"flatten or reshape before the BN layer"
        )
    axes = (0,) if x.ndim == 2 else (0, 1, 2)
    out_dtype, x = x.dtype, in_float32(x)
    if training:
        per_channel = 1
        for axis in axes:
            per_channel *= x.shape[axis]
        if per_channel < 2:
            raise ValueError(
                f"training-mode batch_norm needs more than one value per channel, got input shape "
                f"{tuple(x.shape)}; use a batch of at least 2 or eval mode"
            )
        if closed_form and renorm is None:
            y, mean, var = closed_form_batch_norm(x, gamma, beta, epsilon)
            new_mean = decay * running_mean + (1.0 - decay) * lax.stop_gradient(mean)
            new_var = decay * running_var + (1.0 - decay) * lax.stop_gradient(var)
            return y.astype(out_dtype), new_mean, new_var
        mean = jnp.mean(x, axis=axes)
        # Biased (1/n), two passes. The mean inside carries no gradient: the variance's gradient through it is
        # -2 * mean(x - mean) = 0, so this drops only rounding, and a backward pass over x (docs/benchmark.md,
        # "Execution modes", has what it saves).
        var = jnp.mean(jnp.square(x - lax.stop_gradient(mean)), axis=axes)
        # stop_gradient: the running statistics are state, not part of the differentiated function
        new_mean = decay * running_mean + (1.0 - decay) * lax.stop_gradient(mean)
        new_var = decay * running_var + (1.0 - decay) * lax.stop_gradient(var)
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    y = (x - mean) * lax.rsqrt(var + epsilon)  # channel-last: broadcasts over the last axis
    if training and renorm is not None:
        rmax, dmax = renorm
        sigma = jnp.sqrt(running_var + epsilon)
        r = jnp.clip(jnp.sqrt(lax.stop_gradient(var) + epsilon) / sigma, 1.0 / rmax, rmax)
        d = jnp.clip((lax.stop_gradient(mean) - running_mean) / sigma, -dmax, dmax)
        y = y * r + d
    return (y * gamma + beta).astype(out_dtype), new_mean, new_var


def ghost_batch_norm(x, gamma, beta, running_mean, running_var, *, ghost, **kwargs):
    """batch_norm in training mode with statistics per contiguous slice of `ghost` examples (ghost batches,
    common.norms): the slices become channels, (N, ..., C) -> (G, ..., S * C), gamma, beta and the running
    statistics are tiled S times, and the new running statistics are averaged back over the slices."""
    n, c, rest = x.shape[0], x.shape[-1], x.shape[1:-1]
    if n % ghost:
        raise ValueError(f"ghost batches of {ghost} do not divide the batch of {n} (input shape {tuple(x.shape)})")
    s = n // ghost
    folded = jnp.moveaxis(x.reshape((s, ghost, *rest, c)), 0, -2).reshape((ghost, *rest, s * c))
    y, mean, var = batch_norm(
        folded, *(jnp.tile(v, s) for v in (gamma, beta, running_mean, running_var)), training=True, **kwargs
    )
    y = jnp.moveaxis(y.reshape((ghost, *rest, s, c)), -2, 0).reshape(x.shape)
    return y, mean.reshape(s, c).mean(axis=0), var.reshape(s, c).mean(axis=0)


class Replicas:
    """This replica's view of a data-parallel step over a mesh axis: whether BN pools the whole batch's statistics
    (pooled: global sync) and the mean of a value over the replicas (lax.pmean, differentiable)."""

    def __init__(self, axis_name, pooled):
        self.axis_name, self.pooled = axis_name, pooled

    def mean(self, value, differentiable=True):
        return lax.pmean(value, self.axis_name)


def synced_batch_norm(x, gamma, beta, running_mean, running_var, *, replicas, decay, epsilon):
    """batch_norm's training mode inside a data-parallel step (shard_map; x is this replica's slice, replicas a
    Replicas). Global sync (replicas.pooled): the whole batch's mean and biased variance, two passes (the replicas'
    mean of their slice means, then of their slices' mean squared deviations from it: the slices are equal, so these
    are the global batch's); local sync: the slice's own. Either way the running statistics blend the replicas'
    mean of the statistics used, so every replica holds the same ones."""
    out_dtype, x = x.dtype, in_float32(x)
    axes = (0,) if x.ndim == 2 else (0, 1, 2)
    if replicas.pooled:
        mean = replicas.mean(jnp.mean(x, axis=axes))
        var = replicas.mean(jnp.mean(jnp.square(x - mean), axis=axes))
        used_mean, used_var = lax.stop_gradient(mean), lax.stop_gradient(var)
    else:
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - lax.stop_gradient(mean)), axis=axes)
        used_mean, used_var = replicas.mean(lax.stop_gradient(jnp.stack([mean, var])), differentiable=False)
    y = (x - mean) * lax.rsqrt(var + epsilon)
    new_mean = decay * running_mean + (1.0 - decay) * used_mean
    new_var = decay * running_var + (1.0 - decay) * used_var
    return (y * gamma + beta).astype(out_dtype), new_mean, new_var


def in_float32(x):
    """A reduced-precision input (mixed precision) in float32; float32 and float64 unchanged."""
    return x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x


def group_norm(x, gamma, beta, *, groups, epsilon):
    """Per example, over each of `groups` groups of consecutive channels (with H x W for 4-D NHWC input)."""
    if x.ndim not in (2, 4):
        raise ValueError(f"group_norm expects 2-D (N, C) or 4-D (N, H, W, C) input, got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    if channels % groups:
        raise ValueError(f"{groups} groups do not divide the {channels} channels of input shape {tuple(x.shape)}")
    out_dtype, x = x.dtype, in_float32(x)
    g = x.reshape(x.shape[:-1] + (groups, channels // groups))
    axes = (2,) if x.ndim == 2 else (1, 2, 4)  # of (N, G, C/G) or (N, H, W, G, C/G)
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
    return (((g - mean) * lax.rsqrt(var + epsilon)).reshape(x.shape) * gamma + beta).astype(out_dtype)


class BatchNorm(nn.Module):
    """Our batch_norm as a Flax layer; `training` is a required argument of every call."""

    num_features: int
    decay: float = 0.9
    epsilon: float = 1e-5
    dtype: str = "float32"
    ghost: int = 0  # ghost batches (common.norms): training-mode statistics per slice of this many examples
    replicas: tuple | None = None  # (axis name, pooled) inside a data-parallel step (backend.JaxBackend)
    closed_form: bool = False  # the training-mode backward written out (--norm-backward closed-form)

    @nn.compact
    def __call__(self, x, *, training):
        shape = (self.num_features,)
        gamma = self.param("gamma", nn.initializers.ones, shape, self.dtype)
        beta = self.param("beta", nn.initializers.zeros, shape, self.dtype)
        running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, shape, self.dtype)
        running_var = self.variable("batch_stats", "running_var", jnp.ones, shape, self.dtype)
        state = (x, gamma, beta, running_mean.value, running_var.value)
        constants = dict(decay=self.decay, epsilon=self.epsilon)
        if training and self.replicas is not None:
            y, new_mean, new_var = synced_batch_norm(*state, replicas=Replicas(*self.replicas), **constants)
        elif training and self.ghost and x.shape[0] != self.ghost:
            y, new_mean, new_var = ghost_batch_norm(*state, ghost=self.ghost, **constants)
        else:
            y, new_mean, new_var = self.normalise(*state, training=training, **constants)
        if training and not self.is_initializing():
            running_mean.value, running_var.value = new_mean, new_var
        return y

    def limits(self, training):
        """(rmax, dmax) of batch renormalisation; None: plain BN."""
        return None

    def normalise(self, *state, training, **constants):
        """(y, new running mean, new running variance) of one call outside the ghost and replica cases."""
        return batch_norm(
            *state, training=training, renorm=self.limits(training), closed_form=self.closed_form, **constants
        )


class BatchRenorm(BatchNorm):
    """BatchNorm plus `steps` in "batch_stats" (the training steps taken), which sets the clipping limits."""

    rmax: float = 3.0
    dmax: float = 5.0
    warmup: int = 1000

    def limits(self, training):
        steps = self.variable("batch_stats", "steps", jnp.zeros, (1,), self.dtype)
        limits = renorm_limits(
            steps.value, self.rmax, self.dmax, self.warmup, minimum=jnp.minimum, ones_like=jnp.ones_like
        )
        if training and not self.is_initializing():
            steps.value = steps.value + 1
        return limits


class GroupNorm(nn.Module):
    """Our group_norm as a Flax layer: gamma and beta per channel, no running statistics (train = eval)."""

    num_features: int
    groups: int
    epsilon: float = 1e-5
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.ones, (self.num_features,), self.dtype)
        beta = self.param("beta", nn.initializers.zeros, (self.num_features,), self.dtype)
        return group_norm(x, gamma, beta, groups=self.groups, epsilon=self.epsilon)


def whiten(x, gamma, beta, running_mean, running_cov, mask, *, training, decay, epsilon, iterations):
    """Group whitening (common.norms) of channel-last x: returns (y, new_running_mean, new_running_cov). mask:
    whiten_mask's (C, C) block indicator. Training: the batch's mean and covariance within the blocks, blended into
    the running ones (within the blocks only); eval: the running ones."""
    out_dtype, x = x.dtype, in_float32(x)
    values = x.reshape(-1, x.shape[-1])  # (m, C): channel-last, each row one position of one example
    if training:
        mean = jnp.mean(values, axis=0)
        centred = values - mean
        cov = (centred.T @ centred) / values.shape[0] * mask
        new_mean = decay * running_mean + (1.0 - decay) * lax.stop_gradient(mean)
        blend = decay * running_cov + (1.0 - decay) * lax.stop_gradient(cov)
        new_cov = mask * blend + (1.0 - mask) * running_cov
    else:
        mean, cov = running_mean, running_cov * mask
        centred = values - mean
        new_mean, new_cov = running_mean, running_cov
    eye = jnp.eye(mask.shape[0], dtype=x.dtype)
    sigma = cov + epsilon * eye
    trace = mask @ jnp.diagonal(sigma)  # each channel's group's trace
    normalised = sigma / trace[:, None]
    y_k, z_k = normalised, eye  # coupled Newton-Schulz (common.norms): z_k -> normalised^(-1/2)
    for _ in range(iterations):
        t_k = 0.5 * (3.0 * eye - z_k @ y_k)
        y_k, z_k = y_k @ t_k, t_k @ z_k
    x_hat = (centred @ (z_k / jnp.sqrt(trace)[:, None]).T).reshape(x.shape)
    return (x_hat * gamma + beta).astype(out_dtype), new_mean, new_cov


def mid_ranks(x):
    """Each value's mid-rank within its channel over the batch (and positions), (rank - 1/2) / m with ties sharing
    their mean rank: (#smaller + #smaller-or-equal) / (2m), by binary search in the sorted channel."""
    rows = x.reshape(-1, x.shape[-1]).T  # (C, m)
    ordered = jnp.sort(rows, axis=1)
    left = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(ordered, rows)
    right = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right"))(ordered, rows)
    return ((left + right).astype(x.dtype) / (2 * rows.shape[1])).T.reshape(x.shape)


def pit(x, gamma, beta, running_mean, running_var, *, training, decay, epsilon, rank=False, standard=False):
    """The Gaussian probability integral transform of BN's x_hat, or (rank) in training mode the mid-ranks with
    its gradient (straight through), standardised to sqrt(12) (u - 1/2) where `standard`; returns (y,
    new_running_mean, new_running_var) as batch_norm."""
    out_dtype, x = x.dtype, in_float32(x)
    ones = jnp.ones_like(gamma, dtype=x.dtype)
    x_hat, new_mean, new_var = batch_norm(
        x, ones, jnp.zeros_like(ones), running_mean, running_var, training=training, decay=decay, epsilon=epsilon
    )
    u = 0.5 * (1.0 + jax.scipy.special.erf(x_hat / math.sqrt(2.0)))
    if rank and training:
        u = u + lax.stop_gradient(mid_ranks(x) - u)
    if standard:
        u = math.sqrt(12.0) * (u - 0.5)
    return (u * gamma + beta).astype(out_dtype), new_mean, new_var


class Whiten(nn.Module):
    """Our whiten as a Flax layer: gamma and beta in "params", running_mean and running_cov in "batch_stats";
    `training` is a required argument of every call."""

    num_features: int
    group: int = 4
    iterations: int = 5
    decay: float = 0.9
    epsilon: float = 1e-5
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, *, training):
        c = self.num_features
        gamma = self.param("gamma", nn.initializers.ones, (c,), self.dtype)
        beta = self.param("beta", nn.initializers.zeros, (c,), self.dtype)
        running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), self.dtype)
        running_cov = self.variable("batch_stats", "running_cov", lambda: jnp.eye(c, dtype=self.dtype))
        mask = jnp.asarray(whiten_mask(c, self.group), dtype=self.dtype)
        y, new_mean, new_cov = whiten(
            x,
            gamma,
            beta,
            running_mean.value,
            running_cov.value,
            mask,
            training=training,
            decay=self.decay,
            epsilon=self.epsilon,
            iterations=self.iterations,
        )
        if training and not self.is_initializing():
            running_mean.value, running_cov.value = new_mean, new_cov
        return y


class PIT(BatchNorm):
    """BatchNorm's parameters and running statistics; the Gaussian (rank False) or empirical (rank True) PIT."""

    rank: bool = False
    standard: bool = False

    def normalise(self, *state, training, **constants):
        return pit(*state, training=training, rank=self.rank, standard=self.standard, **constants)
