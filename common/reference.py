"""Float64 numpy reference of BN, the other normalisations (common.norms) and BN-LeNet: the oracle for every test.

Written for clarity, not speed. Conventions are the project's specification:
biased batch variance, running = decay * running + (1 - decay) * batch.
"""

from __future__ import annotations

import numpy as np

from .config import ModelSpec
from .init import has_bias
from .norms import NORM_NAMES, groups_of, renorm_limits, whiten_groups


def _axes(x: np.ndarray) -> tuple:
    if x.ndim == 2:
        return (0,)
    if x.ndim == 4:
        return (0, 2, 3)
    raise ValueError(f"batch_norm expects 2-D or 4-D input, got {x.ndim}-D")


def _shape(x: np.ndarray) -> tuple:
    return (1, -1) if x.ndim == 2 else (1, -1, 1, 1)


def batch_norm_forward(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    *,
    training: bool,
    decay: float = 0.9,
    epsilon: float = 1e-5,
    renorm: tuple | None = None,
):
    """Returns (y, new_running_mean, new_running_var, cache for the backward).

    renorm = (rmax, dmax): batch renormalisation's training mode (common.norms), else BN."""
    x = np.asarray(x, dtype=np.float64)
    axes, shape = _axes(x), _shape(x)
    r = d = None
    if training:
        mean = x.mean(axis=axes)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)  # biased (1/n)
        if renorm is not None:
            rmax, dmax = renorm
            sigma = np.sqrt(np.asarray(running_var, np.float64) + epsilon)
            r = np.clip(np.sqrt(var + epsilon) / sigma, 1.0 / rmax, rmax)
            d = np.clip((mean - running_mean) / sigma, -dmax, dmax)
        new_mean = decay * running_mean + (1 - decay) * mean
        new_var = decay * running_var + (1 - decay) * var
    else:
        mean, var = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
        new_mean, new_var = running_mean, running_var
    inv_std = 1.0 / np.sqrt(var + epsilon)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    corrected = x_hat if r is None else x_hat * r.reshape(shape) + d.reshape(shape)
    y = gamma.reshape(shape) * corrected + beta.reshape(shape)
    cache = (x_hat, inv_std, np.asarray(gamma, np.float64), axes, shape, training, r, corrected)
    return y, np.asarray(new_mean, np.float64), np.asarray(new_var, np.float64), cache


def batch_norm_backward(dy, cache):
    """Gradients (dx, dgamma, dbeta) of sum(dy * y) for the forward that made cache (r, d: constants)."""
    x_hat, inv_std, gamma, axes, shape, training, r, corrected = cache
    dy = np.asarray(dy, dtype=np.float64)
    dgamma = (dy * corrected).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    dx_hat = dy * gamma.reshape(shape) * (1.0 if r is None else r.reshape(shape))
    if not training:  # running statistics are constants
        return dx_hat * inv_std.reshape(shape), dgamma, dbeta
    n = dy.size // dy.shape[1]
    dx = (inv_std.reshape(shape) / n) * (
        n * dx_hat - dx_hat.sum(axis=axes, keepdims=True) - x_hat * (dx_hat * x_hat).sum(axis=axes, keepdims=True)
    )
    return dx, dgamma, dbeta


# The research exercise's transforms (common.norms: whiten, pit, pit-rank) ----------------------------------------
def newton_schulz_inverse_sqrt(cov, iterations: int):
    """cov^(-1/2) for a symmetric positive definite g x g matrix by T coupled Newton-Schulz iterations (common.norms,
    whiten) on the trace-normalised matrix A = cov / tr(cov): Y_0 = A, Z_0 = I, T_k = (3 I - Z_(k-1) Y_(k-1)) / 2,
    Y_k = Y_(k-1) T_k, Z_k = T_k Z_(k-1); then Z_T / sqrt(tr(cov)). In exact arithmetic Z_k is IterNorm's P_k, so T
    sets how white the output is as in IterNorm; the coupled form stays at the limit once there, where IterNorm's
    P_k = (3 P - P^3 A) / 2 amplifies its rounding. Works in whatever dtype cov has (complex for a complex-step
    derivative)."""
    if iterations < 1:
        raise ValueError(f"Newton-Schulz needs at least 1 iteration, got {iterations}")
    trace = np.trace(cov)
    y = cov / trace
    identity = np.eye(len(cov), dtype=y.dtype)
    z = identity
    for _ in range(iterations):
        t = 0.5 * (3.0 * identity - z @ y)
        y, z = y @ t, t @ z
    return z / np.sqrt(trace)


def exact_inverse_sqrt(cov):
    """cov^(-1/2) by eigendecomposition (ZCA's whitening matrix), float64."""
    values, vectors = np.linalg.eigh(np.asarray(cov, np.float64))
    return (vectors / np.sqrt(values)) @ vectors.T


def whiten_forward(
    x,
    gamma,
    beta,
    running_mean,
    running_cov,
    *,
    training: bool,
    group: int,
    iterations: int = 5,
    decay: float = 0.9,
    epsilon: float = 1e-5,
    exact: bool = False,
):
    """Group whitening (common.norms, whiten) of (N, C, H, W) or (N, C) input. running_cov: (C, C), used and
    updated only within each group's block. exact: the exact inverse square root (ZCA) in place of Newton-Schulz.
    Returns (y, new running mean, new running covariance, x_hat). Stays in x's dtype when it is complex (the
    complex-step derivative, `complex_step_gradient`), else float64."""
    x = np.asarray(x) if np.iscomplexobj(x) else np.asarray(x, np.float64)
    axes, shape = _axes(x), _shape(x)
    channels = x.shape[1]
    new_mean = np.array(running_mean, dtype=np.result_type(x, np.float64))
    new_cov = np.array(running_cov, dtype=np.result_type(x, np.float64))
    if training:
        mean = x.mean(axis=axes)  # as BN's, so that g = 1 is BN bit for bit
        centred = x - mean.reshape(shape)
        # column j of the covariance: each channel's values times channel j's, averaged as BN averages its squares
        cov = np.stack([(centred * centred[:, j : j + 1]).mean(axis=axes) for j in range(channels)], axis=1)
        new_mean = decay * new_mean + (1 - decay) * mean
    else:
        mean = np.asarray(running_mean)
        centred = x - mean.reshape(shape)
        cov = np.asarray(running_cov)
    x_hat = np.zeros_like(centred)
    for start, stop in whiten_groups(channels, group):
        block = cov[start:stop, start:stop] + epsilon * np.eye(stop - start)
        w = exact_inverse_sqrt(block) if exact else newton_schulz_inverse_sqrt(block, iterations)
        # x_hat's channel i: sum_j w[i, j] * centred channel j, in j's order (one term at g = 1: BN's product)
        for i in range(stop - start):
            x_hat[:, start + i] = sum(w[i, j] * centred[:, start + j] for j in range(stop - start))
        if training:
            new_cov[start:stop, start:stop] = (
                decay * new_cov[start:stop, start:stop] + (1 - decay) * cov[start:stop, start:stop]
            )
    y = np.asarray(gamma).reshape(shape) * x_hat + np.asarray(beta).reshape(shape)
    return y, new_mean, new_cov, x_hat


def pit_forward(
    x, gamma, beta, running_mean, running_var, *, training: bool, decay=0.9, epsilon=1e-5, rank=False, standard=False
):
    """pit (rank=False) or pit-rank (common.norms): returns (y, new running mean, new running variance, u, cache)
    with u the transform's values in (0, 1); y = gamma * u + beta, or with `standard` (--pit-scale standard)
    gamma * sqrt(12) (u - 1/2) + beta. cache is BN's, for `pit_backward`."""
    from scipy.special import ndtr

    x = np.asarray(x, np.float64)
    _, new_mean, new_var, cache = batch_norm_forward(
        x,
        np.ones(x.shape[1]),
        np.zeros(x.shape[1]),
        running_mean,
        running_var,
        training=training,
        decay=decay,
        epsilon=epsilon,
    )
    x_hat = cache[0]
    u = mid_ranks(x) if rank and training else ndtr(x_hat)
    factor = np.sqrt(12.0) if standard else 1.0
    out = factor * (u - 0.5) if standard else u
    shape = _shape(x)
    y = np.asarray(gamma, np.float64).reshape(shape) * out + np.asarray(beta, np.float64).reshape(shape)
    return y, new_mean, new_var, u, (cache, np.asarray(gamma, np.float64), out, factor)


def pit_backward(dy, cache):
    """Gradients (dx, dgamma, dbeta) of sum(dy * y) for pit, and pit-rank's surrogate: the Gaussian PIT's
    derivative phi(x_hat) (times sqrt(12) when standardised) through BN's backward (dgamma from the values the
    forward used)."""
    bn_cache, gamma, u, factor = cache
    x_hat, axes, shape = bn_cache[0], bn_cache[3], bn_cache[4]
    dy = np.asarray(dy, np.float64)
    density = factor * np.exp(-0.5 * x_hat**2) / np.sqrt(2 * np.pi)
    dx, _, _ = batch_norm_backward(dy * gamma.reshape(shape) * density, bn_cache)  # bn_cache's gamma is 1
    return dx, (dy * u).sum(axis=axes), dy.sum(axis=axes)


def mid_ranks(x):
    """Each value's mid-rank within its channel over the batch (and positions), (rank - 1/2) / m, ties sharing
    the mean of their ranks."""
    from scipy.stats import rankdata

    x = np.asarray(x, np.float64)
    moved = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])  # (m, C)
    ranks = (rankdata(moved, axis=0) - 0.5) / len(moved)
    return np.moveaxis(ranks.reshape(np.moveaxis(x, 1, -1).shape), -1, 1)


def output_departure(spec: ModelSpec, x, epsilon: float) -> dict:
    """How far a research transform's training-mode output (before gamma and beta) on the values x (NCHW / NC,
    one layer's input) is from what it aims at: {"whiteness": the relative Frobenius distance of each whitening
    group's covariance of x_hat from I, ||Cov - I||_F / ||I||_F, mean over the groups} for whiten, {"ks_uniform":
    the Kolmogorov-Smirnov distance of each channel's values from U(0, 1), mean over the channels} for pit and
    pit-rank, {} for the other norms. What the epoch probe reports per layer (common.population.divergence)."""
    x = np.asarray(x, np.float64)
    channels = x.shape[1]
    if spec.norm == "whiten":
        identity = np.eye(channels)
        _, _, _, x_hat = whiten_forward(
            x,
            np.ones(channels),
            np.zeros(channels),
            np.zeros(channels),
            identity,
            training=True,
            group=spec.whiten_group,
            iterations=spec.whiten_iterations,
            epsilon=epsilon,
        )
        flat = np.moveaxis(x_hat, 1, -1).reshape(-1, channels)
        cov = flat.T @ flat / len(flat)  # x_hat is centred: its mean is 0 to rounding
        return {
            "whiteness": float(
                np.mean(
                    [
                        np.linalg.norm(cov[a:b, a:b] - identity[a:b, a:b]) / np.sqrt(b - a)
                        for a, b in whiten_groups(channels, spec.whiten_group)
                    ]
                )
            )
        }
    if spec.norm in ("pit", "pit-rank"):
        state = {"running_mean": np.zeros(channels), "running_var": np.ones(channels)}
        u = pit_forward(
            x,
            np.ones(channels),
            np.zeros(channels),
            **state,
            training=True,
            epsilon=epsilon,
            rank=spec.norm == "pit-rank",
        )[3]
        ordered = np.sort(np.moveaxis(u, 1, 0).reshape(channels, -1), axis=1)
        m = ordered.shape[1]
        grid = np.arange(1, m + 1) / m
        distance = np.maximum(grid - ordered, ordered - (grid - 1 / m)).max(axis=1)
        return {"ks_uniform": float(distance.mean())}
    return {}


def complex_step_gradient(f, x, h: float = 1e-30):
    """The gradient of a real scalar function f at x by the complex step, Im f(x + i h e_k) / h per element:
    exact to rounding (no cancellation, unlike a finite difference), for f written in complex-safe operations."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for k in np.ndindex(x.shape):
        z = x.astype(np.complex128)
        z[k] += 1j * h
        grad[k] = np.imag(f(z)) / h
    return grad


def group_norm_forward(x, gamma, beta, *, groups: int, epsilon: float = 1e-5):
    """Group normalisation of (N, C, H, W) or (N, C) input (layer: groups=1, instance: groups=C).
    Returns (y, cache for the backward)."""
    x = np.asarray(x, dtype=np.float64)
    shape = _shape(x)
    _axes(x)  # 2-D or 4-D only
    n, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"{groups} groups do not divide {c} channels")
    g = x.reshape(n, groups, -1)  # consecutive channels form a group
    mean = g.mean(axis=2, keepdims=True)
    inv_std = 1.0 / np.sqrt(((g - mean) ** 2).mean(axis=2, keepdims=True) + epsilon)
    x_hat = ((g - mean) * inv_std).reshape(x.shape)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return y, (x_hat, inv_std, np.asarray(gamma, np.float64), groups)


def group_norm_backward(dy, cache):
    """Gradients (dx, dgamma, dbeta) of sum(dy * y) for the forward that made cache."""
    x_hat, inv_std, gamma, groups = cache
    dy = np.asarray(dy, dtype=np.float64)
    axes, shape = _axes(dy), _shape(dy)
    dgamma, dbeta = (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)
    n = dy.shape[0]
    dx_hat = (dy * gamma.reshape(shape)).reshape(n, groups, -1)
    xh = x_hat.reshape(n, groups, -1)
    count = xh.shape[2]
    dx = (inv_std / count) * (
        count * dx_hat - dx_hat.sum(axis=2, keepdims=True) - xh * (dx_hat * xh).sum(axis=2, keepdims=True)
    )
    return dx.reshape(dy.shape), dgamma, dbeta


def norm_forward(
    spec: ModelSpec, x, state: dict, *, training: bool, epsilon: float | None = None, decay: float | None = None
):
    """One layer of spec.norm. state: canonical suffix -> array (gamma, beta, and running_mean,
    running_var, steps where the norm has them). Returns (y, new state, cache, kind) where kind is
    "batch" or "group" (which backward applies)."""
    eps = spec.epsilon if epsilon is None else epsilon
    dec = spec.decay if decay is None else decay
    x = np.asarray(x, dtype=np.float64)
    new = dict(state)
    if spec.norm == "batch" and training and spec.ghost_batch and len(x) != spec.ghost_batch:
        return ghost_batch_norm_forward(spec, x, state, epsilon=eps, decay=dec)
    if spec.norm in ("batch", "renorm"):
        renorm = (
            renorm_limits(
                float(np.asarray(state["steps"]).reshape(-1)[0]), spec.renorm_rmax, spec.renorm_dmax, spec.renorm_warmup
            )
            if spec.norm == "renorm" and training
            else None
        )
        y, new["running_mean"], new["running_var"], cache = batch_norm_forward(
            x,
            state["gamma"],
            state["beta"],
            state["running_mean"],
            state["running_var"],
            training=training,
            decay=dec,
            epsilon=eps,
            renorm=renorm,
        )
        if renorm is not None:
            new["steps"] = np.asarray(state["steps"], np.float64) + 1
        return y, new, cache, "batch"
    if spec.norm == "whiten":

        def whiten(z, gamma, beta):  # complex-safe in z: whiten_backward's complex step runs it with gamma 1, beta 0
            return whiten_forward(
                z,
                gamma,
                beta,
                state["running_mean"],
                state["running_cov"],
                training=training,
                group=spec.whiten_group,
                iterations=spec.whiten_iterations,
                decay=dec,
                epsilon=eps,
            )

        y, new["running_mean"], new["running_cov"], x_hat = whiten(x, state["gamma"], state["beta"])
        ones, zeros = np.ones(x.shape[1]), np.zeros(x.shape[1])
        transform = lambda z: whiten(z, ones, zeros)[0]  # noqa: E731 (x -> x_hat, the state fixed)
        return y, new, (x, np.asarray(state["gamma"], np.float64), x_hat, transform), "whiten"
    if spec.norm in ("pit", "pit-rank"):
        y, new["running_mean"], new["running_var"], _, cache = pit_forward(
            x,
            state["gamma"],
            state["beta"],
            state["running_mean"],
            state["running_var"],
            training=training,
            decay=dec,
            epsilon=eps,
            rank=spec.norm == "pit-rank",
            standard=spec.pit_scale == "standard",
        )
        return y, new, cache, "pit"
    y, cache = group_norm_forward(x, state["gamma"], state["beta"], groups=groups_of(spec, x.shape[1]), epsilon=eps)
    return y, new, cache, "group"


def whiten_backward(dy, cache):
    """Gradients (dx, dgamma, dbeta) of sum(dy * y) for whiten: dx by the complex step through the whole transform
    (exact to rounding; small inputs only, one forward per element), dgamma and dbeta as for any affine step."""
    x, gamma, x_hat, transform = cache
    dy = np.asarray(dy, np.float64)
    axes, shape = _axes(x), _shape(x)
    weighted = dy * gamma.reshape(shape)
    dx = complex_step_gradient(lambda z: np.sum(weighted * transform(z)), x)
    return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)


def ghost_batch_norm_forward(spec: ModelSpec, x, state: dict, *, epsilon: float, decay: float):
    """BN's training mode over ghost batches (common.norms): each slice of spec.ghost_batch examples normalised
    on its own, the running statistics blending the mean over the slices of their mean and biased variance.
    Returns norm_forward's (y, new state, cache, "ghost")."""
    ghost = spec.ghost_batch
    if len(x) % ghost:
        raise ValueError(f"ghost batches of {ghost} do not divide the batch of {len(x)}")
    ys, means, variances, caches = [], [], [], []
    for start in range(0, len(x), ghost):
        y, mean, var, cache = batch_norm_forward(
            x[start : start + ghost], state["gamma"], state["beta"], 0.0, 0.0, training=True, decay=0.0, epsilon=epsilon
        )
        ys.append(y)
        means.append(mean)
        variances.append(var)
        caches.append(cache)
    new = dict(state)
    new["running_mean"] = decay * np.asarray(state["running_mean"], np.float64) + (1 - decay) * np.mean(means, axis=0)
    new["running_var"] = decay * np.asarray(state["running_var"], np.float64) + (1 - decay) * np.mean(variances, axis=0)
    return np.concatenate(ys), new, (ghost, caches), "ghost"


def norm_backward(dy, cache, kind: str):
    if kind == "ghost":  # each slice's backward, gamma's and beta's gradients summed over the slices
        ghost, caches = cache
        parts = [batch_norm_backward(dy[i * ghost : (i + 1) * ghost], c) for i, c in enumerate(caches)]
        dx, dgamma, dbeta = zip(*parts)
        return np.concatenate(dx), np.sum(dgamma, axis=0), np.sum(dbeta, axis=0)
    return {"batch": batch_norm_backward, "group": group_norm_backward, "whiten": whiten_backward, "pit": pit_backward}[
        kind
    ](dy, cache)


def conv2d(x, weight, bias=None):
    """Valid cross-correlation, stride 1: x (N, C, H, W), weight (O, C, kh, kw)."""
    kh, kw = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N,C,H',W',kh,kw
    out = np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def pool2d(x, kind: str):
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // 2, 2, w // 2, 2)
    return blocks.mean(axis=(3, 5)) if kind == "avg" else blocks.max(axis=(3, 5))


def activate(x, kind: str):
    return 1.0 / (1.0 + np.exp(-x)) if kind == "sigmoid" else np.maximum(x, 0.0)


def lenet_forward(
    params: dict,
    spec: ModelSpec,
    x,
    *,
    training: bool,
    epsilon: float | None = None,
    decay: float | None = None,
    inputs: dict | None = None,
):
    """BN-LeNet logits in float64 (no dropout), plus per-BN-layer statistics.

    Returns (logits, stats) where stats[bn] = dict(batch_mean, batch_var,
    new_running_mean, new_running_var) for the norms with running statistics;
    batch_* are None in eval mode. `inputs`, where given, receives each
    normalisation layer's input (NCHW / NC) under its canonical name.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    eps = spec.epsilon if epsilon is None else epsilon
    dec = spec.decay if decay is None else decay
    stats = {}
    h = np.asarray(x, dtype=np.float64)
    for layer in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        if layer == "fc1":
            h = h.reshape(h.shape[0], -1)  # (C, H, W) flatten order
        bias = p.get(f"{layer}.bias") if has_bias(spec, layer) else None
        w = p[f"{layer}.weight"]
        h = conv2d(h, w, bias) if layer.startswith("conv") else h @ w.T + (0 if bias is None else bias)
        if layer == "fc3":
            return h, stats
        bn = NORM_NAMES[layer] if spec.norm_at(layer) else None

        def norm(h):
            if inputs is not None:
                inputs[bn] = h
            state = {k.split(".")[1]: v for k, v in p.items() if k.startswith(f"{bn}.")}
            y, new, _, _ = norm_forward(spec, h, state, training=training, epsilon=eps, decay=dec)
            if spec.norm in ("batch", "renorm"):
                axes = _axes(h)
                stats[bn] = dict(
                    batch_mean=h.mean(axis=axes) if training else None,
                    batch_var=h.var(axis=axes) if training else None,
                    new_running_mean=new["running_mean"],
                    new_running_var=new["running_var"],
                )
            return y

        if bn and spec.norm_placement == "before_activation":
            h = norm(h)
        h = activate(h, spec.activation)
        if bn and spec.norm_placement == "after_activation":
            h = norm(h)
        if layer.startswith("conv"):
            h = pool2d(h, spec.pooling)
    raise AssertionError("unreachable")


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy over the batch, computed stably."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())
