"""A study's plot (study.png) and report (study.md), from its answer and its analysis tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..reporting.files import atomic
from ..reporting.markdown import markdown_table, two_seed_note
from ..reporting.stats import metric_bounds
from .analysis import cell_keys, num, shown_metrics
from .answers import fmt_metric, with_interval
from .spec import METRICS, Study


def plot(cell_table: pd.DataFrame, study: Study, out_dir) -> list:
    """study.png (see figure); [] where there is nothing to draw."""
    import matplotlib.pyplot as plt

    fig = figure(cell_table, study)
    if fig is None:
        return []
    atomic(out_dir / "study.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return ["study.png"]


def figure(cell_table: pd.DataFrame, study: Study):
    """A panel per shown metric (the [plot] table's, then the `also` ones) against plot.x, mean over seeds with
    its 95% interval as a band (numeric x) or error bars (categories); cells where a seed failed or diverged
    are marked x. None where there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = study.plot["x"]
    if cell_table.empty or x is None or x not in cell_table:
        return None
    metrics = list(dict.fromkeys([*study.plot["metrics"], *study.answer.get("also", ())]))
    series_keys = [k for k in cell_keys(study, cell_table) if k != x and k not in study.scale]
    numeric = pd.api.types.is_numeric_dtype(cell_table[x]) and cell_table[x].dtype != bool
    categories = list(dict.fromkeys(cell_table[x]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        groups = list(cell_table.groupby(series_keys, sort=False, dropna=False)) if series_keys else [((), cell_table)]
        for n, (values, g) in enumerate(groups):
            values = values if isinstance(values, tuple) else (values,)
            g = g.sort_values(x) if numeric else g.set_index(x).reindex(categories).reset_index()
            # categories: the series dodged symmetrically about each category's tick
            pos = g[x].astype(float) if numeric else np.arange(len(g)) + (n - (len(groups) - 1) / 2) * 0.06
            label = " ".join(num(v) for v in values)
            (line,) = ax.plot(pos, g[metric], marker="o", ms=3, label=label)
            low, high = (
                g[f"{metric}_ci_low"].clip(*metric_bounds(metric)),
                g[f"{metric}_ci_high"].clip(*metric_bounds(metric)),
            )  # the band stays in range
            if numeric:
                ax.fill_between(pos, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
            else:
                ax.errorbar(
                    pos,
                    g[metric],
                    yerr=[g[metric] - low, high - g[metric]],
                    fmt="none",
                    ecolor=line.get_color(),
                    capsize=3,
                )
            bad = g[(g.get("diverged", 0) > 0) | (g.get("failed", 0) > 0)] if "diverged" in g else g.iloc[:0]
            if not bad.empty:  # along the bottom edge (x in data, y in axes units), a row per series
                bad_pos = bad[x].astype(float) if numeric else pos[bad.index]
                ax.plot(
                    bad_pos,
                    [0.04 + 0.05 * n] * len(bad),
                    "x",
                    color=line.get_color(),
                    ms=8,
                    mew=2,
                    transform=ax.get_xaxis_transform(),
                )
        if METRICS[metric].kind == "fraction":
            ax.set_ylim(0, 1)  # its bands are clipped to it
        if metric == "best_test_acc" and study.failure:
            ax.axhline(study.failure["min_best_test_acc"], color="grey", ls="--", lw=1, label="failure threshold")
        if numeric:  # a tick at each grid value, and the grid's range even where no cell has a value yet
            grid = np.array(sorted({float(v) for v in cell_table[x]}))
            log = study.plot["log_x"] and grid.min() > 0
            if log:
                ax.set_xscale("log")
            low, high = (
                (grid.min() / 1.25, grid.max() * 1.25)
                if log
                else (grid.min() - 0.05 * (np.ptp(grid) or 1), grid.max() + 0.05 * (np.ptp(grid) or 1))
            )
            ax.set_xlim(low, high)
            ax.set_xticks(grid, [num(v) for v in grid])
            ax.minorticks_off()
        else:
            ax.set_xticks(np.arange(len(categories)), [num(c) for c in categories])
        ax.set_xlabel(x)
        ax.set_ylabel(METRICS[metric].label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study.name}: mean over seeds, 95% t-interval; x = a seed failed or diverged", fontsize=9)
    fig.tight_layout()
    return fig


def evidence(cell_table: pd.DataFrame, study: Study) -> str:
    """The evidence table of study.md: per cell, each shown metric's mean over seeds with its interval, and the
    run counts."""
    metrics = shown_metrics(study)
    counts = ["seeds", "complete", "diverged", "missing"] + (["failed"] if study.failure else [])
    return _table(cell_table, cell_keys(study, cell_table) + metrics + counts)


def render(
    study: Study,
    summary,
    answer: list,
    frames: dict,
    env: dict,
    plots: list,
    written: list,
    unfinished: pd.DataFrame,
    problems: list,
) -> str:
    """study.md: the question, the answer (summary), how it was measured, the evidence, the runs without a
    result, the plots, the appendix of every comparison and the files."""
    cell_table = frames["study"]
    parts = [f"# Study: {study.name}\n", f"**Question.** {study.question}\n"]
    if study.about:
        parts.append(study.about + "\n")
    parts += ["## Answer (measured)\n", summary.markdown(), *_caveats(cell_table, env)]
    parts += _how_measured(study, cell_table, env)
    if problems:
        parts += ["## Problems reading this study\n"] + [f"- {p}" for p in problems] + [""]
    parts += _evidence_section(study, frames)
    parts += _unfinished_section(study, unfinished, frames.get("runs_retried"))
    if plots:
        parts += ["## Plots\n"] + [f"![{p}]({p})\n" for p in plots]
    parts += [
        "## Appendix: every comparison\n",
        "The answer above says once what the frameworks and strata share; here is each one's own sentence.\n",
        *[f"- {s}" for s in answer],
        "",
    ]
    parts += ["## Files\n", ", ".join(f"`{w}`" for w in written) + "\n"]
    return "\n".join(parts)


def _caveats(cell_table: pd.DataFrame, env: dict) -> list:
    """What the answer cannot rest on: an interruption, no complete run, one seed."""
    n_seeds = int(cell_table.seeds.max()) if not cell_table.empty else 0
    parts = []
    if env.get("interrupted"):
        parts.append(
            f"**This study was interrupted ({env.get('signal')}).** Start it again with the same "
            f"`--run-id` to run the cells that have no result; the answer above uses what was measured.\n"
        )
    if cell_table.empty or cell_table.complete.sum() == 0:
        diverged = int(cell_table.diverged.sum()) if not cell_table.empty else 0
        parts.append(
            "**No run has a complete result**, so the answer above has nothing to rest on"
            + (f" ({diverged} diverged)" if diverged else "")
            + "; the tables below say what each cell is missing.\n"
        )
    elif n_seeds <= 1:
        parts.append(
            "**Every cell rests on one seed**: no spread between seeds is measured, so no interval "
            "is given and no difference can be told from seed noise; `--seeds 0,1,2` gives one.\n"
        )
    return parts


def _how_measured(study: Study, cell_table: pd.DataFrame, env: dict) -> list:
    """The commands (each session of a resumed study), the grid, budget, machine and statistics."""
    grid = (
        "; ".join(
            f"{k} = {', '.join(num(v) for v in dict.fromkeys(cell_table[k]))}" for k in study.axes if k in cell_table
        )
        or "none (one cell per framework and variant)"
    )
    sessions = env.get("sessions") or [env]
    commands = (
        [f"- command: `{env.get('command', '?')}`"]
        if len(sessions) == 1
        else [f"- started {len(sessions)} times (resumed); each time:"]
        + [
            f"  {i}. `{x.get('command', '?')}`: {x.get('runs_run', '?')} run(s), {x.get('jobs', 1)} worker(s) at "
            f"once, {x.get('seconds', '?')} s" + (f", interrupted by {x.get('signal')}" if x.get("interrupted") else "")
            for i, x in enumerate(sessions, 1)
        ]
    )
    ran = [x for x in sessions if x.get("runs_run")] or sessions
    jobs = max(int(x.get("jobs") or 1) for x in ran)
    threads = sorted({x.get("threads_per_worker") or "default" for x in ran}, key=str)
    listed = {
        k: ", ".join(dict.fromkeys(cell_table[k])) if not cell_table.empty else "" for k in ("variant", "framework")
    }
    parts = [
        "## How it was measured\n",
        *commands,
        f"- grid: {grid}; variants: {listed['variant']}; frameworks: {listed['framework']}; "
        f"seeds: {', '.join(map(str, env.get('seeds', [])))}",
        f"- budget: {env.get('budget', '?')}" + (" (`--quick`)" if env.get("quick") else ""),
        f"- machine: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores); "
        f"up to {jobs} worker(s) at once, {'/'.join(map(str, threads))} thread(s) each; "
        f"wall time {env.get('seconds', '?')} s",
        "- statistics: mean over the seeds' complete runs, `[low, high]` the 95% Student-t interval "
        "(n = seeds) clipped to what the metric can be (accuracies and rates to [0, 1], losses to >= 0; "
        "study.csv keeps the unclipped `_ci_low`/`_ci_high`); comparisons use the per-seed paired "
        "difference and its t-interval. "
        "Diverged runs are counted apart (`diverged`) and left out of the means."
        + (
            f" Failure: a non-finite training loss or a best test accuracy below "
            f"{study.failure['min_best_test_acc']:g}."
            if study.failure
            else ""
        ),
    ]
    if jobs > 1:
        parts.append(
            f"- throughput: up to {jobs} workers shared the machine, so examples/s figures are "
            "each worker's share, not what one run alone would reach; use `compare.run` or "
            "`compare.bench` to measure speed."
        )
    return parts + [""]


def _evidence_section(study: Study, frames: dict) -> list:
    """The per-cell evidence table and the answer's own tables (stability, comparisons, against the best)."""
    cell_table = frames["study"]
    parts = [
        "## Evidence\n",
        "Per cell, over seeds (complete runs).\n",
        evidence(cell_table, study),
        two_seed_note(cell_table, "cell"),
    ]
    for name in ("stability", "comparisons", "against_best"):
        if name in frames:
            shown = [c for c in frames[name].columns if not c.startswith("difference_ci")]  # shown as [low, high]
            parts += [f"### {name.replace('_', ' ').capitalize()}\n", _table(frames[name], shown)]
    return parts


def _unfinished_section(study: Study, unfinished: pd.DataFrame, retried) -> list:
    """The runs without a complete result, and those a lost worker or node made the executor run again."""
    parts = []
    if not unfinished.empty:
        columns = ["framework", "variant", "seed", *study.axes, "status", "epochs_done", "detail"]
        parts += [
            "## Runs without a complete result\n",
            "`diverged` is a result (counted above); the others are missing and are run again when the "
            "study is started again with the same `--run-id`.\n",
            markdown_table(unfinished, [c for c in columns if c in unfinished]),
        ]
    if retried is not None and not retried.empty:
        columns = ["framework", "variant", "seed", *study.axes, "attempts", "status"]
        parts += [
            "## Runs tried again\n",
            "Their worker or node was lost; the executor ran them again elsewhere (the tables hold the last "
            "attempt).\n",
            markdown_table(retried, [c for c in columns if c in retried]),
        ]
    return parts


def _table(frame: pd.DataFrame, columns: list) -> str:
    shown = frame.copy()
    for c in columns:  # a mean shows its interval and n; a comparison's figures are in its metric's format
        if c not in frame:
            continue
        rows = list(frame.iterrows())
        metrics = [
            row.metric if c in ("arm_mean", "baseline_mean", "difference") and "metric" in row else c for _, row in rows
        ]
        if f"{c}_ci_high" in frame:
            shown[c] = [with_interval(row, c, m) for (_, row), m in zip(rows, metrics)]
        elif frame[c].dtype.kind == "f":
            shown[c] = [
                fmt_metric(row[c], m) if m in METRICS else ("" if pd.isna(row[c]) else num(row[c]))
                for (_, row), m in zip(rows, metrics)
            ]
    return markdown_table(shown[[c for c in columns if c in shown]], columns)  # intervals already shown
