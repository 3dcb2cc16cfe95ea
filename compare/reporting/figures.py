"""The guides' figures, drawn from committed records (docs/measured) so that they read at a glance: the arms a
question compares in one panel, the frameworks as thin marks around their mean, titles and legends in words, at
most six panels and 1,600 px at 100 dpi.

    python -m compare.reporting.images      # every image in docs/images, and its manifest (what made it)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.registry import FRAMEWORKS

from ..studies.analysis import arm_label, cell_keys, groups, num, strata_of
from ..studies.spec import METRICS, Study
from ..studies.summary import coordinate, name, shown
from .stats import metric_bounds

DPI = 100
WIDTH = 16.0  # inches: 1,600 px at DPI
MARKERS = {"torch": "o", "mxnet": "s", "tensorflow": "^", "jax": "D"}


def _figure(panels: int, height: float = 3.6, panel_width: float = 4.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if panels > 6:
        raise ValueError(f"{panels} panels: a figure holds at most six; split it by question")
    if panel_width * panels + 0.6 <= WIDTH:  # side by side
        fig, axes = plt.subplots(1, panels, figsize=(panel_width * panels + 0.6, height), squeeze=False)
        return fig, list(axes[0])
    # too wide for one row: one panel above the other, each as wide as its names need
    fig, axes = plt.subplots(panels, 1, figsize=(min(WIDTH, panel_width + 0.6), height * panels), squeeze=False)
    return fig, list(axes[:, 0])


def _framework_marks(ax, positions, rows: dict, metric: str, spread: float) -> None:
    """Each framework's mean and 95% interval as a small mark beside `positions`, the same mark in every panel."""
    low, high = metric_bounds(metric)
    for i, (framework, frame) in enumerate(rows.items()):
        offset = (i - (len(rows) - 1) / 2) * spread
        values = frame[metric].to_numpy(dtype=float)
        lo = np.clip(frame[f"{metric}_ci_low"].to_numpy(dtype=float), low, high)
        hi = np.clip(frame[f"{metric}_ci_high"].to_numpy(dtype=float), low, high)
        ax.errorbar(
            np.asarray(positions) + offset,
            values,
            yerr=[np.nan_to_num(values - lo), np.nan_to_num(hi - values)],
            fmt=MARKERS.get(framework, "o"),
            ms=4,
            lw=0.8,
            capsize=2,
            color="0.35",
            mfc="white",
            label=FRAMEWORKS[framework].label if framework in FRAMEWORKS else framework,
        )


def compare_figure(cell_table: pd.DataFrame, study: Study, metric: str | None = None):
    """A compare study's answer: a panel per stratum (activation, batch size, ...), each arm a bar at the mean
    over frameworks, each framework's mean and 95% interval a small mark on it."""
    metric = metric or study.answer["metric"]
    axis = list(study.answer["axis"])
    strata = shown(study, cell_table, [k for k in strata_of(study, cell_table) if k != "framework"])
    found = groups(cell_table, strata)
    most = max(len({arm_label(axis, a) for a in g[axis].itertuples(index=False)}) for _, g in found)
    fig, axes = _figure(len(found), panel_width=max(4.6, 1.15 * most))  # room for each arm's name
    for ax, (values, group) in zip(axes, found):
        arms = list(dict.fromkeys(arm_label(axis, a) for a in group[axis].itertuples(index=False)))
        baseline = study.answer.get("baseline")
        if baseline is not None:
            first = arm_label(axis, tuple(baseline[a] for a in axis))
            arms = [first] + [a for a in arms if a != first] if first in arms else arms
        labels = [arm_label(axis, a) for a in group[axis].itertuples(index=False)]
        group = group.assign(arm=labels)
        means = group.groupby("arm")[metric].mean().reindex(arms)
        positions = np.arange(len(arms))
        colours = ["0.55" if i == 0 and baseline is not None else "C0" for i in range(len(arms))]
        ax.bar(positions, means.to_numpy(), width=0.7, color=colours, alpha=0.35, label="mean over frameworks")
        rows = {
            fw: frame.set_index("arm").reindex(arms).reset_index()
            for fw, frame in group.groupby("framework", sort=False)
        }
        _framework_marks(ax, positions, rows, metric, spread=0.12)
        ax.set_xticks(positions, [_wrap(name(study, a)) for a in arms], fontsize=8)
        ax.set_title(", ".join(coordinate(study, k, v) for k, v in zip(strata, values)), fontsize=10)
        _y(ax, metric)
    axes[0].legend(fontsize=7, loc="best", title="marks: mean, 95% interval", title_fontsize=7)
    fig.suptitle(METRICS[metric].label, fontsize=10)
    fig.tight_layout()
    return fig


def line_figure(cell_table: pd.DataFrame, study: Study, metric: str | None = None):
    """A largest-stable or trend study's answer: the metric against the grid's x, a thick line per arm (the mean
    over frameworks) and each framework a thin one, a panel per stratum; the failure threshold dashed. x on a log
    axis where the study plots one, else its values evenly spaced (decay 0.5, 0.9, 0.99, 0.999)."""
    x = study.answer["x"]
    metric = metric or study.answer["metric"]
    keys = [k for k in cell_keys(study, cell_table) if k not in ("framework", x) and k not in study.scale]
    series = ["variant"] if "variant" in shown(study, cell_table, ["variant"]) else []
    strata = shown(study, cell_table, [k for k in keys if k not in series])
    found = groups(cell_table, strata)
    grid = sorted({float(v) for v in cell_table[x]})
    log = bool(study.plot.get("log_x")) and grid[0] > 0

    def place(values):
        return np.asarray(values, float) if log else np.array([grid.index(float(v)) for v in values])

    fig, axes = _figure(len(found))
    for ax, (values, group) in zip(axes, found):
        for i, (arm, frame) in enumerate(groups(group, series)):
            colour = f"C{i}"
            what = f"{coordinate(study, 'variant', arm[0])}, " if series else ""
            for fw, one in frame.groupby("framework", sort=False):
                one = one.sort_values(x)
                ax.plot(place(one[x]), one[metric], color=colour, lw=0.7, alpha=0.6, marker=MARKERS.get(fw, "o"))
            mean = frame.groupby(x)[metric].mean().sort_index()
            ax.plot(place(mean.index), mean.to_numpy(), color=colour, lw=2.2, label=f"{what}mean over frameworks")
        if metric == "best_test_acc" and study.failure:
            ax.axhline(study.failure["min_best_test_acc"], color="0.4", ls="--", lw=1, label="failure threshold")
        if log:
            ax.set_xscale("log")
        ax.set_xticks(place(grid), [num(v) for v in grid])
        ax.minorticks_off()
        ax.set_xlabel(x.replace("_", " "))
        ax.set_title(", ".join(coordinate(study, k, v) for k, v in zip(strata, values)), fontsize=10)
        _y(ax, metric)
    for line in (ln for ax in axes for ln in ax.get_lines()):
        line.set_markersize(3)
        line.set_markerfacecolor("white")
    for fw, marker in MARKERS.items():  # the thin lines' marks, once
        if fw in set(cell_table.framework):
            axes[-1].plot([], [], color="0.4", lw=0.7, marker=marker, ms=3, mfc="white", label=FRAMEWORKS[fw].label)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(METRICS[metric].label, fontsize=10)
    fig.tight_layout()
    return fig


def answer_figure(cell_table: pd.DataFrame, study: Study):
    """The figure of a study's answer in docs/answers.md."""
    if study.answer["kind"] == "compare":
        return compare_figure(cell_table, study)
    return line_figure(cell_table, study)


def _y(ax, metric: str) -> None:
    ax.set_ylabel(METRICS[metric].label if len(METRICS[metric].label) < 40 else METRICS[metric].said, fontsize=8)
    if METRICS[metric].kind == "fraction":
        ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")


def _wrap(text: str, width: int = 16) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


TRACE_KINDS = {
    # kind: (the table it comes from, its panels' metric or layers, the figure's title)
    "landscape": ("trace_steps", ["loss_variation", "grad_predictiveness", "beta_smoothness"], "Along the gradient"),
    "ics": ("trace_layers", ["conv2", "fc1", "fc2", "fc3"], "Internal covariate shift ||G - G'|| / ||G|| per layer"),
    "activations": ("trace_layers", ["conv1", "conv2", "fc1", "fc2"], "Each activation's input on the probe batch"),
}
TRACE_LABELS = {
    "loss_variation": "loss variation",
    "grad_predictiveness": "gradient change (predictiveness)",
    "beta_smoothness": "effective beta-smoothness",
}


def trace_figure(t: dict, study: Study, kind: str, activation: str):
    """A why-BN figure of one activation (--trace-every, common.trace): a panel per measure (landscape) or per layer
    (ics, activations), the steps along x, each arm of the study (BN, noisy BN, no BN) in every panel as a thick
    line, the mean over frameworks and seeds, and each framework's mean over seeds as a thin one; activations
    shows the median as the line and the 15th-85th percentile band shaded. A log y axis where the arms part by more
    than 30 times."""
    table, panels, title = TRACE_KINDS[kind]
    frame = t[table]
    frame = frame[frame.activation == activation] if "activation" in frame else frame
    axis = list(study.answer["axis"])
    frame = frame.assign(arm=[arm_label(axis, a) for a in frame[axis].itertuples(index=False)])
    arms = list(dict.fromkeys(frame.arm))
    fig, axes = _figure(len(panels), height=3.2)
    for ax, panel in zip(axes, panels):
        data = frame if kind == "landscape" else frame[frame.layer == panel]
        metric = panel if kind == "landscape" else ("p50" if kind == "activations" else "ics_rel_diff")
        data = data.dropna(subset=[metric])
        tops = []
        for i, arm in enumerate(arms):
            mine = data[data.arm == arm]
            if mine.empty:
                continue
            colour = f"C{i}"
            for _, one in mine.groupby("framework", sort=False):
                per = one.groupby("step")[metric].mean()
                ax.plot(per.index, per.to_numpy(), color=colour, lw=0.6, alpha=0.5)
            mean = mine.groupby("step")[[metric, *(["p15", "p85"] if kind == "activations" else [])]].mean()
            ax.plot(mean.index, mean[metric].to_numpy(), color=colour, lw=2, label=name(study, arm))
            if kind == "activations":  # the band's edges as lines: shaded bands of three arms blend into colours
                for edge in ("p15", "p85"):  # no legend shows
                    ax.plot(mean.index, mean[edge].to_numpy(), color=colour, lw=1, ls="--")
            tops.append(mean[metric].abs().max())
        positive = [v for v in tops if v > 0]
        if kind != "activations" and positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_title(TRACE_LABELS.get(panel, f"{panel} input" if kind == "activations" else panel), fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    if kind == "activations":
        axes[0].plot([], [], color="0.3", lw=1, ls="--", label="15th and 85th percentiles")
    axes[0].legend(fontsize=7, loc="best", title="thick: mean; thin: each framework", title_fontsize=7)
    middle = ": the median (lines) and the 15th and 85th percentiles (dashed)" if kind == "activations" else ""
    fig.suptitle(f"{title}, {name(study, f'activation={activation}')}{middle}", fontsize=10)
    fig.tight_layout()
    return fig


def divergence_figure(epochs: pd.DataFrame):
    """A run's train/eval divergence per epoch (README): a panel per variant, the probe's prediction disagreement
    with the running average (solid) and with population statistics (dashed), thick the mean over frameworks and
    thin each framework; integer epoch ticks."""
    from matplotlib.ticker import MaxNLocator

    variants = [v for v in dict.fromkeys(epochs.variant) if v != "none"]
    fig, axes = _figure(len(variants), height=3.4)
    mean = epochs.groupby(["framework", "variant", "epoch"], sort=False).mean(numeric_only=True).reset_index()
    for ax, variant in zip(axes, variants):
        mine = mean[mean.variant == variant]
        for column, style, what in (
            ("probe_disagreement", "-", "running average"),
            ("pop_probe_disagreement", "--", "population statistics"),
        ):
            if column not in mine or mine[column].isna().all():
                continue
            for _, one in mine.groupby("framework", sort=False):
                ax.plot(one.epoch, one[column], color="C0" if style == "-" else "C1", lw=0.6, ls=style, alpha=0.6)
            overall = mine.groupby("epoch")[column].mean()
            ax.plot(
                overall.index,
                overall.to_numpy(),
                color="C0" if style == "-" else "C1",
                lw=2,
                ls=style,
                label=f"eval with the {what} (mean over frameworks)",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("train/eval prediction disagreement", fontsize=8)
        ax.set_ylim(0, None)
        ax.set_title(f"{variant} ({', '.join(FRAMEWORKS[f].label for f in dict.fromkeys(mine.framework))})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], color="0.4", lw=0.6, label="each framework (thin)")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Train/eval divergence after each epoch", fontsize=10)
    fig.tight_layout()
    return fig
