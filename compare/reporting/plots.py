"""The report's PNG plots: training curves, train/eval divergence, drift, throughput and, for runs with
--trace-every, the activation percentile bands, the internal covariate shift and the loss landscape."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics as registry
from .files import atomic


def draw(t: dict, run_dir: Path) -> list:
    """Every plot of a run folder from its tables (see figures); returns the file names written."""
    return save(figures(t), run_dir)


def save(figs: dict, out_dir: Path) -> list:
    """Write {file name: figure} as PNGs in out_dir (each whole or not at all) and close them; the names written."""
    import matplotlib.pyplot as plt

    made = []
    for name, fig in figs.items():
        atomic(Path(out_dir) / name, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        made.append(name)
    return made


def figures(t: dict) -> dict:
    """{file name: matplotlib figure} of a run's tables. Per-epoch panels: a column per variant, a row per
    metric, integer epoch ticks, one y range per row (so columns compare at a glance), fractions on [0, 1];
    dashed lines (and the title's word on them) only where population statistics were measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def panels(frame):  # with more than one precision, a panel per variant and precision
        if "precision" in frame and frame.precision.nunique() > 1:
            return frame.assign(variant=frame.variant + ", " + frame.precision.astype(str))
        return frame

    epochs = panels(t["epochs"])
    made = {}
    if epochs.empty:
        return made
    variants = list(dict.fromkeys(epochs.variant))
    mean = epochs.groupby(["framework", "variant", "epoch"], sort=False).mean(numeric_only=True).reset_index()

    def per_variant(name, metrics, title, frame=mean, ylabels=None, dashed=None):
        dashed = {m: twin for m, twin in (dashed or {}).items() if twin in frame and frame[twin].notna().any()}
        fig, axes = plt.subplots(
            len(metrics),
            len(variants),
            figsize=(3.6 * len(variants), 2.8 * len(metrics)),
            squeeze=False,
            sharex=True,
            sharey="row",
        )
        for i, metric in enumerate(metrics):
            for j, variant in enumerate(variants):
                ax = axes[i][j]
                for fw, g in frame[frame.variant == variant].groupby("framework", sort=False):
                    (line,) = ax.plot(g.epoch, g[metric], marker="o", ms=3, label=fw)
                    twin = dashed.get(metric)
                    if twin and g[twin].notna().any():
                        ax.plot(
                            g.epoch,
                            g[twin],
                            ls="--",
                            marker="x",
                            ms=3,
                            color=line.get_color(),
                            label=f"{fw} (population statistics)",
                        )
                if i == 0:
                    ax.set_title(variant)
                if j == 0:
                    ax.set_ylabel((ylabels or metrics)[i])
                if i == len(metrics) - 1:
                    ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            if registry.bounds(metric) == registry.BOUNDS["fraction"]:
                axes[i][0].set_ylim(0, 1)  # the row shares it
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title + ("; dashed: with population statistics" if dashed else ""))
        fig.tight_layout()
        made[name] = fig

    population = {"test_acc": "pop_test_acc", "probe_disagreement": "pop_probe_disagreement"}
    per_variant(
        "curves.png",
        ["train_loss", "train_acc", "test_acc"],
        "Training curves (mean over seeds; test in eval mode)",
        dashed=population,
    )
    per_variant(
        "divergence.png",
        ["probe_logit_mad", "probe_disagreement"],
        "Train-mode vs eval-mode on the probe set",
        ylabels=["mean |logit diff|", "prediction disagreement"],
        dashed=population,
    )
    if not t["drift"].empty:
        drift = (
            panels(t["drift"])
            .groupby(["framework", "variant", "epoch"], sort=False)
            .mean(numeric_only=True)
            .reset_index()
        )
        ref = t["drift"].reference.iloc[0]
        per_variant(
            "drift.png",
            ["param_rel_l2", "probe_logit_max_abs"],
            f"Drift from {ref}",
            frame=drift,
            ylabels=["param rel. L2", "max |logit diff|"],
        )
    if "trace_steps" in t:
        made.update(trace_figures(t["trace_layers"], t["trace_steps"]))
    made["throughput.png"] = throughput_figure(panels(t["summary"]), variants)
    return made


def throughput_figure(summary, variants: list):
    """A bar per framework and variant: each run's median-epoch training examples/s."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(variants)), 3.4))
    frameworks = list(dict.fromkeys(summary.framework))
    width = 0.8 / max(1, len(frameworks))
    for k, fw in enumerate(frameworks):
        s = summary[summary.framework == fw].set_index("variant").reindex(variants)
        ax.bar(np.arange(len(variants)) + k * width, s.train_examples_per_s, width, label=fw)
    ax.set_xticks(np.arange(len(variants)) + width * (len(frameworks) - 1) / 2, variants)
    ax.set_ylabel("train examples/s (median epoch)")
    ax.set_title("Training throughput")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


TRACE_INDEX = ("framework", "variant", "seed", "config_id", "epoch", "step", "layer", "status", "precision")


def arms(frame):
    """frame with an "arm" column: the variant, plus the grid coordinates that differ between its runs (a study's
    arms side by side); the mean over seeds is taken per arm."""
    coords = [
        c
        for c in frame.columns
        if c not in TRACE_INDEX and registry.get(c) is None and frame[c].nunique(dropna=False) > 1
    ]
    label = frame.variant.astype(str)
    for c in coords:
        label = label + f", {c} " + frame[c].astype(str)
    return frame.assign(arm=label)


def trace_figures(layers, steps) -> dict:
    """{file name: figure} of the --trace-every tables (common.trace): activations.png (the 15th-85th percentile
    band and the median of each activation's input over the steps, a row per position), ics.png (the ICS
    ||G - G'|| / ||G|| per layer) and landscape.png (loss variation, gradient predictiveness, effective
    beta-smoothness), a column per arm, one line (or band) per framework, the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, steps = arms(layers), arms(steps)
    names = list(dict.fromkeys(steps.arm))
    made = {}

    def grid(rows, title, ylabels):
        fig, axes = plt.subplots(
            len(rows),
            len(names),
            figsize=(3.6 * len(names), 2.4 * len(rows)),
            squeeze=False,
            sharex=True,
            sharey="row",
        )
        for i, label in enumerate(ylabels):
            axes[i][0].set_ylabel(label)
        for j, name in enumerate(names):
            axes[0][j].set_title(name, fontsize=9)
            axes[-1][j].set_xlabel("step")
        for ax in axes.flat:
            ax.grid(alpha=0.3)
        fig.suptitle(title, fontsize=10)
        return fig, axes

    def mean(frame, by):
        return frame.groupby(["arm", "framework", *by], sort=False).mean(numeric_only=True).reset_index()

    pct = mean(layers.dropna(subset=["p50"]), ["layer", "step"])
    if not pct.empty:
        positions = list(dict.fromkeys(pct.layer))
        fig, axes = grid(
            positions,
            "Each activation's input on the probe batch (train mode):\nmedian and 15th-85th percentile band",
            [f"{p} input" for p in positions],
        )
        for i, pos in enumerate(positions):
            for j, name in enumerate(names):
                for fw, g in pct[(pct.layer == pos) & (pct.arm == name)].groupby("framework", sort=False):
                    (line,) = axes[i][j].plot(g.step, g.p50, lw=1.2, label=fw)
                    axes[i][j].fill_between(g.step, g.p15, g.p85, alpha=0.2, color=line.get_color())
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        made["activations.png"] = fig
    ics = mean(layers.dropna(subset=["ics_rel_diff"]), ["layer", "step"])
    if not ics.empty:
        weights = list(dict.fromkeys(ics.layer))
        fig, axes = grid(
            weights,
            "Internal covariate shift ||G - G'|| / ||G||:\nG' after the earlier layers' SGD step",
            [f"{w} ICS" for w in weights],
        )
        for i, w in enumerate(weights):
            for j, name in enumerate(names):
                for fw, g in ics[(ics.layer == w) & (ics.arm == name)].groupby("framework", sort=False):
                    axes[i][j].plot(g.step, g.ics_rel_diff, marker="o", ms=2, lw=1, label=fw)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        made["ics.png"] = fig
    land = mean(steps, ["step"])
    rows = ["loss_variation", "grad_predictiveness", "beta_smoothness"]
    fig, axes = grid(rows, "Along the step's gradient\n(step sizes lr x 0.25 ... 4)", rows)
    for i, metric in enumerate(rows):
        for j, name in enumerate(names):
            for fw, g in land[land.arm == name].groupby("framework", sort=False):
                axes[i][j].plot(g.step, g[metric], marker="o", ms=2, lw=1, label=fw)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    made["landscape.png"] = fig
    return made
