"""Validated, hashable, serialisable run configuration and model specification.

Defaults follow the textbook's classic BN-LeNet setting (lr 1.0, batch 256,
10 epochs, plain SGD, float32, decay 0.9, eps 1e-5, seed 0).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from .errors import ConfigError
from .norms import BN_POSITIONS, CHANNELS, NORMALISATIONS

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
# --norm-backward: how the scratch BN layer's gradient is taken (docs/reference/benchmark.md)
NORM_BACKWARDS = ("autodiff", "closed-form")
# --bn-sync under --replicas K: each replica's own batch statistics (local, every framework's default) or the
# global batch's (global: synchronised BN); docs/data-parallel.md
BN_SYNCS = ("local", "global")
# default = the framework's own choice (docs/benchmark.md "Execution modes" gives the measurements behind each);
# compiled = torch.compile / hybridized Gluon / tf.function / jax.jit; eager = op by op everywhere;
# xla = compiled by XLA: TensorFlow's tf.function(jit_compile=True), JAX's jax.jit (what compiled is there);
# PyTorch and MXNet have no XLA mode (their backends refuse it with the modes they have).
EXECUTIONS = ("default", "compiled", "eager", "xla")


def option(
    default,
    help: str | None = None,
    *,
    choices=None,
    flag: str | None = None,
    aliases: tuple = (),
    minimum=None,
    below=None,
    positive: bool = False,
    noun: str | None = None,
    why: str = "",
    since: str | None = None,
    before=MISSING,
    stored: str | None = None,
):
    """A configuration field declared once: its default, its help text (an option of compare.run: compare/options.py
    makes `--field-name`, or `flag`, from it; a boolean default True is turned off by its option, so its flag reads
    --no-...; without help the field is no option), its choices, older spellings of its flag (aliases), and its
    bounds, which _check_declared enforces with one message per kind: minimum (an integer's, or a number's least
    value), below (a number's bound it stays under), positive (a number above 0); noun names a choice in its error
    and why adds a reason. since: the feature a field arrived with, after results were stored (it makes the field
    one of LATE_FIELDS); before: what stored results without it meant (default: the field's default). stored: the
    name a renamed field had when results were stored (STORED_NAMES): config ids hash it by that name, so they hold,
    and stored configurations and study files that spell it so are read as the field."""
    metadata = {
        "choices": choices,
        "flag": flag,
        "aliases": aliases,
        "minimum": minimum,
        "below": below,
        "positive": positive,
        "noun": noun,
        "why": why,
        "since": since,
        "before": default if before is MISSING else before,
        "stored": stored,
    }
    if help is not None:
        metadata["help"] = help
    return field(default=default, metadata=metadata)


def _check_declared(config) -> None:
    """Every field's declared bounds (option): its choices, its type and its least and greatest values, each refused
    with a message naming the field, its flag, what it must be and the value given."""
    for f in fields(config):
        meta, value = f.metadata, getattr(config, f.name)
        if "choices" not in meta or isinstance(f.default, tuple) or f.default is MISSING:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        what = f"{f.name} ({flag})" if "help" in meta else f.name
        why = f" ({meta['why']})" if meta["why"] else ""
        if isinstance(f.default, bool):
            _check(isinstance(value, bool), f"{what} must be true or false")
        elif meta["choices"]:
            shown = f" ({flag})" if "help" in meta else ""
            _check(
                value in meta["choices"],
                f"unknown {meta['noun'] or f.name} {value!r}{shown}; choose from {', '.join(meta['choices'])}",
            )
        elif isinstance(f.default, int):
            low = meta["minimum"] if meta["minimum"] is not None else 0
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"{what} must be an integer >= {low}{why}, got {value!r}",
            )
        elif isinstance(f.default, float):
            low, high = meta["minimum"], meta["below"]
            if meta["positive"]:
                rule, ok = "a positive number", _is_number(value) and value > 0
            elif high is not None:
                rule, ok = f"in [{low:g}, {high:g})", _is_number(value) and low <= value < high
            else:
                rule, ok = f"a number >= {low:g}", _is_number(value) and value >= low
            _check(ok, f"{what} must be {rule}{why}, got {value!r}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelSpec:
    """What BN-LeNet looks like. All frameworks build the same network from it."""

    variant: str = option("scratch", choices=VARIANTS)  # compare.run --variants
    # the three below were named bn_... when the first results were stored (stored=): their ids hash that name
    norm_positions: tuple = option(
        BN_POSITIONS,
        f"layers followed by the normalisation, from: {', '.join(BN_POSITIONS)}",
        choices=BN_POSITIONS,
        flag="--norm-positions",
        aliases=("--bn-positions",),
        stored="bn_positions",
    )
    bias_before_norm: bool = option(
        True,
        "drop the bias of layers followed by the normalisation (the textbook keeps it)",
        flag="--no-bias-before-norm",
        aliases=("--no-bias-before-bn",),
        stored="bias_before_bn",
    )
    activation: str = option(
        "sigmoid", "after each normalised layer; the textbook's BN-LeNet uses sigmoid", choices=ACTIVATIONS
    )
    pooling: str = option("avg", "2x2, stride 2, after each convolution", choices=POOLINGS)
    norm_placement: str = option(
        "before_activation",
        "the normalisation before the activation (the textbook, the BN paper) or after it",
        choices=PLACEMENTS,
        flag="--norm-placement",
        aliases=("--bn-placement",),
        stored="bn_placement",
    )
    dropout: float = option(0.0, "after the fc1 and fc2 activations; 0 = no dropout layer", minimum=0.0, below=1.0)
    freeze_gamma_beta: bool = option(False, "keep gamma=1, beta=0 (their initial values)")
    decay: float = option(
        0.9,
        "running = decay*running + (1-decay)*batch (PyTorch's momentum m is 1 - m)",
        minimum=0.0,
        below=1.0,
        why="PyTorch's momentum m is decay 1 - m",
    )
    epsilon: float = option(1e-5, "added to the variance inside the square root", positive=True)
    input_size: int = option(28, minimum=28)  # images are zero-padded (centred) to this size
    image_size: int = option(
        28,
        "resize the 28x28 images to S x S before training (bilinear on the 8-bit image, as the textbook's 96x96 "
        "version does with torchvision's Resize, by Pillow, cached on disk); the first dense layer follows from S, "
        "a multiple of 4 of at least 16",
        since="the 96x96 configuration",
    )
    norm: str = option(
        "batch",
        "the normalisation at --norm-positions (common/norms.py has each one's spec); instance needs "
        "--norm-positions conv1,conv2",
        choices=NORMALISATIONS,  # the table itself, so that a row added to it is a choice at once
        noun="normalisation",
    )
    groups: int = option(2, "--norm group: groups of channels per example", minimum=1)
    whiten_group: int = option(
        4,
        "--norm whiten: channels whitened together, in groups of g consecutive ones (a last group takes what is "
        "left; g at or above a layer's channels whitens them all together; 1 is BN)",
        minimum=1,
        why="channels whitened together",
        since="the research exercise",
    )
    whiten_iterations: int = option(
        5,
        "--norm whiten: Newton-Schulz iterations for the inverse square root",
        minimum=1,
        why="Newton-Schulz needs at least one iteration; 5 is IterNorm's",
        since="the research exercise",
    )
    pit_scale: str = option(
        "unit",
        "--norm pit, pit-rank: unit = the transform's values in (0, 1), as the exercise asks; standard = "
        "sqrt(12) (u - 1/2), the same values at BN's scale (mean 0, variance 1 for a uniform u), so that with "
        "gamma 1 and beta 0 the layer starts where BN does",
        choices=PIT_SCALES,
        since="the standardised PIT",
    )
    # batch renormalisation (Ioffe, 2017): r is clipped to [1/rmax, rmax], d to [-dmax, dmax]; the limits
    # grow linearly from 1 and 0 over the first renorm_warmup training steps (0 = the limits from the start)
    renorm_rmax: float = option(3.0, "--norm renorm: r in [1/rmax, rmax]", minimum=1.0)
    renorm_dmax: float = option(5.0, "--norm renorm: d in [-dmax, dmax]", minimum=0.0)
    renorm_warmup: int = option(
        1000, "--norm renorm: training steps over which rmax and dmax grow from 1 and 0 (0 = no warm-up)", minimum=0
    )
    # noisy BN (Santurkar et al. 2018): after each normalisation layer, in training steps only, h * s + m with
    # s ~ U(1, noise_scale) and m ~ U(-noise_shift, noise_shift) per step and channel (common.norms.draw_noise)
    norm_noise: bool = option(
        False,
        "after each normalisation, in training steps, a random scale s ~ U(1, --noise-scale) and shift "
        "m ~ U(-b, b), b = --noise-shift, per step and channel, the same in every framework (noisy BN: "
        "docs/why-bn.md)",
        since="noisy BN",
    )
    noise_scale: float = option(2.0, "--norm-noise: the largest scale a", minimum=1.0, since="noisy BN")
    noise_shift: float = option(1.0, "--norm-noise: the largest shift b", minimum=0.0, since="noisy BN")
    noise_form: str = option(
        "channel",
        "--norm-noise: channel = one s and m per step and channel, the same for every example; example = the "
        "paper's form, each example and channel its own s and m, i.i.d. around a centre and with a spread "
        "drawn anew every step (common.norms.draw_noise)",
        choices=NOISE_FORMS,
        since="the paper's noise",
    )
    noise_eval: str = option(
        "expectation",
        "--norm-noise: eval mode (and the probe and the population pass) with the noise's expectation folded "
        "in, every channel scaled by E[s] = (1 + a) / 2 and shifted by E[m] = 0, as dropout keeps its mean; "
        "none = without the noise, the train/eval mismatch of the noise itself (docs/why-bn.md)",
        choices=NOISE_EVALS,
        since="noisy BN's eval mode",
        before="none",  # noisy runs recorded before it evaluated without the noise
    )
    # ghost batches (Hoffer et al. 2017): in training mode BN normalises each G-image slice of the batch with that
    # slice's statistics; what each replica does under data parallelism with local statistics (docs/data-parallel.md)
    ghost_batch: int = option(
        0,
        "--norm batch, scratch: in training mode, BN statistics over each slice of G images of the batch (ghost "
        "batches: what local sync over B/G replicas computes, docs/data-parallel.md); 0 = the whole batch",
        minimum=0,
        why="0 = off",
        since="data-parallel BN",
    )

    norm_backward: str = option(
        "autodiff",
        "--norm batch, scratch: autodiff = the framework differentiates the textbook's forward; closed-form = "
        "BN's backward written out, dx = gamma / sigma (dy - mean(dy) - x_hat mean(dy x_hat)), the same "
        "mathematics in fewer passes over memory (docs/reference/benchmark.md); PyTorch, TensorFlow and JAX",
        choices=NORM_BACKWARDS,
        since="the closed-form backward",
    )

    def __post_init__(self):
        """The declared bounds of every field (option), then the rules between fields."""
        self._positions()
        _check_declared(self)
        _check(self.input_size % 4 == 0, f"input_size must be a multiple of 4 and at least 28, got {self.input_size!r}")
        _check(
            self.image_size >= MIN_IMAGE_SIZE and self.image_size % 4 == 0,
            f"image_size (--image-size) must be a multiple of 4 and at least {MIN_IMAGE_SIZE}, got "
            f"{self.image_size!r}: two 5x5 convolutions and two 2x2 poolings leave no feature map below "
            f"{MIN_IMAGE_SIZE} (16 -> 12 -> 6 -> 2 -> 1), and a multiple of 4 keeps every pooling exact",
        )
        _check(
            self.image_size == 28 or self.input_size == 28,
            f"image_size {self.image_size} (resize) and input_size {self.input_size} (zero-padding) both change the "
            "input's side: set one",
        )
        if self.row.kind not in ("pit", "pit-rank"):  # the PITs' option only: one configuration, one id elsewhere
            object.__setattr__(self, "pit_scale", "unit")
        if self.variant != "scratch":  # the scratch layer's option only: one configuration, one id elsewhere
            object.__setattr__(self, "norm_backward", "autodiff")
        _check(
            self.norm_backward == "autodiff" or (self.row.kind == "batch" and not self.ghost_batch),
            f"--norm-backward closed-form is BN's own backward: it needs --norm batch without --ghost-batch (got "
            f"--norm {self.norm}{f', --ghost-batch {self.ghost_batch}' if self.ghost_batch else ''})",
        )
        if not self.norm_noise:  # without noise there is nothing to draw or fold: one configuration, one id
            object.__setattr__(self, "noise_form", "channel")
            object.__setattr__(self, "noise_eval", "none")
        _check(
            not self.norm_noise or self.has_norm,
            "norm_noise (--norm-noise) adds noise after each normalisation layer, and this model has none "
            f"(variant {self.variant}, norm positions {','.join(self.norm_positions) or 'none'}); use a variant with "
            "a normalisation (scratch, builtin)",
        )
        self._ghost_batches()
        self._norm_at_positions()

    def _positions(self) -> None:
        """norm_positions: known positions, each once, kept in network order."""
        object.__setattr__(self, "norm_positions", tuple(self.norm_positions))
        for pos in self.norm_positions:
            _check(pos in BN_POSITIONS, f"unknown BN position {pos!r}; choose from {', '.join(BN_POSITIONS)}")
        _check(
            len(set(self.norm_positions)) == len(self.norm_positions),
            f"BN position listed twice: {self.norm_positions}",
        )
        object.__setattr__(self, "norm_positions", tuple(p for p in BN_POSITIONS if p in self.norm_positions))

    def _ghost_batches(self) -> None:
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

    def _norm_at_positions(self) -> None:
        """The normalisation fits every position it is put at: its groups divide the channels, a per-position norm
        needs H x W values."""
        if self.variant != "none" and self.row.groups == "option":
            for pos in self.norm_positions:
                _check(
                    CHANNELS[pos] % self.groups == 0,
                    f"--groups {self.groups} does not divide the {CHANNELS[pos]} channels of {pos}, where group "
                    f"normalisation was asked for; choose a divisor of "
                    f"{', '.join(f'{CHANNELS[p]} ({p})' for p in self.norm_positions)} (2 divides them all)",
                )
        if self.variant != "none" and not self.row.dense:
            dense = [pos for pos in self.norm_positions if pos.startswith("fc")]
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
        return self.variant != "none" and bool(self.norm_positions)

    def norm_at(self, position: str) -> bool:
        """Whether a normalisation layer (of self.norm) follows `position`."""
        return self.variant != "none" and position in self.norm_positions

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
        data["norm_positions"] = list(self.norm_positions)
        return data


@dataclass(frozen=True)
class RunConfig:
    """One training run of one variant with one seed (the framework is chosen apart)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    lr: float = option(1.0, "plain SGD learning rate", positive=True)
    batch_size: int = option(256, "images per SGD step (and per BN batch)", minimum=2)
    epochs: int = option(10, "passes over the training images", minimum=1)
    seed: int = option(0, minimum=0)  # compare.run --seeds
    # parameters, data and the optimizer update (and the compute dtype unless mixed)
    dtype: str = option("float32", choices=DTYPES)
    # "bfloat16": the framework's mixed-precision mechanism (--precision mixed-bfloat16)
    mixed: str = option("off", choices=MIXED_DTYPES, noun="mixed-precision compute dtype")
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
    warmup_steps: int = option(5, "first steps of each epoch, timed apart from the throughput figure", minimum=0)
    eval_batch_size: int = option(1000, minimum=1)
    probe_size: int = option(512, "test images in the divergence probe", minimum=2)
    train_limit: int = option(0, "use the first N training images (0 = all)", minimum=0)
    test_limit: int = option(0, "use the first N test images (0 = all)", minimum=0)
    trace_steps: int = option(0, "also record the loss of each of the first N steps of every epoch", minimum=0)
    trace_every: int = option(
        0,
        "every K SGD steps, before the step: activation percentiles, internal covariate shift and the loss "
        "landscape (common.trace, docs/why-bn.md), timed apart; 0 = off",
        minimum=0,
        since="why-BN traces",
    )
    replicas: int = option(
        1,
        "train data-parallel on K replicas, each on its own contiguous B/K slice of every batch, gradients "
        "averaged over the whole batch, on the framework's own distributed engine (docs/data-parallel.md)",
        minimum=1,
        since="data-parallel BN",
    )
    bn_sync: str = option(
        "local",
        "with --replicas: local = each replica's BN uses its own slice's statistics (every framework's "
        "default), global = the whole batch's (synchronised BN)",
        choices=BN_SYNCS,
        since="data-parallel BN",
    )
    population_size: int = option(
        2048,
        "after each epoch, also evaluate with BN population statistics from this many training images "
        "(train-mode batches of --batch-size, weights fixed, timed apart: common.population); 0 = off; not for "
        "--norm whiten, whose running covariance has no population form in the spec (its runs skip the pass)",
        minimum=0,
    )
    recalibrate: bool = option(
        False,
        "keep the final population statistics in the final snapshot (instead of the running average), "
        "so the saved model is the recalibrated one",
    )

    def __post_init__(self):
        """The declared bounds of every field (option), then the rules between fields."""
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelSpec(**self.model))
        _check(isinstance(self.model, ModelSpec), "model must be a ModelSpec")
        _check_declared(self)
        _check(self.seed < 2**32, f"seed must be below 2**32, got {self.seed}")
        _check(
            self.mixed == "off" or self.dtype == "float32",
            f"mixed precision keeps parameters and the update in float32, so it needs dtype float32, not "
            f"{self.dtype} (--precision mixed-bfloat16 sets both)",
        )
        self._check_population()
        self._check_slices()
        self._check_noise()

    def _check_population(self) -> None:
        _check(
            self.population_size == 0 or self.population_size >= self.batch_size,
            f"population_size (--population-size) must be 0 (off) or at least one batch ({self.batch_size} images), "
            f"got {self.population_size}",
        )
        _check(
            not self.recalibrate or self.population_size > 0,
            "recalibrate (--recalibrate) needs population statistics: set population_size (--population-size) above 0",
        )
        _check(
            not self.recalibrate or not self.model.has_norm or self.model.has_population,
            f"recalibrate (--recalibrate) keeps population statistics, and --norm {self.model.norm} has none "
            f"({self.model.row.why_not or 'it keeps no running statistics'}); drop --recalibrate",
        )

    def _check_noise(self) -> None:
        """The paper's per-example noise against what a step's batch it does not fit."""
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

    def _check_slices(self) -> None:
        """--replicas, --bn-sync and --ghost-batch against the batch and the normalisation."""
        spec = self.model
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
            not (self.replicas > 1 and spec.norm_backward != "autodiff"),
            "--norm-backward closed-form with --replicas is not supported: the replicas' BN pools its statistics "
            "in its own forward, differentiated by the framework; use one process",
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
        if isinstance(model, dict):
            model = stored_as_fields(model)
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
        data["model"] = {STORED_NAMES.get(k, k): v for k, v in data["model"].items()}
        for name, default in LATE_FIELDS.items():
            holder, key = (data["model"], name[6:]) if name.startswith("model.") else (data, name)
            if holder.get(key) == default:
                del holder[key]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _late_fields() -> dict:
    """The fields added after results were stored (option's since), with the value those results had (its before):
    config_id leaves a field at that value out, and from_dict fills it in where a stored configuration lacks it, so
    the ids and meanings of results on disk hold. Model fields as "model.NAME"."""
    late = {}
    for prefix, cls in (("", RunConfig), ("model.", ModelSpec)):
        for f in fields(cls):
            if f.metadata.get("since"):
                late[prefix + f.name] = f.metadata["before"]
    return late


LATE_FIELDS = _late_fields()
# field -> the name results were stored under (option's stored): the ModelSpec fields renamed since
STORED_NAMES = {f.name: f.metadata["stored"] for f in fields(ModelSpec) if f.metadata.get("stored")}
FIELD_NAMES = {stored: name for name, stored in STORED_NAMES.items()}


def stored_as_fields(model: dict) -> dict:
    """A stored model configuration (or a study's values) with each stored name as its field's name; refused where
    both spellings are given."""
    both = sorted(stored for stored, name in FIELD_NAMES.items() if stored in model and name in model)
    _check(
        not both, f"{', '.join(both)} given under its old and its new name ({', '.join(FIELD_NAMES[b] for b in both)})"
    )
    return {FIELD_NAMES.get(k, k): v for k, v in model.items()}
