"""Every metric a report, a study, a plot or the tracker shows: one entry each, read by all of them.

An entry says what the metric is in words (label), what values it can take (its kind: a fraction in
[0, 1], a difference of two fractions in [-1, 1], a quantity >= 0, a count, or any real number), which way
is better (or None where neither is), and so how it is printed and how far a t-interval over seeds may
reach before it is clipped. RUN_METRICS are the runs table's (one value per run, from its epochs): what a
study can answer with and compare.

A column that is not a metric (framework, variant, seed, status, a grid coordinate) is not here; `get`
returns None for it, and it prints as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOUNDS = {
    "fraction": (0.0, 1.0),
    "difference": (-1.0, 1.0),  # of two fractions
    "nonnegative": (0.0, math.inf),
    "count": (0.0, math.inf),
    "real": (-math.inf, math.inf),
}


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    kind: str  # a key of BOUNDS
    better: str | None = None  # "higher", "lower", or None
    speed: bool = False  # examples/s: printed with thousands separators
    short: str = ""  # the label in a sentence where the long one would crowd it (study answers); else the label

    @property
    def said(self) -> str:
        return self.short or self.label

    @property
    def bounds(self) -> tuple:
        return BOUNDS[self.kind]

    def format(self, value) -> str:
        """value as the reports print it ('' for a missing one)."""
        if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
            return ""
        if self.speed:
            return f"{value:,.0f}"
        if self.kind in ("fraction", "difference"):
            return f"{value:.4f}"
        if self.kind == "count":
            return f"{value:,.0f}"
        return f"{value:.4g}"


def _entries():
    F, D, N, C, R = "fraction", "difference", "nonnegative", "count", "real"
    hi, lo = "higher", "lower"
    yield from [
        # per epoch (epoch records, epochs table)
        Metric("train_loss", "training loss", N, lo),
        Metric("train_acc", "training accuracy", F, hi),
        Metric("test_loss", "test loss", N, lo),
        Metric("test_acc", "test accuracy", F, hi),
        Metric("probe_acc_eval", "probe accuracy in eval mode", F, hi),
        Metric("probe_acc_train", "probe accuracy in train mode", F, hi),
        Metric("probe_disagreement", "train/eval prediction disagreement", F, lo),
        Metric("probe_logit_mad", "train/eval mean |logit difference|", N, lo),
        Metric("train_examples_per_s", "training examples/s", N, hi, speed=True),
        Metric("warmup_examples_per_s", "warm-up examples/s", N, hi, speed=True),
        Metric("eval_examples_per_s", "evaluation examples/s", N, hi, speed=True),
        Metric("train_seconds", "training time per epoch (s)", N, lo),
        Metric("warmup_seconds", "warm-up time (s)", N, lo),
        Metric("eval_seconds", "evaluation time (s)", N, lo),
        Metric("first_step_seconds", "first step's time (s): a compiled mode's compilation", N, lo),
        Metric("timed_steps", "timed steps", C),
        Metric("warmup_steps", "warm-up steps", C),
        Metric("pop_test_loss", "test loss with population statistics", N, lo),
        Metric("pop_test_acc", "test accuracy with population statistics", F, hi),
        Metric("pop_probe_acc_eval", "probe accuracy in eval mode with population statistics", F, hi),
        Metric("pop_probe_logit_mad", "train/eval mean |logit difference| with population statistics", N, lo),
        Metric("pop_probe_disagreement", "train/eval prediction disagreement with population statistics", F, lo),
        Metric("population_images", "training images the population statistics come from", C),
        Metric("population_seconds", "time to compute and evaluate with population statistics (s)", N, lo),
        # the research transforms' output on the probe, per layer (bn_gap table) and their mean over the layers
        # (epochs table): how white whiten's is, how uniform the PITs' (common.reference.output_departure)
        Metric("whiteness", "whitened output: ||Cov - I||_F / ||I||_F per group, mean over groups", N, lo),
        Metric("ks_uniform", "PIT output: Kolmogorov-Smirnov distance from U(0, 1), mean over channels", N, lo),
        # per normalisation layer (bn_gap table)
        Metric("mean_gap", "|batch mean - running mean| in running standard deviations", N, lo),
        Metric("var_log_ratio", "|log(batch variance / running variance)|", N, lo),
        Metric("lag_mean_gap", "the running average's lag: mean gap from the population statistics", N, lo),
        Metric("lag_var_log_ratio", "the running average's lag: variance log-ratio from the population's", N, lo),
        Metric("noise_mean_gap", "batch noise: the batch's mean gap from the population statistics", N, lo),
        Metric("noise_var_log_ratio", "batch noise: the batch's variance log-ratio from the population's", N, lo),
        Metric(
            "sigma_average_gap",
            "renorm: sqrt(running variance) over Ioffe's running sigma, |ratio - 1|, on the population's batches",
            N,
        ),
        # per run (runs table): what a study answers with
        Metric("best_test_acc", "best test accuracy", F, hi),
        Metric("final_test_acc", "final test accuracy", F, hi),
        Metric("final_train_loss", "final training loss", N, lo),
        # the final epoch's training accuracy, as the steps saw it: train mode, and a noisy run's noise
        Metric("final_train_acc", "final training accuracy (train mode, as trained)", F, hi, short="training accuracy"),
        Metric("final_probe_disagreement", "train/eval prediction disagreement", F, lo),
        Metric("final_probe_logit_mad", "train/eval mean |logit difference|", N, lo),
        Metric("final_probe_acc_eval", "probe accuracy in eval mode", F, hi),
        Metric("final_probe_acc_train", "probe accuracy in train mode", F, hi),
        # train_examples_per_s (above) is per run too: the median epoch's
        Metric("best_pop_test_acc", "best test accuracy with population statistics", F, hi),
        Metric("final_pop_test_acc", "final test accuracy with population statistics", F, hi),
        Metric("final_pop_gain", "final test accuracy, population statistics minus running average", D, hi),
        Metric("final_pop_probe_disagreement", "train/eval prediction disagreement with population statistics", F, lo),
        # mixed precision: the final running statistics' relative L2 distance from the float32 twin's (0 for the
        # twin itself, so a paired difference is the drift); NaN for a run with no twin
        Metric("final_running_stats_drift", "running-statistics drift from the float32 run", N, lo),
        Metric("final_whiteness", "whitened output's distance from white, final epoch, mean over layers", N, lo),
        Metric("final_ks_uniform", "PIT output's KS distance from uniform, final epoch, mean over layers", N, lo),
        # drift between frameworks, and a mixed run from its float32 twin (drift and mixed_precision tables)
        Metric("param_rel_l2", "relative L2 distance of the trainable parameters", N, lo),
        Metric("running_stats_rel_l2", "relative L2 distance of the running statistics", N, lo),
        Metric("param_max_abs", "largest parameter difference", N, lo),
        Metric("probe_logit_max_abs", "largest probe logit difference", N, lo),
        Metric("probe_pred_agreement", "probe prediction agreement", F, hi),
        Metric("speed_ratio", "training examples/s, mixed over float32", N, hi),
        # --trace-every (common.trace): per traced step and layer (trace_layers table), per traced step
        # (trace_steps table), and per run, their mean over every traced step (runs table)
        Metric("p15", "15th percentile of the activation's input (all units)", R),
        Metric("p50", "median of the activation's input (all units)", R),
        Metric("p85", "85th percentile of the activation's input (all units)", R),
        Metric("unit_p15", "15th percentile of one unit's activation input", R),
        Metric("unit_p50", "median of one unit's activation input", R),
        Metric("unit_p85", "85th percentile of one unit's activation input", R),
        Metric("loss", "loss on the step's batch", N, lo),
        Metric("trace_seconds", "time of the traced measures (s)", N, lo),
        # summary rows: a run's counts and what it ran
        Metric("best_epoch", "the epoch of the best mean test accuracy", C),
        Metric("final_param_rel_l2", "final relative L2 distance of the parameters from the reference", N, lo),
        Metric("final_probe_logit_max_abs", "final largest probe logit difference from the reference", N, lo),
        Metric("bn_decay", "the decay the normalisation layers used", R),
        Metric("bn_epsilon", "the epsilon the normalisation layers used", R),
    ]


def _derived_entries():
    """The metrics made per traced measure and per precision."""
    F, N, R = "fraction", "nonnegative", "real"
    hi, lo = "higher", "lower"
    for name, label, kind, short in (  # per traced step (and layer), and per run their mean over steps (TRACE_METRICS)
        ("ics_rel_diff", "internal covariate shift ||G - G'|| / ||G||", N, "ICS"),
        ("ics_cos", "internal covariate shift cos(G, G')", R, "ICS cosine"),
        ("loss_variation", "loss variation along the gradient", N, "loss variation"),
        ("grad_predictiveness", "gradient change along the gradient", N, "gradient change"),
        ("beta_smoothness", "effective beta-smoothness", N, "beta-smoothness"),
        ("grad_norm", "gradient norm", N, "gradient norm"),
    ):
        yield Metric(name, label, kind)
        yield Metric(f"mean_{name}", f"{label}, mean over traced steps", kind, short=short)
    for precision in ("mixed", "float32"):  # mixed_precision table: each mixed run beside its float32 twin
        yield Metric(f"test_acc_{precision}", f"test accuracy ({precision})", F, hi)
        yield Metric(f"probe_disagreement_{precision}", f"train/eval prediction disagreement ({precision})", F, lo)
        yield Metric(f"probe_logit_mad_{precision}", f"train/eval mean |logit difference| ({precision})", N, lo)
        yield Metric(f"train_examples_per_s_{precision}", f"training examples/s ({precision})", N, hi, speed=True)


REGISTRY = {m.name: m for m in (*_entries(), *_derived_entries())}
# the runs table's metrics, in its column order: what a study answers and compares with
RUN_METRICS = {
    name: REGISTRY[name]
    for name in (
        "best_test_acc",
        "final_test_acc",
        "final_train_loss",
        "final_train_acc",
        "final_probe_disagreement",
        "final_probe_logit_mad",
        "final_probe_acc_eval",
        "final_probe_acc_train",
        "train_examples_per_s",
        "best_pop_test_acc",
        "final_pop_test_acc",
        "final_pop_gain",
        "final_pop_probe_disagreement",
        "final_running_stats_drift",
        "final_whiteness",
        "final_ks_uniform",
    )
}


# the runs table's columns of a run with --trace-every (common.trace): a study can answer with them too
TRACE_METRICS = {
    name: REGISTRY[name]
    for name in (
        "mean_ics_rel_diff",
        "mean_ics_cos",
        "mean_loss_variation",
        "mean_grad_predictiveness",
        "mean_beta_smoothness",
        "mean_grad_norm",
    )
}


def get(name: str) -> Metric | None:
    """The metric a column holds (its statistics' columns, NAME_mean/_std/_ci_low/_ci_high, are NAME's), or None
    for a column that is not a metric."""
    return REGISTRY.get(name)


def bounds(name: str) -> tuple:
    """(low, high) of the values a metric can take; (-inf, inf) for a column that is not one."""
    metric = get(name)
    return metric.bounds if metric else BOUNDS["real"]


def format_value(value, name: str) -> str:
    """value as the reports print it: by its metric's kind, or as it is for a column that is no metric."""
    metric = get(name)
    if metric is not None and isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return metric.format(value)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)
