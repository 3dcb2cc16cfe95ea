"""The normalisations beside BN (--norm), framework-free: their spec and what every framework shares.

Spec (x is (N, C, H, W) after a convolution or (N, F) after a dense layer; gamma and beta are per
channel / feature, as BN's; epsilon sits inside the square root; variances are biased, 1/n):

- batch: BN (common.reference.batch_norm_forward; docs/running.md, "The BN specification").
- layer: per example, over all of the layer's values (C x H x W, or F).
- group: per example, over each of G groups of consecutive channels (C/G x H x W, or F/G); G must
  divide C (common.config checks it at every normalised position).
- instance: per example and channel, over H x W; convolutions only (a dense layer has one value per
  feature, so a dense position is a configuration error, never silently skipped).
  layer, group and instance are one transform, group normalisation with 1, G or C groups
  (`groups_of`): one function per framework computes all three.
- renorm (batch renormalisation, Ioffe 2017): in training mode, with the batch mean mu_B and
  sigma_B = sqrt(var_B + eps), and the running statistics before this step's update, sigma =
  sqrt(running_var + eps),
      r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mu_B - running_mean) / sigma, -dmax, dmax)
      y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
  with no gradient through r and d. rmax and dmax grow linearly from 1 and 0 to their limits over the
  first `renorm_warmup` training steps (`renorm_limits`); the running statistics update and eval mode
  are BN's. With rmax = 1 and dmax = 0 (its first step) it is BN exactly. Ioffe's Algorithm 1 keeps a moving
  average of sigma_B itself, where this spec keeps BN's running variance (sigma = sqrt(running_var + eps)):
  the two part by Jensen's gap, sqrt(average var) >= average sqrt(var), by about half the batches' squared
  coefficient of variation of sigma_B; every renorm run with population statistics measures it on the pass's
  batches (common.population.sigma_average_gap, the bn_gap table's sigma_average_gap).

Ghost batches (--ghost-batch G, batch only): in training mode the batch of N = S * G examples is cut into S
contiguous slices of G; each slice is normalised with its own mean and biased variance, and the running
statistics blend the mean over the slices of their means and of their variances:
    running = decay * running + (1 - decay) * mean_s(stat_s)
which is, by the blend's linearity, the mean of S replicas' running statistics, each replica blending its own
(the "replicas' mean" that local sync keeps, docs/data-parallel.md). G = N is BN. Every framework's
`ghost_batch_norm` (frameworks/<fw>/batchnorm.py) computes it the same way: the slices become channels,
(N, C, ...) -> (G, S * C, ...), so BN's own function normalises each (slice, channel) pair, with gamma, beta and the
running statistics tiled S times and the new running statistics averaged back over the slices.

The research exercise's transforms (--norm whiten, pit, pit-rank; float64 reference in common.reference; scratch
only, no framework ships a layer for them):

- whiten (Decorrelated BN by IterNorm, Huang et al. 2019): the channels form groups of g consecutive ones
  (`whiten_groups`; a last group of C mod g channels is whitened on its own, as a smaller group). In training
  mode, per group, the values are centred per channel over the batch (and positions), their g x g covariance
  Sigma (biased, 1/m over the m values per channel) plus eps I is trace-normalised, Sigma_N = (Sigma + eps I) /
  tr(Sigma + eps I), and T coupled Newton-Schulz iterations approximate its inverse square root: Y_0 = Sigma_N,
  Z_0 = I, T_k = (3 I - Z_(k-1) Y_(k-1)) / 2, Y_k = Y_(k-1) T_k, Z_k = T_k Z_(k-1), and W = Z_T /
  sqrt(tr(Sigma + eps I)); then x_hat = W (x - mu) and y = gamma * x_hat + beta per channel. In exact arithmetic
  Z_k is IterNorm's P_k = (3 P_(k-1) - P_(k-1)^3 Sigma_N) / 2 from P_0 = I, so T means what it means in IterNorm;
  in floating point IterNorm's uncoupled form amplifies its rounding once it nears convergence (not finite past
  T = 20-30 in float64, 10-20 in float32), where the coupled form stays at the limit for every T
  (docs/normalisations.md gives the measurement). The running statistics are the mean and the covariance (not the
  whitening matrix: at g = 1 the covariance is BN's running variance), blended as BN's; eval mode whitens with
  them by the same T iterations. At g = 1, Sigma_N = 1 and every T_k, Y_k, Z_k = 1, so W = 1 / sqrt(var + eps): BN.
  Every framework computes all groups at once on (C, C) matrices: the covariance masked to its groups' diagonal
  blocks (`whiten_mask`), each row divided by its group's trace; matrix products keep the blocks apart, so this is
  the per-group computation, with the zero blocks' products adding exact zeros. The running covariance is
  updated only within the blocks (`mask * blend + (1 - mask) * running`), as the reference does.
- pit (the Gaussian probability integral transform): y = gamma * Phi(x_hat) + beta with BN's x_hat, so before
  gamma and beta each value lies in (0, 1); BN's running statistics and eval mode. With --pit-scale standard
  (both PITs) the values are standardised to BN's scale, sqrt(12) (u - 1/2): a uniform u then has mean 0 and
  variance 1, so with gamma 1 and beta 0 the layer's output starts where BN's does (mean 1/2 and standard
  deviation 0.29 otherwise).
- pit-rank (the empirical one): in training mode each value is replaced by its mid-rank within its channel over
  the batch (and positions), (rank - 1/2) / m with tied values sharing the mean of their ranks; the rank has no
  useful derivative, so the backward is pit's (a straight-through surrogate: u = Phi(x_hat) + stop_gradient(rank
  - Phi(x_hat)), which equals the rank to rounding). Running statistics and eval mode are pit's. The mid-rank of
  a value is (#smaller + #smaller-or-equal) / (2m): two binary searches in the sorted channel (PyTorch,
  TensorFlow, JAX), or from the sorted channel's tie blocks (MXNet, which has no binary search).

Only the normalisations with running statistics (batch, renorm, whiten, pit, pit-rank) differ between train and
eval mode; for the others the harness's divergence
figures are exactly 0, which every run checks by measuring them like BN's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BackendUnavailable

# Below, `spec` is a common.config.ModelSpec: its fields are read, never imported (common.config builds on this
# table, so this module may not import it).

# The four places BN-LeNet can have a normalisation layer, in network order; the channels (features) of each
# position's layer, what a normalisation there normalises; and the canonical name of the layer after each
# (bn1 ... bn4, whatever the normalisation).
BN_POSITIONS = ("conv1", "conv2", "fc1", "fc2")
CHANNELS = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
NORM_NAMES = {"conv1": "bn1", "conv2": "bn2", "fc1": "bn3", "fc2": "bn4"}


@dataclass(frozen=True)
class Normalisation:
    """What the suite decides about one --norm, in one row of NORMALISATIONS: everything that asks about a norm
    (the config's checks, the canonical arrays, the layer each framework builds, the population pass, data
    parallelism, drift, the reports) reads it here. Its math is in common.reference and in each
    frameworks/<fw>/batchnorm.py.

    kind: the project's layer that computes it (each framework's CONSTRUCTORS key; layer, group and instance
    normalisation are one transform, "group"). statistics: the running statistics its layers keep besides gamma
    and beta (canonical suffixes; only a norm with some differs between train and eval mode); counters: other
    state that training changes (renorm's steps). groups: for a per-example norm, its groups of channels ("one",
    "option": --groups, "channels"). population: whether the population pass applies (why_not: the reason where
    it does not). ghost: whether --ghost-batch applies. syncs: the --bn-sync values it trains under with
    --replicas above 1 (none: its data-parallel form is not specified). builtin: whether a framework ships a
    layer that fits its spec (the research exercise's transforms are scratch only). dense: whether it may follow
    a dense layer (instance normalisation needs H x W values per channel)."""

    kind: str
    statistics: tuple = ()
    counters: tuple = ()
    groups: str | None = None
    population: bool = False
    why_not: str = ""
    ghost: bool = False
    syncs: tuple = ()
    builtin: bool = True
    dense: bool = True

    @property
    def running(self) -> bool:
        """Keeps running statistics: train mode (batch statistics) and eval mode (running ones) differ."""
        return bool(self.statistics)

    @property
    def state(self) -> tuple:
        """Every array of the layer that training changes besides gamma and beta."""
        return self.statistics + self.counters


BN_STATS = ("running_mean", "running_var")
NORMALISATIONS = {
    "batch": Normalisation("batch", BN_STATS, population=True, ghost=True, syncs=("local", "global")),
    "renorm": Normalisation("renorm", BN_STATS, counters=("steps",), population=True),
    "layer": Normalisation("group", groups="one", syncs=("local",)),
    "group": Normalisation("group", groups="option", syncs=("local",)),
    "instance": Normalisation("group", groups="channels", syncs=("local",), dense=False),
    "whiten": Normalisation(
        "whiten",
        ("running_mean", "running_cov"),
        why_not="its running covariance has no population form in the spec",
        builtin=False,
    ),
    "pit": Normalisation("pit", BN_STATS, population=True, builtin=False),
    "pit-rank": Normalisation("pit-rank", BN_STATS, population=True, builtin=False),
}
NORMS = tuple(NORMALISATIONS)  # --norm's choices


def array_role(name: str) -> str:
    """What a canonical array ("bn1.running_cov", "conv1.weight") is, by the table's rows: "statistic" (a running
    statistic), "counter" (other state training changes) or "parameter" (what the gradient trains, frozen or
    not)."""
    suffix = name.rpartition(".")[2]
    rows = NORMALISATIONS.values()
    if any(suffix in row.statistics for row in rows):
        return "statistic"
    return "counter" if any(suffix in row.counters for row in rows) else "parameter"


def whiten_groups(channels: int, group: int) -> list:
    """The whitening groups of `channels` channels in groups of `group` consecutive ones, as (start, stop): the
    last holds what is left (C mod g channels) when g does not divide C."""
    if group < 1:
        raise ValueError(f"a whitening group holds at least 1 channel, got {group}")
    return [(start, min(start + group, channels)) for start in range(0, channels, group)]


def whiten_mask(channels: int, group: int) -> np.ndarray:
    """(C, C) float64: 1 where both channels are in the same whitening group (its diagonal blocks), else 0."""
    mask = np.zeros((channels, channels))
    for start, stop in whiten_groups(channels, group):
        mask[start:stop, start:stop] = 1.0
    return mask


# NormLayer.kind: the project's own layers (scratch), one per transform, and the framework's built-in ones
SCRATCH_KINDS = {name: row.kind for name, row in NORMALISATIONS.items()}
BUILTIN_KINDS = {name: f"builtin-{name}" for name in NORMALISATIONS}


@dataclass(frozen=True)
class NormLayer:
    """One normalisation layer: what (spec.norm, spec.variant) and its position make of it, decided here once for
    every framework. Each framework's `lenet.make_norm(layer, precision="float32", name=None)` looks `kind` up in
    its table of constructors (`build`), so a framework knows nothing of variants.

    kind: "batch", "renorm", "group" (the project's layers; layer, group and instance normalisation are group
    normalisation with `groups` groups), "whiten", "pit" or "pit-rank", or "builtin-" and the spec.norm (the
    framework's own layer).
    decay, epsilon: None where the framework's own default applies (builtin-defaults); decay None too where the
    layer keeps no running statistics. groups: the group kinds only. renorm: (rmax, dmax, warmup), renorm only.
    whiten: (g, T), whiten only."""

    kind: str
    features: int  # channels (after a convolution) or features (after a dense layer)
    dims: int  # 4: after a convolution, (N, C, H, W); 2: after a dense layer, (N, F)
    decay: float | None = None
    epsilon: float | None = None
    groups: int | None = None
    renorm: tuple | None = None
    ghost: int = 0  # batch only: in training mode, statistics per slice of this many examples (0: the whole batch)
    whiten: tuple | None = None
    standard: bool = False  # the PITs only: sqrt(12) (u - 1/2) in place of u (--pit-scale standard)
    # BN inside a data-parallel step (--replicas): "local" (each replica's slice) or "global" (the whole batch,
    # synchronised), for the layer that pools; None in one process, where the layer needs no replicas
    sync: str | None = None
    closed_form: bool = False  # batch only: the training-mode backward written out (--norm-backward closed-form)

    def pit_kwargs(self) -> dict:
        """rank (the empirical PIT) and standard as keyword arguments of a PIT layer."""
        return {"rank": self.norm == "pit-rank", "standard": self.standard}

    def whiten_kwargs(self) -> dict:
        """group and iterations as keyword arguments of a Whiten layer."""
        return dict(zip(("group", "iterations"), self.whiten))

    @property
    def norm(self) -> str:
        """The spec.norm it came from ("group" for the project's layer, group or instance normalisation)."""
        return self.kind.removeprefix("builtin-")

    def renorm_kwargs(self) -> dict:
        """rmax, dmax and warmup as keyword arguments of a BatchRenorm layer."""
        return dict(zip(("rmax", "dmax", "warmup"), self.renorm))

    @property
    def where(self) -> str:
        return "after a convolution" if self.dims == 4 else "after a dense layer"


def norm_layer(spec, features: int, dims: int, sync: str | None = None) -> NormLayer:
    """The NormLayer of spec.norm and spec.variant after a layer of `features` channels (dims 4) or features
    (dims 2). builtin-defaults leaves decay and epsilon to the framework. sync: --bn-sync where the layer is built
    for a data-parallel step (kept only for a norm whose table row syncs)."""
    if spec.variant == "none":
        raise ValueError("variant none has no normalisation layer")
    builtin = spec.variant != "scratch"
    constants = spec.variant != "builtin-defaults"
    row = NORMALISATIONS[spec.norm]
    return NormLayer(
        kind=(BUILTIN_KINDS if builtin else SCRATCH_KINDS)[spec.norm],
        features=features,
        dims=dims,
        decay=spec.decay if constants and row.running else None,
        epsilon=spec.epsilon if constants else None,
        groups=groups_of(spec, features) if row.groups else None,
        renorm=(spec.renorm_rmax, spec.renorm_dmax, spec.renorm_warmup) if row.kind == "renorm" else None,
        ghost=spec.ghost_batch if row.ghost else 0,
        whiten=(spec.whiten_group, spec.whiten_iterations) if row.kind == "whiten" else None,
        standard=row.kind in ("pit", "pit-rank") and spec.pit_scale == "standard",
        sync=sync if sync in row.syncs and row.running else None,
        closed_form=not builtin and spec.norm_backward == "closed-form",
    )


def norm_after(spec, position: str, sync: str | None = None) -> NormLayer:
    """The NormLayer that follows BN-LeNet's layer `position` (conv1 ... fc2); sync as norm_layer's."""
    return norm_layer(spec, CHANNELS[position], 4 if position.startswith("conv") else 2, sync)


def given(**kwargs) -> dict:
    """The keyword arguments that are not None: a built-in layer's constants, leaving the framework's defaults
    where a NormLayer has none (builtin-defaults)."""
    return {key: value for key, value in kwargs.items() if value is not None}


def build(layer: NormLayer, constructors: dict, framework: str, has: str, **kwargs):
    """constructors[layer.kind](layer, **kwargs): the framework's layer of that kind. A kind the table lacks, or a
    constructor that returns None (no fitting layer at this position), raises no_builtin naming the framework's
    own normalisations (`has`)."""
    make = constructors.get(layer.kind)
    made = make(layer, **kwargs) if make else None
    if made is None:  # a constructor that exists but declines names the position it declines
        raise no_builtin(framework, f"{layer.norm} {layer.where}" if make else layer.norm, has)
    return made


def groups_of(spec, channels: int) -> int:
    """The groups a layer/group/instance normalisation of `channels` channels splits them into."""
    return {"one": 1, "option": spec.groups, "channels": channels}[NORMALISATIONS[spec.norm].groups]


def renorm_limits(steps, rmax: float, dmax: float, warmup: int, minimum=np.minimum, ones_like=np.ones_like) -> tuple:
    """(rmax, dmax) for a training step taken after `steps` earlier ones: both grow linearly from (1, 0) over the
    first `warmup` steps (none: at once). steps may be any framework's array, with that framework's minimum and
    ones_like; every framework's BatchRenorm layer and the float64 reference compute the ramp here."""
    ramp = minimum(steps / warmup, 1.0) if warmup else ones_like(steps)
    return 1.0 + (rmax - 1.0) * ramp, dmax * ramp


def no_builtin(framework: str, norm: str, has: str) -> BackendUnavailable:
    """The error of --variants builtin / builtin-defaults for a normalisation the framework lacks."""
    return BackendUnavailable(
        f"{framework} has no built-in layer that fits the spec of --norm {norm} (its built-in normalisations: {has}); "
        f"run --variants scratch for the project's own {norm} layer"
    )


def draw_noise(spec, seed: int, epoch: int, steps: int, dtype: str = "float32", batch: int = 0) -> dict:
    """Noisy BN (--norm-noise; Santurkar et al. 2018): {canonical norm name: (scales, shifts)} for one epoch's
    training steps, applied after the layer as h * s + m in training steps only (eval mode, the probes and the
    population pass get the noise's expectation folded in, `noise_folded`, or nothing with --noise-eval none).
    Drawn here, from one seeded stream, so every framework gets the same numbers; {} without --norm-noise.

    channel form: (steps, channels) each, s ~ U(1, a) and m ~ U(-b, b) per step and channel (a = noise_scale,
    b = noise_shift), the same for every example and position. example form (the paper's: i.i.d. per example,
    from a distribution whose centre and spread change every step): (steps, batch, channels) each; per step and
    channel a centre s0 ~ U(1, a), m0 ~ U(-b, b) as in the channel form, per step a spread w ~ U(0, 1/2), and per
    example s = 1 + (s0 - 1) u with u ~ U(1 - w, 1 + w) and m = m0 + v with v ~ U(-w b, w b): so s >= 1,
    E[s] = (1 + a) / 2 and E[m] = 0 in both forms. (Per example and channel: the same over a feature map's
    positions, since drawing per position would be 147,456 values per image at conv1.) With a = 1 and b = 0 every
    scale is 1 and every shift 0 exactly, so the run is plain BN bit for bit."""
    if not spec.norm_noise:
        return {}
    rng = np.random.RandomState([seed, epoch, 5])  # RandomState: the same stream on numpy 1.23 and 2.x
    out = {}
    for pos, name in NORM_NAMES.items():
        if spec.norm_at(pos):
            channels = CHANNELS[pos]
            scales = rng.uniform(1.0, spec.noise_scale, size=(steps, channels))
            shifts = rng.uniform(-spec.noise_shift, spec.noise_shift, size=(steps, channels))
            if spec.noise_form == "example":
                spread = rng.uniform(0.0, 0.5, size=(steps, 1, 1))
                unit = rng.uniform(-1.0, 1.0, size=(2, steps, batch, channels)) * spread
                scales = 1.0 + (scales[:, None, :] - 1.0) * (1.0 + unit[0])
                shifts = shifts[:, None, :] + unit[1] * spec.noise_shift
            out[name] = (scales.astype(dtype), shifts.astype(dtype))
    return out


def noise_expectation(spec) -> tuple:
    """(E[s], E[m]) of noisy BN's scale and shift, the same in both forms: ((1 + a) / 2, 0)."""
    return (1.0 + spec.noise_scale) / 2.0, 0.0


def noise_folded(params: dict, spec) -> dict:
    """Canonical parameters with the noise's expectation folded into every normalisation layer's gamma and beta:
    (gamma x_hat + beta) E[s] + E[m] = (gamma E[s]) x_hat + (beta E[s] + E[m]). What eval mode computes for a
    noisy run with --noise-eval expectation (common.loop), so that it sees on average what training saw."""
    scale, shift = noise_expectation(spec)
    out = dict(params)
    for name in NORM_NAMES.values():
        if f"{name}.gamma" in params:
            gamma, beta = np.asarray(params[f"{name}.gamma"]), np.asarray(params[f"{name}.beta"])
            out[f"{name}.gamma"] = (gamma * scale).astype(gamma.dtype)
            out[f"{name}.beta"] = (beta * scale + shift).astype(beta.dtype)
    return out


def noise_at(noise: dict, step: int) -> dict:
    """One step's row of draw_noise's arrays: {name: (scales (C,), shifts (C,))}; None without noise."""
    return {name: (s[step], m[step]) for name, (s, m) in noise.items()} or None
