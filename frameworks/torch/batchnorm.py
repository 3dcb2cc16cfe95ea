"""Scratch batch normalization, batch renormalisation, group normalisation, group whitening and the probability
integral transforms for PyTorch (layer and instance normalisation are group normalisation with 1 and C groups;
common.norms has the spec).

Layout: NCHW (4-D) or NC (2-D). Training mode comes from the module's own
`self.training` flag (`model.train()` / `model.eval()`), never from
`torch.is_grad_enabled()`: a forward under `no_grad` in train mode still uses
batch statistics and still updates the running statistics, as in nn.BatchNorm.

Mixed precision (common.precision): a bfloat16 or float16 input (autocast's
convolution output) is normalised in float32, the statistics and the running
blend included, and the result returned in the input's dtype.
"""

import math

import torch
from torch import nn

from common.norms import renorm_limits, whiten_mask


class ClosedFormBatchNorm(torch.autograd.Function):
    """Training-mode BN with its backward written out (--norm-backward closed-form): the forward is batch_norm's,
    and with x_hat = (x - mean) / sigma over the n values of each channel, the backward is

        dbeta = sum(dy), dgamma = sum(dy x_hat), dx = gamma / sigma (dy - dbeta / n - x_hat dgamma / n),

    what autograd derives from the forward, in two reductions and one elementwise pass instead of the
    dozens of operations it records (docs/reference/benchmark.md). Returns (y, mean, var); the statistics carry
    no gradient."""

    @staticmethod
    def forward(ctx, x, gamma, beta, epsilon):
        axes = (0,) if x.dim() == 2 else (0, 2, 3)
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
        var, mean = torch.var_mean(x, dim=axes, correction=0)
        rstd = torch.rsqrt(var + epsilon)
        x_hat = (x - mean.view(shape)) * rstd.view(shape)
        ctx.save_for_backward(x_hat, gamma, rstd)
        ctx.mark_non_differentiable(mean, var)
        return gamma.view(shape) * x_hat + beta.view(shape), mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x_hat, gamma, rstd = ctx.saved_tensors
        axes = (0,) if dy.dim() == 2 else (0, 2, 3)
        shape = (1, -1) if dy.dim() == 2 else (1, -1, 1, 1)
        n = dy.numel() // dy.shape[1]
        dbeta, dgamma = dy.sum(axes), (dy * x_hat).sum(axes)
        dx = (gamma * rstd).view(shape) * (dy - (dbeta / n).view(shape) - x_hat * (dgamma / n).view(shape))
        return dx, dgamma, dbeta, None


def batch_norm(x, gamma, beta, running_mean, running_var, *, training, decay, epsilon, renorm=None, closed_form=False):
    """Return (y, new_running_mean, new_running_var).

    Training: normalise with the batch mean and biased (1/n) batch variance over
    the batch axis (2-D) or batch and spatial axes (4-D), and blend them into the
    running statistics. Eval: normalise with the running statistics, which are
    returned unchanged. renorm = (rmax, dmax), tensors: batch renormalisation's
    training mode, the batch-normalised values corrected by r and d (no gradient).
    closed_form: training mode through ClosedFormBatchNorm (the same values, BN's backward written out).
    """
    if x.dim() not in (2, 4):
        raise ValueError(
            f"batch_norm expects 2-D (N, C) or 4-D (N, C, H, W) input, got shape "
            f"{tuple(x.shape)}; flatten or reshape before the BN layer"
        )
    out_dtype, x = x.dtype, in_float32(x)
    axes = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    if training:
        if x.numel() // x.shape[1] < 2:
            raise ValueError(
                f"training-mode batch_norm needs more than one value per channel, "
                f"got input shape {tuple(x.shape)}; use a batch of at least 2 or eval mode"
            )
        if closed_form and renorm is None:
            y, mean, var = ClosedFormBatchNorm.apply(x, gamma, beta, epsilon)
            new_mean = decay * running_mean + (1.0 - decay) * mean
            new_var = decay * running_var + (1.0 - decay) * var
            return y.to(out_dtype), new_mean, new_var
        var, mean = torch.var_mean(x, dim=axes, correction=0)  # biased (1/n), as the spec says
        # .detach(): the running statistics must not carry autograd history
        new_mean = decay * running_mean + (1.0 - decay) * mean.detach()
        new_var = decay * running_var + (1.0 - decay) * var.detach()
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + epsilon)
    if training and renorm is not None:
        rmax, dmax = renorm
        sigma = torch.sqrt(running_var + epsilon)
        r = torch.clamp(torch.sqrt(var.detach() + epsilon) / sigma, 1.0 / rmax, rmax)
        d = torch.clamp((mean.detach() - running_mean) / sigma, -dmax, dmax)
        y = y * r.view(shape) + d.view(shape)
    return (gamma.view(shape) * y + beta.view(shape)).to(out_dtype), new_mean, new_var


def ghost_batch_norm(x, gamma, beta, running_mean, running_var, *, ghost, **kwargs):
    """batch_norm in training mode with statistics per contiguous slice of `ghost` examples (ghost batches,
    common.norms): the slices become channels, (N, C, ...) -> (G, S * C, ...), gamma, beta and the running
    statistics are tiled S times, and the new running statistics are averaged back over the slices."""
    n, c, rest = x.shape[0], x.shape[1], tuple(x.shape[2:])
    if n % ghost:
        raise ValueError(f"ghost batches of {ghost} do not divide the batch of {n} (input shape {tuple(x.shape)})")
    s = n // ghost
    folded = x.reshape(s, ghost, c, *rest).transpose(0, 1).reshape(ghost, s * c, *rest)
    y, mean, var = batch_norm(
        folded, gamma.repeat(s), beta.repeat(s), running_mean.repeat(s), running_var.repeat(s), training=True, **kwargs
    )
    y = y.reshape(ghost, s, c, *rest).transpose(0, 1).reshape(x.shape)
    return y, mean.view(s, c).mean(dim=0), var.view(s, c).mean(dim=0)


def synced_batch_norm(x, gamma, beta, running_mean, running_var, *, replicas, decay, epsilon):
    """batch_norm's training mode inside a data-parallel step (frameworks/torch/replicas.py; x is this replica's
    slice). replicas.mean averages a tensor over the replicas through torch.distributed, differentiably.
    Global sync (replicas.pooled): the whole batch's mean and biased variance, two passes (the replicas' mean of
    their slice means, then of their slices' mean squared deviations from it: the slices are equal, so these are
    the global batch's; averaging the replicas' variances instead would drop the spread of their means). Local
    sync: the slice's own. Either way the running statistics blend the replicas' mean of the statistics used, so
    they are the same on every replica (local: the mean of S ghost batches' statistics, common.norms)."""
    out_dtype, x = x.dtype, in_float32(x)
    axes = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    if replicas.pooled:
        mean = replicas.mean(x.mean(dim=axes))
        var = replicas.mean(torch.square(x - mean.view(shape)).mean(dim=axes))
        used_mean, used_var = mean.detach(), var.detach()
    else:
        var, mean = torch.var_mean(x, dim=axes, correction=0)
        used_mean, used_var = replicas.mean(torch.stack([mean.detach(), var.detach()]), differentiable=False)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + epsilon)
    new_mean = decay * running_mean + (1.0 - decay) * used_mean
    new_var = decay * running_var + (1.0 - decay) * used_var
    return (gamma.view(shape) * y + beta.view(shape)).to(out_dtype), new_mean, new_var


def in_float32(x):
    """A reduced-precision input (mixed precision) in float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def group_norm(x, gamma, beta, *, groups, epsilon):
    """Per example, over each of `groups` groups of consecutive channels (with H x W for 4-D input)."""
    if x.dim() not in (2, 4):
        raise ValueError(f"group_norm expects 2-D (N, C) or 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"{groups} groups do not divide the {c} channels of input shape {tuple(x.shape)}")
    out_dtype, x = x.dtype, in_float32(x)
    g = x.reshape(n, groups, -1)
    var, mean = torch.var_mean(g, dim=2, keepdim=True, correction=0)
    y = ((g - mean) * torch.rsqrt(var + epsilon)).reshape(x.shape)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    return (gamma.view(shape) * y + beta.view(shape)).to(out_dtype)


class BatchNorm(nn.Module):
    """Holds gamma, beta (parameters) and the running statistics (buffers, so they are
    saved in state_dict and moved by .to())."""

    def __init__(self, num_features, *, decay=0.9, epsilon=1e-5, ghost=0, closed_form=False):
        super().__init__()
        self.num_features, self.decay, self.epsilon, self.ghost = num_features, decay, epsilon, ghost
        self.closed_form = closed_form
        self.replicas = None  # frameworks/torch/replicas.Replicas while a data-parallel step runs
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def limits(self):
        """(rmax, dmax) of batch renormalisation; None: plain BN."""
        return None

    def normalise(self, *state, **constants):
        """(y, new running mean, new running variance) of one forward outside the ghost and replica cases."""
        return batch_norm(
            *state, training=self.training, renorm=self.limits(), closed_form=self.closed_form, **constants
        )

    def forward(self, x):
        state = (x, self.gamma, self.beta, self.running_mean, self.running_var)
        constants = dict(decay=self.decay, epsilon=self.epsilon)
        if self.training and self.replicas is not None:
            y, new_mean, new_var = synced_batch_norm(*state, replicas=self.replicas, **constants)
        elif self.training and self.ghost and x.shape[0] != self.ghost:
            y, new_mean, new_var = ghost_batch_norm(*state, ghost=self.ghost, **constants)
        else:
            y, new_mean, new_var = self.normalise(*state, **constants)
        if self.training:
            with torch.no_grad():
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
                self.count_step()
        return y

    def count_step(self):
        pass

    def extra_repr(self):
        ghost = f", ghost={self.ghost}" if self.ghost else ""
        closed = ", closed_form=True" if self.closed_form else ""
        return f"{self.num_features}, decay={self.decay}, epsilon={self.epsilon}{ghost}{closed}"


class BatchRenorm(BatchNorm):
    """BatchNorm plus `steps` (a buffer: the training steps taken), which sets the clipping limits."""

    def __init__(self, num_features, *, decay=0.9, epsilon=1e-5, rmax=3.0, dmax=5.0, warmup=1000):
        super().__init__(num_features, decay=decay, epsilon=epsilon)
        self.rmax, self.dmax, self.warmup = rmax, dmax, warmup
        self.register_buffer("steps", torch.zeros(1))

    def limits(self):
        return renorm_limits(
            self.steps,
            self.rmax,
            self.dmax,
            self.warmup,
            minimum=lambda x, top: torch.clamp(x, max=top),
            ones_like=torch.ones_like,
        )

    def count_step(self):
        self.steps.add_(1)

    def extra_repr(self):
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup={self.warmup}"


class GroupNorm(nn.Module):
    """gamma and beta per channel; no running statistics, so train and eval mode are the same."""

    def __init__(self, num_features, groups, *, epsilon=1e-5):
        super().__init__()
        self.num_features, self.groups, self.epsilon = num_features, groups, epsilon
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        return group_norm(x, self.gamma, self.beta, groups=self.groups, epsilon=self.epsilon)

    def extra_repr(self):
        return f"{self.num_features}, groups={self.groups}, epsilon={self.epsilon}"


def channels_rows(x):
    """(N, C) or (N, C, H, W) -> (C, m): each channel's m values in a row."""
    return x.t() if x.dim() == 2 else x.transpose(0, 1).reshape(x.shape[1], -1)


def rows_back(rows, like):
    """channels_rows' inverse, into `like`'s shape."""
    if like.dim() == 2:
        return rows.t()
    n, c, h, w = like.shape
    return rows.reshape(c, n, h, w).transpose(0, 1)


def whiten(x, gamma, beta, running_mean, running_cov, mask, *, training, decay, epsilon, iterations):
    """Group whitening (common.norms): returns (y, new_running_mean, new_running_cov). mask: whiten_mask's (C, C)
    block indicator in x's dtype. Training: the batch's mean and covariance within the blocks, blended into the
    running ones (within the blocks only); eval: the running ones."""
    out_dtype, x = x.dtype, in_float32(x)
    rows = channels_rows(x)
    if training:
        mean = rows.mean(dim=1)
        centred = rows - mean[:, None]
        cov = (centred @ centred.t()) / rows.shape[1] * mask
        new_mean = decay * running_mean + (1.0 - decay) * mean.detach()
        new_cov = mask * (decay * running_cov + (1.0 - decay) * cov.detach()) + (1.0 - mask) * running_cov
    else:
        mean, cov = running_mean, running_cov * mask
        centred = rows - mean[:, None]
        new_mean, new_cov = running_mean, running_cov
    eye = torch.eye(len(mask), dtype=x.dtype, device=x.device)
    sigma = cov + epsilon * eye
    trace = mask @ torch.diagonal(sigma)  # each channel's group's trace
    normalised = sigma / trace[:, None]
    y_k, z_k = normalised, eye  # coupled Newton-Schulz (common.norms): z_k -> normalised^(-1/2)
    for _ in range(iterations):
        t_k = 0.5 * (3.0 * eye - z_k @ y_k)
        y_k, z_k = y_k @ t_k, t_k @ z_k
    x_hat = rows_back((z_k / torch.sqrt(trace)[:, None]) @ centred, x)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    return (gamma.view(shape) * x_hat + beta.view(shape)).to(out_dtype), new_mean, new_cov


def mid_ranks(x):
    """Each value's mid-rank within its channel over the batch (and positions), (rank - 1/2) / m with ties sharing
    their mean rank: (#smaller + #smaller-or-equal) / (2m), by binary search in the sorted channel."""
    rows = channels_rows(x).contiguous()
    ordered = torch.sort(rows, dim=1).values
    below = torch.searchsorted(ordered, rows, right=False) + torch.searchsorted(ordered, rows, right=True)
    return rows_back(below.to(x.dtype) / (2 * rows.shape[1]), x)


def pit(x, gamma, beta, running_mean, running_var, *, training, decay, epsilon, rank=False, standard=False):
    """The Gaussian probability integral transform of BN's x_hat, or (rank) in training mode the mid-ranks with
    its gradient (straight through), standardised to sqrt(12) (u - 1/2) where `standard`; returns (y,
    new_running_mean, new_running_var) as batch_norm."""
    out_dtype, x = x.dtype, in_float32(x)
    ones = torch.ones_like(gamma, dtype=x.dtype)
    x_hat, new_mean, new_var = batch_norm(
        x, ones, torch.zeros_like(ones), running_mean, running_var, training=training, decay=decay, epsilon=epsilon
    )
    u = 0.5 * (1.0 + torch.erf(x_hat / math.sqrt(2.0)))
    if rank and training:
        u = u + (mid_ranks(x.detach()) - u).detach()
    if standard:
        u = math.sqrt(12.0) * (u - 0.5)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    return (gamma.view(shape) * u + beta.view(shape)).to(out_dtype), new_mean, new_var


class Whiten(nn.Module):
    """gamma, beta (parameters), the running mean and covariance (buffers); whitening groups of `group` channels
    with `iterations` Newton-Schulz iterations."""

    def __init__(self, num_features, *, group=4, iterations=5, decay=0.9, epsilon=1e-5):
        super().__init__()
        self.num_features, self.group, self.iterations = num_features, group, iterations
        self.decay, self.epsilon = decay, epsilon
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_cov", torch.eye(num_features))
        self.register_buffer("mask", torch.as_tensor(whiten_mask(num_features, group), dtype=torch.float32), False)

    def forward(self, x):
        y, new_mean, new_cov = whiten(
            x,
            self.gamma,
            self.beta,
            self.running_mean,
            self.running_cov,
            self.mask.to(self.running_cov.dtype),
            training=self.training,
            decay=self.decay,
            epsilon=self.epsilon,
            iterations=self.iterations,
        )
        if self.training:
            with torch.no_grad():
                self.running_mean.copy_(new_mean)
                self.running_cov.copy_(new_cov)
        return y

    def extra_repr(self):
        return f"{self.num_features}, group={self.group}, iterations={self.iterations}, decay={self.decay}"


class PIT(BatchNorm):
    """BatchNorm's parameters and running statistics; the Gaussian (rank False) or empirical (rank True) PIT."""

    def __init__(self, num_features, *, rank=False, standard=False, decay=0.9, epsilon=1e-5):
        super().__init__(num_features, decay=decay, epsilon=epsilon)
        self.rank, self.standard = rank, standard

    def normalise(self, *state, **constants):
        return pit(*state, training=self.training, rank=self.rank, standard=self.standard, **constants)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, standard={self.standard}"
