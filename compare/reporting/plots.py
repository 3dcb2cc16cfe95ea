"""The report's PNG plots: training curves, train/eval divergence, drift and throughput."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics as registry
from .files import atomic


def draw(t: dict, run_dir: Path) -> list:
    """Every plot of a run folder from its tables (see figures); returns the file names written."""
    import matplotlib.pyplot as plt

    made = []
    for name, fig in figures(t).items():
        atomic(run_dir / name, lambda p: fig.savefig(p, dpi=110, format="png"))
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
    summary = panels(t["summary"])
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
    made["throughput.png"] = fig
    return made
