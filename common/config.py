"""Validated, hashable, serialisable run configuration and model specification.

Defaults follow the textbook's classic BN-LeNet setting (lr 1.0, batch 256,
10 epochs, plain SGD, float32, decay 0.9, eps 1e-5, seed 0).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import ConfigError
from .norms import BN_POSITIONS, CHANNELS, NORMALISATIONS, NORMS

VARIANTS = ("scratch", "builtin", "builtin-defaults", "none")
# the smallest input side BN-LeNet has a feature map for: 16 -> conv 12 -> pool 6 -> conv 2 -> pool 1
MIN_IMAGE_SIZE = 16
ACTIVATIONS = ("sigmoid", "relu")
POOLINGS = ("avg", "max")
PLACEMENTS = ("before_activation", "after_activation")
DTYPES = ("float32", "float64")
# the compute dtype of the framework's mixed-precision mechanism (common.precision); "off": none
MIXED_DTYPES = ("off", "bfloat16")
DEVICES = ("auto", "cpu", "gpu")
# noisy BN (--norm-noise): how the noise is drawn, and what eval mode does with it (common.norms)
NOISE_FORMS = ("channel", "example")
NOISE_EVALS = ("expectation", "none")
# the PITs' output scale (--pit-scale): (0, 1) as the exercise asks, or standardised to BN's mean and variance
PIT_SCALES = ("unit", "standard")
# --bn-sync under --replicas K: each replica's own batch statistics (local, every framework's default) or the
# global batch's (global: synchronised BN); docs/data-parallel.md
BN_SYNCS = ("local", "global")
# default = the framework's own choice (docs/benchmark.md "Execution modes" gives the measurements behind each);
# compiled = torch.compile / hybridized Gluon / tf.function / jax.jit; eager = op by op everywhere;
# xla = compiled by XLA: TensorFlow's tf.function(jit_compile=True), JAX's jax.jit (what compiled is there);
# PyTorch and MXNet have no XLA mode (their backends refuse it with the modes they have).
EXECUTIONS = ("default", "compiled", "eager", "xla")


def option(default, help: str, *, choices=None, flag: str | None = None, aliases: tuple = ()):
    """A field that is also an option of compare.run (compare/options.py makes it from this: `--field-name`, or
    `flag`; a boolean default True is turned off by its option, so its flag reads --no-...), with its help text,
    for a choice its choices, and older spellings of the flag that still work (aliases)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "aliases": aliases})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelSpec:
    """What BN-LeNet looks like. All frameworks build the same network from it."""

    variant: str = "scratch"  # scratch | builtin | builtin-defaults | none (compare.run --variants)
    # bn_positions, bias_before_bn, bn_placement: any normalisation's, as their flags say; the field names are the
    # ones records and config ids were first written with, so results already on disk stay readable and resumable
    bn_positions: tuple = option(
        BN_POSITIONS,
        f"layers followed by the normalisation, from: {', '.join(BN_POSITIONS)}",
        choices=BN_POSITIONS,
        flag="--norm-positions",
        aliases=("--bn-positions",),
    )
    bias_before_bn: bool = option(
        True,
        "drop the bias of layers followed by the normalisation (the textbook keeps it)",
        flag="--no-bias-before-norm",
        aliases=("--no-bias-before-bn",),
    )
    activation: str = option(
        "sigmoid", "after each normalised layer; the textbook's BN-LeNet uses sigmoid", choices=ACTIVATIONS
    )
    pooling: str = option("avg", "2x2, stride 2, after each convolution", choices=POOLINGS)
    bn_placement: str = option(
        "before_activation",
        "the normalisation before the activation (the textbook, the BN paper) or after it",
        choices=PLACEMENTS,
        flag="--norm-placement",
        aliases=("--bn-placement",),
    )
    dropout: float = option(0.0, "after the fc1 and fc2 activations; 0 = no dropout layer")
    freeze_gamma_beta: bool = option(False, "keep gamma=1, beta=0 (their initial values)")
    decay: float = option(0.9, "running = decay*running + (1-decay)*batch (PyTorch's momentum m is 1 - m)")
    epsilon: float = option(1e-5, "added to the variance inside the square root")
    input_size: int = 28  # images are zero-padded (centred) to this size
    image_size: int = option(
        28,
        "resize the 28x28 images to S x S before training (bilinear on the 8-bit image, as the textbook's 96x96 "
        "version does with torchvision's Resize, by Pillow, cached on disk); the first dense layer follows from S, "
        "a multiple of 4 of at least 16",
    )
    norm: str = option(
        "batch",
        "the normalisation at --norm-positions (common/norms.py has each one's spec); instance needs "
        "--norm-positions conv1,conv2",
        choices=NORMS,
    )
    groups: int = option(2, "--norm group: groups of channels per example")
    whiten_group: int = option(
        4,
        "--norm whiten: channels whitened together, in groups of g consecutive ones (a last group takes what is "
        "left; g at or above a layer's channels whitens them all together; 1 is BN)",
    )
    whiten_iterations: int = option(5, "--norm whiten: Newton-Schulz iterations for the inverse square root")
    pit_scale: str = option(
        "unit",
        "--norm pit, pit-rank: unit = the transform's values in (0, 1), as the exercise asks; standard = "
        "sqrt(12) (u - 1/2), the same values at BN's scale (mean 0, variance 1 for a uniform u), so that with "
        "gamma 1 and beta 0 the layer starts where BN does",
        choices=PIT_SCALES,
    )
    # batch renormalisation (Ioffe, 2017): r is clipped to [1/rmax, rmax], d to [-dmax, dmax]; the limits
    # grow linearly from 1 and 0 over the first renorm_warmup training steps (0 = the limits from the start)
    renorm_rmax: float = option(3.0, "--norm renorm: r in [1/rmax, rmax]")
    renorm_dmax: float = option(5.0, "--norm renorm: d in [-dmax, dmax]")
    renorm_warmup: int = option(
        1000, "--norm renorm: training steps over which rmax and dmax grow from 1 and 0 (0 = no warm-up)"
    )
    # noisy BN (Santurkar et al. 2018): after each normalisation layer, in training steps only, h * s + m with
    # s ~ U(1, noise_scale) and m ~ U(-noise_shift, noise_shift) per step and channel (common.norms.draw_noise)
    norm_noise: bool = option(
        False,
        "after each normalisation, in training steps, a random scale s ~ U(1, --noise-scale) and shift "
        "m ~ U(-b, b), b = --noise-shift, per step and channel, the same in every framework (noisy BN: "
        "docs/why-bn.md)",
    )
    noise_scale: float = option(2.0, "--norm-noise: the largest scale a")
    noise_shift: float = option(1.0, "--norm-noise: the largest shift b")
    noise_form: str = option(
        "channel",
        "--norm-noise: channel = one s and m per step and channel, the same for every example; example = the "
        "paper's form, each example and channel its own s and m, i.i.d. around a centre and with a spread "
        "drawn anew every step (common.norms.draw_noise)",
        choices=NOISE_FORMS,
    )
    noise_eval: str = option(
        "expectation",
        "--norm-noise: eval mode (and the probe and the population pass) with the noise's expectation folded "
        "in, every channel scaled by E[s] = (1 + a) / 2 and shifted by E[m] = 0, as dropout keeps its mean; "
        "none = without the noise, the train/eval mismatch of the noise itself (docs/why-bn.md)",
        choices=NOISE_EVALS,
    )
    # ghost batches (Hoffer et al. 2017): in training mode BN normalises each G-image slice of the batch with that
    # slice's statistics; what each replica does under data parallelism with local statistics (docs/data-parallel.md)
    ghost_batch: int = option(
        0,
        "--norm batch, scratch: in training mode, BN statistics over each slice of G images of the batch (ghost "
        "batches: what local sync over B/G replicas computes, docs/data-parallel.md); 0 = the whole batch",
    )

    def __post_init__(self):
        object.__setattr__(self, "bn_positions", tuple(self.bn_positions))
        _check(self.variant in VARIANTS, f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        for pos in self.bn_positions:
            _check(pos in BN_POSITIONS, f"unknown BN position {pos!r}; choose from {', '.join(BN_POSITIONS)}")
        _check(len(set(self.bn_positions)) == len(self.bn_positions), f"BN position listed twice: {self.bn_positions}")
        object.__setattr__(self, "bn_positions", tuple(p for p in BN_POSITIONS if p in self.bn_positions))
        _check(
            self.activation in ACTIVATIONS,
            f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}",
        )
        _check(self.pooling in POOLINGS, f"unknown pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}")
        _check(
            self.bn_placement in PLACEMENTS,
            f"unknown BN placement {self.bn_placement!r}; choose from {', '.join(PLACEMENTS)}",
        )
        _check(
            _is_number(self.dropout) and 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}"
        )
        _check(isinstance(self.bias_before_bn, bool), "bias_before_bn must be true or false")
        _check(isinstance(self.freeze_gamma_beta, bool), "freeze_gamma_beta must be true or false")
        _check(
            _is_number(self.decay) and 0.0 <= self.decay < 1.0,
            f"decay must be in [0, 1), got {self.decay!r} (PyTorch's momentum m is decay 1 - m)",
        )
        _check(
            _is_number(self.epsilon) and self.epsilon > 0, f"epsilon must be a positive number, got {self.epsilon!r}"
        )
        _check(
            isinstance(self.input_size, int)
            and not isinstance(self.input_size, bool)
            and self.input_size >= 28
            and self.input_size % 4 == 0,
            f"input_size must be a multiple of 4 and at least 28, got {self.input_size!r}",
        )
        _check(
            isinstance(self.image_size, int)
            and not isinstance(self.image_size, bool)
            and self.image_size >= MIN_IMAGE_SIZE
            and self.image_size % 4 == 0,
            f"image_size (--image-size) must be a multiple of 4 and at least {MIN_IMAGE_SIZE}, got "
            f"{self.image_size!r}: two 5x5 convolutions and two 2x2 poolings leave no feature map below "
            f"{MIN_IMAGE_SIZE} (16 -> 12 -> 6 -> 2 -> 1), and a multiple of 4 keeps every pooling exact",
        )
        _check(
            self.image_size == 28 or self.input_size == 28,
            f"image_size {self.image_size} (resize) and input_size {self.input_size} (zero-padding) both change the "
            "input's side: set one",
        )
        _check(
            self.norm in NORMALISATIONS,
            f"unknown normalisation {self.norm!r} (--norm); choose from {', '.join(NORMALISATIONS)}",
        )
        _check(
            isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups >= 1,
            f"groups (--groups) must be an integer >= 1, got {self.groups!r}",
        )
        _check(
            isinstance(self.whiten_group, int) and not isinstance(self.whiten_group, bool) and self.whiten_group >= 1,
            f"whiten_group (--whiten-group) must be an integer >= 1 (channels whitened together), got "
            f"{self.whiten_group!r}",
        )
        _check(
            isinstance(self.whiten_iterations, int)
            and not isinstance(self.whiten_iterations, bool)
            and self.whiten_iterations >= 1,
            f"whiten_iterations (--whiten-iterations) must be an integer >= 1 (Newton-Schulz needs at least one "
            f"iteration; 5 is IterNorm's), got {self.whiten_iterations!r}",
        )
        _check(isinstance(self.norm_noise, bool), "norm_noise must be true or false")
        _check(
            _is_number(self.noise_scale) and self.noise_scale >= 1,
            f"noise_scale (--noise-scale) must be a number >= 1, got {self.noise_scale!r}",
        )
        _check(
            _is_number(self.noise_shift) and self.noise_shift >= 0,
            f"noise_shift (--noise-shift) must be a number >= 0, got {self.noise_shift!r}",
        )
        _check(
            self.noise_form in NOISE_FORMS,
            f"unknown noise_form {self.noise_form!r} (--noise-form); choose from {', '.join(NOISE_FORMS)}",
        )
        _check(
            self.noise_eval in NOISE_EVALS,
            f"unknown noise_eval {self.noise_eval!r} (--noise-eval); choose from {', '.join(NOISE_EVALS)}",
        )
        _check(
            self.pit_scale in PIT_SCALES,
            f"unknown pit_scale {self.pit_scale!r} (--pit-scale); choose from {', '.join(PIT_SCALES)}",
        )
        if self.row.kind not in ("pit", "pit-rank"):  # the PITs' option only: one configuration, one id elsewhere
            object.__setattr__(self, "pit_scale", "unit")
        if not self.norm_noise:  # without noise there is nothing to draw or fold: one configuration, one id
            object.__setattr__(self, "noise_form", "channel")
            object.__setattr__(self, "noise_eval", "none")
        _check(
            not self.norm_noise or self.has_norm,
            "norm_noise (--norm-noise) adds noise after each normalisation layer, and this model has none "
            f"(variant {self.variant}, norm positions {','.join(self.bn_positions) or 'none'}); use a variant with "
            "a normalisation (scratch, builtin)",
        )
        _check(
            _is_number(self.renorm_rmax) and self.renorm_rmax >= 1,
            f"renorm_rmax (--renorm-rmax) must be a number >= 1, got {self.renorm_rmax!r}",
        )
        _check(
            _is_number(self.renorm_dmax) and self.renorm_dmax >= 0,
            f"renorm_dmax (--renorm-dmax) must be a number >= 0, got {self.renorm_dmax!r}",
        )
        _check(
            isinstance(self.renorm_warmup, int)
            and not isinstance(self.renorm_warmup, bool)
            and self.renorm_warmup >= 0,
            f"renorm_warmup (--renorm-warmup) must be an integer >= 0, got {self.renorm_warmup!r}",
        )
        _check(
            isinstance(self.ghost_batch, int) and not isinstance(self.ghost_batch, bool) and self.ghost_batch >= 0,
            f"ghost_batch (--ghost-batch) must be an integer >= 0 (0 = off), got {self.ghost_batch!r}",
        )
        if self.ghost_batch:
            _check(
                self.ghost_batch >= 2,
                "ghost_batch (--ghost-batch) must be at least 2: a slice of one image has no batch variance",
            )
            _check(
                self.row.ghost and self.variant in ("scratch", "none"),
                f"--ghost-batch slices the batch statistics of the project's BN layer: it needs --norm batch and "
                f"--variants scratch (got --norm {self.norm}, variant {self.variant}; no framework's built-in "
                f"layer normalises slices of a batch)",
            )
        if self.variant != "none" and self.row.groups == "option":
            for pos in self.bn_positions:
                _check(
                    CHANNELS[pos] % self.groups == 0,
                    f"--groups {self.groups} does not divide the {CHANNELS[pos]} channels of {pos}, where group "
                    f"normalisation was asked for; choose a divisor of "
                    f"{', '.join(f'{CHANNELS[p]} ({p})' for p in self.bn_positions)} (2 divides them all)",
                )
        if self.variant != "none" and not self.row.dense:
            dense = [pos for pos in self.bn_positions if pos.startswith("fc")]
            _check(
                not dense,
                f"{self.norm} normalisation normalises each channel over its H x W values, and a dense layer "
                f"({', '.join(dense)}) has one value per feature; put it after the convolutions only: "
                f"--norm-positions conv1,conv2",
            )

    @property
    def row(self):
        """spec.norm's row of common.norms.NORMALISATIONS: what the suite knows about it."""
        return NORMALISATIONS[self.norm]

    @property
    def has_norm(self) -> bool:
        return self.variant != "none" and bool(self.bn_positions)

    def norm_at(self, position: str) -> bool:
        """Whether a normalisation layer (of self.norm) follows `position`."""
        return self.variant != "none" and position in self.bn_positions

    @property
    def has_running_stats(self) -> bool:
        """Whether the normalisation layers keep running statistics (batch, renorm, whiten, pit, pit-rank): only
        then do train and eval mode differ."""
        return self.has_norm and self.row.running

    @property
    def has_population(self) -> bool:
        """Whether the population pass (common.population) applies: running means and variances (whiten keeps a
        covariance, whose population form the spec leaves open, so its runs skip the pass)."""
        return self.has_running_stats and self.row.population

    @property
    def side(self) -> int:
        """Height (= width) of the network's input: the resized images' (image_size) or the padded ones'."""
        return self.image_size if self.image_size != 28 else self.input_size

    @property
    def flat_side(self) -> int:
        """Height (= width) of the 16 feature maps after the second pooling."""
        return ((self.side - 4) // 2 - 4) // 2

    @property
    def flat_size(self) -> int:
        """Features after the second pooling, flattened in (C, H, W) order."""
        return 16 * self.flat_side**2

    def to_dict(self) -> dict:
        data = asdict(self)
        data["bn_positions"] = list(self.bn_positions)
        return data


# fields added after results were stored, with the value those results had (config_id leaves a field at it out,
# and from_dict fills it in where a stored configuration lacks the field); model fields as "model.NAME". It is the
# field's default but for noise_eval: noisy runs from before it evaluated without the noise, new ones with its mean.
LATE_FIELDS = {
    "trace_every": 0,
    "model.norm_noise": False,
    "model.noise_scale": 2.0,
    "model.noise_shift": 1.0,
    # noisy runs recorded before noise_eval existed evaluated without the noise
    "model.noise_eval": "none",
    "model.noise_form": "channel",
    "model.ghost_batch": 0,
    "model.image_size": 28,
    "replicas": 1,
    "bn_sync": "local",
    "model.whiten_group": 4,
    "model.whiten_iterations": 5,
    "model.pit_scale": "unit",
}


@dataclass(frozen=True)
class RunConfig:
    """One training run of one variant with one seed (the framework is chosen apart)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    lr: float = option(1.0, "plain SGD learning rate")
    batch_size: int = option(256, "images per SGD step (and per BN batch)")
    epochs: int = option(10, "passes over the training images")
    seed: int = 0  # compare.run --seeds
    dtype: str = "float32"  # parameters, data and the optimizer update (and the compute dtype unless mixed)
    mixed: str = "off"  # "bfloat16": the framework's mixed-precision mechanism (--precision mixed-bfloat16)
    device: str = option(
        "auto", "auto = the GPU when the framework sees one; gpu without one is an error", choices=DEVICES
    )
    execution: str = option(
        "default",
        "default = each framework's own (PyTorch eager, Gluon hybridized, TensorFlow XLA, JAX jax.jit); "
        "compiled = torch.compile / hybridized / tf.function / jax.jit; eager = op by op everywhere; xla = "
        "TensorFlow's jit_compile, JAX's jax.jit (not PyTorch or MXNet)",
        choices=EXECUTIONS,
    )
    warmup_steps: int = option(5, "first steps of each epoch, timed apart from the throughput figure")
    eval_batch_size: int = 1000
    probe_size: int = option(512, "test images in the divergence probe")
    train_limit: int = option(0, "use the first N training images (0 = all)")
    test_limit: int = option(0, "use the first N test images (0 = all)")
    trace_steps: int = option(0, "also record the loss of each of the first N steps of every epoch")
    trace_every: int = option(
        0,
        "every K SGD steps, before the step: activation percentiles, internal covariate shift and the loss "
        "landscape (common.trace, docs/why-bn.md), timed apart; 0 = off",
    )
    replicas: int = option(
        1,
        "train data-parallel on K replicas, each on its own contiguous B/K slice of every batch, gradients "
        "averaged over the whole batch, on the framework's own distributed engine (docs/data-parallel.md)",
    )
    bn_sync: str = option(
        "local",
        "with --replicas: local = each replica's BN uses its own slice's statistics (every framework's "
        "default), global = the whole batch's (synchronised BN)",
        choices=BN_SYNCS,
    )
    population_size: int = option(
        2048,
        "after each epoch, also evaluate with BN population statistics from this many training images "
        "(train-mode batches of --batch-size, weights fixed, timed apart: common.population); 0 = off; not for "
        "--norm whiten, whose running covariance has no population form in the spec (its runs skip the pass)",
    )
    recalibrate: bool = option(
        False,
        "keep the final population statistics in the final snapshot (instead of the running average), "
        "so the saved model is the recalibrated one",
    )

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelSpec(**self.model))
        _check(isinstance(self.model, ModelSpec), "model must be a ModelSpec")
        _check(_is_number(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        for name, low in (
            ("batch_size", 2),
            ("epochs", 1),
            ("eval_batch_size", 1),
            ("probe_size", 2),
            ("warmup_steps", 0),
            ("seed", 0),
            ("train_limit", 0),
            ("test_limit", 0),
            ("trace_steps", 0),
            ("trace_every", 0),
            ("population_size", 0),
            ("replicas", 1),
        ):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"{name} must be an integer >= {low}, got {value!r}",
            )
        _check(self.seed < 2**32, f"seed must be below 2**32, got {self.seed}")
        _check(
            self.population_size == 0 or self.population_size >= self.batch_size,
            f"population_size (--population-size) must be 0 (off) or at least one batch ({self.batch_size} images), "
            f"got {self.population_size}",
        )
        _check(isinstance(self.recalibrate, bool), "recalibrate must be true or false")
        _check(
            not self.recalibrate or self.population_size > 0,
            "recalibrate (--recalibrate) needs population statistics: set population_size (--population-size) above 0",
        )
        _check(
            not self.recalibrate or not self.model.has_norm or self.model.has_population,
            f"recalibrate (--recalibrate) keeps population statistics, and --norm {self.model.norm} has none "
            f"({self.model.row.why_not or 'it keeps no running statistics'}); drop --recalibrate",
        )
        self._check_slices()
        example = self.model.norm_noise and self.model.noise_form == "example"
        _check(
            not (example and self.trace_every),
            "--noise-form example draws noise per example of the training batch, and --trace-every's activation "
            "percentiles take a probe batch of other images, which that noise does not fit: trace with --noise-form "
            "channel, or drop --trace-every",
        )
        _check(
            not (example and self.replicas > 1),
            "--noise-form example with --replicas is not supported: each replica would need its slice of the "
            "batch's noise; use --noise-form channel (the same noise for every example) or one process",
        )
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        _check(
            self.mixed in MIXED_DTYPES,
            f"unknown mixed-precision compute dtype {self.mixed!r}; choose from {', '.join(MIXED_DTYPES)}",
        )
        _check(
            self.mixed == "off" or self.dtype == "float32",
            f"mixed precision keeps parameters and the update in float32, so it needs dtype float32, not "
            f"{self.dtype} (--precision mixed-bfloat16 sets both)",
        )
        _check(
            self.execution in EXECUTIONS, f"unknown execution {self.execution!r}; choose from {', '.join(EXECUTIONS)}"
        )
        _check(self.device in DEVICES, f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")

    def _check_slices(self) -> None:
        """--replicas, --bn-sync and --ghost-batch against the batch and the normalisation."""
        spec = self.model
        _check(self.bn_sync in BN_SYNCS, f"unknown bn_sync {self.bn_sync!r}; choose from {', '.join(BN_SYNCS)}")
        _check(
            self.batch_size % self.replicas == 0,
            f"--replicas {self.replicas} does not divide --batch-size {self.batch_size}: every replica takes an equal "
            f"contiguous slice of each batch; choose a divisor of {self.batch_size}",
        )
        _check(
            self.replicas == 1 or self.batch_size // self.replicas >= 2 or not spec.has_running_stats,
            f"--replicas {self.replicas} leaves {self.batch_size // self.replicas} image per replica, and BN needs "
            "at least 2 for a batch variance; use fewer replicas or a larger --batch-size",
        )
        _check(
            not (self.replicas > 1 and spec.ghost_batch),
            "--ghost-batch and --replicas together are not supported: local sync over K replicas already gives "
            "each replica's slice its own statistics (--ghost-batch B/K is its one-process equivalent)",
        )
        _check(
            not (self.replicas > 1 and spec.has_norm and not spec.row.syncs),
            f"--replicas with --norm {spec.norm} is not supported yet: its data-parallel form is not specified "
            "(docs/data-parallel.md); use --norm batch",
        )
        _check(
            not (self.replicas > 1 and spec.has_norm and self.bn_sync not in spec.row.syncs),
            f"--bn-sync global synchronises batch statistics, and --norm {spec.norm} normalises each example on its "
            "own: there is nothing to synchronise; drop --bn-sync global (or use --norm batch)",
        )
        ghost = self.layer_spec.ghost_batch
        what = f"--ghost-batch {ghost}" if spec.ghost_batch else f"local sync's slice of {ghost} images"
        for option_name, size in (("--batch-size", self.batch_size), ("--probe-size", self.probe_size)):
            _check(
                not ghost or size % ghost == 0,
                f"{what} does not divide {option_name} {size}: every train-mode batch (the probe's included) is "
                f"cut into whole slices; choose sizes that divide {size}",
            )

    @property
    def layer_spec(self) -> ModelSpec:
        """The ModelSpec the normalisation layers are built from: the model's, with local sync over K replicas
        given its one-process meaning for the project's layer, ghost batches of B/K (what a forward outside the
        data-parallel step, a probe or the population pass, then computes on one process); a built-in layer has
        no ghost batches and normalises those forwards over all their images."""
        if (
            self.replicas > 1
            and self.bn_sync == "local"
            and self.model.has_running_stats
            and self.model.variant == "scratch"
        ):
            return replace(self.model, ghost_batch=self.batch_size // self.replicas)
        return self.model

    @property
    def precision(self) -> str:
        """float32, float64 or mixed-bfloat16 (--precision; common.precision)."""
        return self.dtype if self.mixed == "off" else f"mixed-{self.mixed}"

    def replace(self, **changes) -> "RunConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        _check(not unknown, f"unknown config keys: {sorted(unknown)}")
        data = dict(data)
        model = dict(data["model"]) if isinstance(data.get("model"), dict) else data.get("model", {})
        for name, value in LATE_FIELDS.items():  # what a configuration stored before the field existed meant
            holder, key = (model, name[6:]) if name.startswith("model.") else (data, name)
            if isinstance(holder, dict):
                holder.setdefault(key, value)
        if isinstance(model, dict):
            known_model = {f.name for f in fields(ModelSpec)}
            bad = set(model) - known_model
            _check(not bad, f"unknown model keys: {sorted(bad)}")
            model = ModelSpec(**model)
        return cls(**{**data, "model": model})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def config_id(self) -> str:
        """A short stable hash of the configuration (the same on every framework). A field added after results
        were stored (LATE_FIELDS) enters it only away from its default, so the ids of earlier results still hold."""
        data = self.to_dict()
        for name, default in LATE_FIELDS.items():
            holder, key = (data["model"], name[6:]) if name.startswith("model.") else (data, name)
            if holder.get(key) == default:
                del holder[key]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
