"""A study's answer, computed from its runs: statistics per cell, the answer's tables, study.md, plots.

Statistics over seeds: mean, sample standard deviation and the 95% Student-t
interval (compare.reporting.stats) of each run's metric. Differences between two arms
(compare): the per-seed differences of runs that share a seed (the same seed
gives the same initial weights and batches, so the pairing removes what the
arms share), with their own t-interval. Every sentence of the answer is made
here from these numbers.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..reporting.files import atomic
from ..reporting.markdown import fmt, interval_text, markdown_table, two_seed_note
from ..reporting.stats import clipped, difference_bounds, metric_bounds, seed_stats
from .spec import METRICS, Study

DONE = ("complete", "diverged")  # a result; the other statuses mean the run is missing
ONE_SEED = "one seed: no interval"  # a comparison's verdict with one paired seed
NO_PAIR = "no paired seed"  # ... with none (the arms' complete runs share no seed)


def failed(runs: pd.DataFrame, study: Study) -> pd.Series:
    """Per run: True if it fails the study's criterion (non-finite loss, or best test accuracy below the
    threshold), False if it passes, NaN (unknown) if it did not end with a result."""
    out = pd.Series(np.nan, index=runs.index, dtype=object)
    threshold = (study.failure or {}).get("min_best_test_acc")
    for i, run in runs.iterrows():
        if run.status == "diverged":
            out[i] = True
        elif run.status == "complete":
            out[i] = bool(threshold is not None and not (run.best_test_acc >= threshold))
    return out


def _cell_keys(study: Study, runs: pd.DataFrame) -> list:
    return ["framework", "variant"] + [a for a in study.axes if a in runs.columns]


def _strata(study: Study, frame: pd.DataFrame) -> list:
    """The cell coordinates a comparison holds fixed: all but the answer's axis and the [scale]d fields (which
    follow a grid field, so they never vary within a stratum on their own)."""
    return [k for k in _cell_keys(study, frame) if k not in study.answer["axis"] and k not in study.scale]


def _groups(frame: pd.DataFrame, keys: list) -> list:
    """[(values tuple, group)] of frame by keys, in order of appearance; one group of everything without keys."""
    if not keys:
        return [((), frame)]
    return [(v if isinstance(v, tuple) else (v,), g) for v, g in frame.groupby(keys, sort=False, dropna=False)]


def cells(runs: pd.DataFrame, study: Study) -> pd.DataFrame:
    """One row per cell (framework x variant x grid point): statistics over seeds of each metric."""
    metrics = list(dict.fromkeys([*shown_metrics(study), "best_test_acc"]))
    keys = _cell_keys(study, runs)
    rows = []
    runs = runs.assign(failed=failed(runs, study))
    for values, group in runs.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, values))
        counts = group.status.value_counts()
        row.update(
            seeds=len(group),
            complete=int(counts.get("complete", 0)),
            diverged=int(counts.get("diverged", 0)),
            missing=int(len(group) - counts.get("complete", 0) - counts.get("diverged", 0)),
        )
        if study.failure:
            row["failed"] = int((group.failed == True).sum())  # noqa: E712 (object column: True/False/NaN)
        complete = group[group.status == "complete"]
        for metric in metrics:
            st = seed_stats(complete[metric].tolist() if metric in complete else [])
            row.update(
                {
                    metric: st["mean"],
                    f"{metric}_std": st["std"],
                    f"{metric}_ci_low": st["ci_low"],
                    f"{metric}_ci_high": st["ci_high"],
                    f"{metric}_n": st["n"],
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _statuses(frame: pd.DataFrame) -> str:
    """' (2 diverged, 1 without a result)' for the cells of frame (a cell table); '' when every run completed."""
    parts = [f"{int(frame[k].sum())} {k}" for k in ("diverged",) if k in frame and frame[k].sum()]
    parts += [f"{int(frame.missing.sum())} without a result"] if "missing" in frame and frame.missing.sum() else []
    return f" ({', '.join(parts)})" if parts else ""


def _num(value) -> str:
    return (
        f"{value:g}"
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        else str(value)
    )


def _fmt_metric(value, metric) -> str:
    return fmt(value, metric) or "n/a"


def _with_interval(row, column, metric=None) -> str:
    """row[column] with its 95% interval as [low, high] clipped to what the metric can be (a comparison's
    difference: to what a difference of it can be) and its n, formatted as `metric` (default: itself)."""
    metric = metric or column
    text = _fmt_metric(row[column], metric)
    if not pd.isna(row.get(f"{column}_ci_high")):
        bounds = difference_bounds(metric) if column == "difference" else metric_bounds(metric)
        text += " " + interval_text(row[f"{column}_ci_low"], row[f"{column}_ci_high"], metric, bounds)
    return text + (f" (n={int(row[f'{column}_n'])})" if f"{column}_n" in row else "")


# largest-stable ------------------------------------------------------------------
def stability(cell_table: pd.DataFrame, study: Study) -> pd.DataFrame:
    """Per framework x variant (x the other grid fields): the largest x at which no seed failed."""
    x = study.answer["x"]
    keys = [k for k in _cell_keys(study, cell_table) if k != x and k not in study.scale]
    rows = []
    for values, group in cell_table.groupby(keys, sort=False, dropna=False):
        group = group.sort_values(x)
        passed = group[(group.failed == 0) & (group.missing == 0)]
        failing = group[group.failed > 0]
        unknown = group[(group.failed == 0) & (group.missing > 0)]
        largest = passed[x].max() if not passed.empty else None
        note = []
        if largest is not None and not failing.empty and (failing[x] < largest).any():
            smaller = ", ".join(_num(v) for v in failing[x][failing[x] < largest])
            note.append(f"not monotone: also fails at the smaller {x} {smaller}")
        if not unknown.empty:
            note.append(f"unknown at {', '.join(_num(v) for v in unknown[x])} (runs missing)")
        rows.append(
            {
                **dict(zip(keys, values)),
                f"largest_stable_{x}": largest,
                f"smallest_failing_{x}": failing[x].min() if not failing.empty else None,
                "seeds": int(group.seeds.max()),
                "note": "; ".join(note),
            }
        )
    return pd.DataFrame(rows)


def _stability_answer(table: pd.DataFrame, study: Study) -> list:
    x = study.answer["x"]
    threshold = study.failure["min_best_test_acc"]
    sentences = []
    seeds = int(table.seeds.max())
    for variant, group in table.groupby("variant", sort=False):
        parts = []
        for _, row in group.iterrows():
            where = row.framework + "".join(
                f", {k} {_num(row[k])}"
                for k in group.columns
                if k not in ("framework", "variant", "seeds", "note") and not k.startswith(("largest_", "smallest_"))
            )
            value, failing = row[f"largest_stable_{x}"], row[f"smallest_failing_{x}"]
            if value is not None and not pd.isna(value):
                text = _num(value)
            elif failing is None or pd.isna(failing):  # nothing passed and nothing failed: no result yet
                text = "unknown, no run has a result"
            else:
                text = "none in the grid"
            parts.append(f"{text} ({where})")
        sentences.append(f"**{variant}**: largest stable {x} " + "; ".join(parts) + ".")
    base = table[table.variant == "none"]
    for variant in [v for v in dict.fromkeys(table.variant) if v != "none"]:
        for _, row in table[table.variant == variant].iterrows():
            other = base[base.framework == row.framework]
            mine, theirs = row[f"largest_stable_{x}"], (other[f"largest_stable_{x}"].iloc[0] if len(other) else None)
            if mine is not None and theirs is not None and not pd.isna(mine) and not pd.isna(theirs) and theirs:
                sentences.append(
                    f"In {row.framework}, {variant} BN tolerates a {x} {mine / theirs:g}x that "
                    f"of the network without BN."
                )
    sentences.append(
        f"A {x} is stable when none of its {seeds} seed{'s' if seeds != 1 else ''} failed: a failure is a non-finite "
        f"training loss or a best test accuracy below {threshold:g}."
    )
    notes = [f"{r.framework} {r.variant}: {r.note}" for _, r in table.iterrows() if r.note]
    if notes:
        sentences.append("Note: " + "; ".join(notes) + ".")
    return sentences


# compare ---------------------------------------------------------------------------
def comparisons(
    runs: pd.DataFrame, study: Study, against_best: bool = False, metric: str | None = None
) -> pd.DataFrame:
    """Each arm (a value of the answer's axis) against the baseline arm, or every pair of arms when
    there is no baseline, within each stratum (the other cell coordinates): the paired per-seed
    difference of the metric with its 95% t-interval. against_best: each arm against the stratum's
    best arm (the best mean of the metric) instead. metric: another than the answer's (its `also` list)."""
    metric, axis = metric or study.answer["metric"], list(study.answer["axis"])
    higher = METRICS[metric].better == "higher"
    strata = _strata(study, runs)
    done = runs[runs.status == "complete"]
    rows = []
    for svalues, stratum in _groups(done, strata):
        arms = {arm: g.set_index("seed")[metric] for arm, g in stratum.groupby(axis, sort=False, dropna=False)}
        arms = {(a if isinstance(a, tuple) else (a,)): v for a, v in arms.items()}
        baseline = study.answer.get("baseline")
        if against_best:
            means = {arm: v.mean() for arm, v in arms.items() if v.notna().any()}
            best = (max if higher else min)(means, key=means.get) if means else None
            pairs = [(arm, best) for arm in arms if arm != best] if best is not None else []
        elif baseline is not None:
            key = tuple(baseline[a] for a in axis)
            pairs = [(arm, key) for arm in arms if arm != key] if key in arms else []
        else:  # every pair, the later arm against the earlier
            pairs = [(b, a) for a, b in itertools.combinations(arms, 2)]
        for arm, base in pairs:
            shared = arms[arm].index.intersection(arms[base].index)
            both = pd.DataFrame({"arm": arms[arm][shared], "base": arms[base][shared]}).dropna()
            diffs = both.arm - both.base
            st = seed_stats(diffs.tolist())
            if st["n"] == 0:
                verdict = NO_PAIR
            elif st["n"] < 2:
                verdict = ONE_SEED
            elif st["ci_low"] > 0 or st["ci_high"] < 0:
                verdict = "higher" if st["mean"] > 0 else "lower"
            else:
                verdict = "within seed noise"
            rows.append(
                {
                    **dict(zip(strata, svalues)),
                    "arm": _arm(axis, arm),
                    "baseline": _arm(axis, base),
                    "metric": metric,
                    "arm_mean": both.arm.mean(),
                    "baseline_mean": both.base.mean(),
                    "difference": st["mean"],
                    "difference_ci_low": st["ci_low"],
                    "difference_ci_high": st["ci_high"],
                    "paired_seeds": st["n"],
                    "verdict": verdict,
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            *strata,
            "arm",
            "baseline",
            "metric",
            "arm_mean",
            "baseline_mean",
            "difference",
            "difference_ci_low",
            "difference_ci_high",
            "paired_seeds",
            "verdict",
        ],
    )


def _best_answer(table: pd.DataFrame, runs: pd.DataFrame, study: Study) -> list:
    """Per stratum (every stratum that has runs, whatever their status): the best arm, the arms within seed
    noise of it, those told apart from it by one seed only, and those behind it beyond seed noise; or what is
    missing where a stratum has fewer than two arms with complete runs."""
    metric, axis = study.answer["metric"], list(study.answer["axis"])
    label = METRICS[metric].label
    most = "highest" if METRICS[metric].better == "higher" else "lowest"
    strata = _strata(study, runs)
    sentences = []
    for values, stratum in _groups(runs, strata):
        where = _arm(strata, values) or "all runs"
        mine = table
        for key, value in zip(strata, values):
            if not mine.empty:
                mine = mine[mine[key].isna() if pd.isna(value) else mine[key] == value]
        done = stratum[(stratum.status == "complete") & stratum[metric].notna()]
        ran = sorted({_arm(axis, v) for v in done[axis].itertuples(index=False)})
        if mine.empty or len(ran) < 2:
            sentences.append(
                f"{where}: "
                + (
                    f"only {ran[0]} has complete runs, so there is no other arm to rank it against."
                    if ran
                    else "no arm has a complete run: no best arm."
                )
            )
            continue

        def arms(*verdicts):
            return ", ".join(mine[mine.verdict.isin(verdicts)].arm) or "none"

        one = arms(ONE_SEED, NO_PAIR)
        sentences.append(
            f"{where}: the {most} {label} is {mine.baseline.iloc[0]}'s "
            f"({_fmt_metric(mine.baseline_mean.iloc[0], metric)}); within seed noise of it: "
            f"{arms('within seed noise')}; "
            + (f"not told apart from it (one paired seed): {one}; " if one != "none" else "")
            + f"behind it beyond seed noise: {arms('higher', 'lower')}."
        )
    return sentences


def _arm(axis, values) -> str:
    return ", ".join(f"{a}={_num(v)}" if a not in ("framework", "variant") else str(v) for a, v in zip(axis, values))


def _compare_answer(table: pd.DataFrame, cell_table: pd.DataFrame, study: Study, metric: str | None = None) -> list:
    metric = metric or study.answer["metric"]
    label, better = METRICS[metric].label, METRICS[metric].better
    sentences = []
    if "framework" in study.answer["axis"]:  # each framework's figure first, then the pairs
        for variant, group in cell_table.groupby("variant", sort=False):
            sentences.append(
                f"{variant}: mean {label} "
                + "; ".join(f"{row.framework} {_with_interval(row, metric)}" for _, row in group.iterrows())
                + "."
            )
    if table.empty:
        ran = cell_table[cell_table.complete > 0]
        arms = sorted(
            {_arm(study.answer["axis"], values) for values in ran[list(study.answer["axis"])].itertuples(index=False)}
        )
        if metric != study.answer["metric"]:  # a further metric (`also`): the answer's metric said what is missing
            return sentences
        return sentences + [
            f"Only {', '.join(arms)} ran with complete runs: nothing to compare."
            if arms
            else f"No run completed{_statuses(cell_table)}: nothing to compare."
        ]
    beyond = table[table.verdict.isin(["higher", "lower"])]
    measured = table[table.paired_seeds >= 2]
    pairs = []
    for _, row in table.iterrows():
        strata = list(table.columns[: list(table.columns).index("arm")])
        stratum = ", ".join(_num(row[k]) for k in strata)
        low, high = clipped(row.difference_ci_low, row.difference_ci_high, difference_bounds(metric))
        interval = "" if pd.isna(low) else f", 95% CI {low:+.4f} to {high:+.4f}"
        verdict = {"higher": "higher beyond seed noise", "lower": "lower beyond seed noise"}.get(
            row.verdict, row.verdict
        )
        which = f"{row.arm} vs {row.baseline}{' (' + stratum + ')' if stratum else ''}: {label} "
        if row.paired_seeds == 0:
            pairs.append(which + "not compared: their complete runs share no seed.")
            continue
        seeds = f"{int(row.paired_seeds)} paired seed{'s' if row.paired_seeds != 1 else ''}"
        pairs.append(
            which + f"{_fmt_metric(row.arm_mean, metric)} vs {_fmt_metric(row.baseline_mean, metric)}, "
            f"difference {row.difference:+.4f} ({seeds}{interval}): {verdict}."
        )
    if (table.paired_seeds == 0).all():
        lead = (
            f"No arm has complete runs that share a seed with the arm it is compared with: nothing to "
            f"compare{' for ' + label if metric != study.answer['metric'] else ''}."
        )
    elif measured.empty:
        lead = "With one paired seed no difference can be told from seed noise."
    else:
        of = f" of {label}" if metric != study.answer["metric"] else ""  # a further metric (`also`) says which
        lead = (
            f"{len(beyond)} of {len(measured)} comparisons{of} differ beyond seed noise ({better} is better)."
            if len(measured) > 1
            else ""
        )
        if "framework" in study.answer["axis"]:
            lead += " " + _intervals_overlap(cell_table, metric)
    return ([lead.strip()] if lead.strip() else []) + sentences + pairs


def _intervals_overlap(cell_table: pd.DataFrame, metric: str) -> str:
    apart = []
    for variant, group in cell_table.groupby("variant", sort=False):
        for (_, a), (_, b) in itertools.combinations(group.iterrows(), 2):
            if a[f"{metric}_ci_high"] < b[f"{metric}_ci_low"] or b[f"{metric}_ci_high"] < a[f"{metric}_ci_low"]:
                apart.append(f"{a.framework} and {b.framework} ({variant})")
    if cell_table[f"{metric}_ci_high"].isna().all():
        return "With one seed per framework no interval is measured."
    return (
        "The 95% intervals of " + "; ".join(apart) + " do not overlap."
        if apart
        else "Every two frameworks' 95% intervals overlap."
    )


# trend ---------------------------------------------------------------------------------
def _trend_answer(cell_table: pd.DataFrame, study: Study) -> list:
    x, metric = study.answer["x"], study.answer["metric"]
    label = METRICS[metric].label
    keys = [k for k in _cell_keys(study, cell_table) if k != x and k not in study.scale]
    sentences = []
    for values, everything in _groups(cell_table, keys):
        group = everything.dropna(subset=[metric]).sort_values(x)
        who = ", ".join(_num(v) for v in values)
        if len(group) < 2:
            sentences.append(
                f"{who}: fewer than two {x} values with complete runs"
                f"{_statuses(cell_table.loc[everything.index])}: no trend to tell."
            )
            continue
        means = group[metric].to_numpy()
        steps = np.sign(np.diff(means))
        lo, hi = group.loc[group[metric].idxmin()], group.loc[group[metric].idxmax()]
        if (steps > 0).all():
            shape = f"rises with {x}"
        elif (steps < 0).all():
            shape = f"falls as {x} grows"
        else:
            shape = f"is not monotone in {x}"
        if metric.endswith("_gain"):  # a per-seed paired difference: say where its interval leaves 0
            sentences.append(_against_zero(group, x, metric, who, label))
        apart = lo[f"{metric}_ci_high"] < hi[f"{metric}_ci_low"]
        sentences.append(
            f"{who}: {label} {shape}: lowest {_with_interval(lo, metric)} at {x} {_num(lo[x])}, "
            f"highest {_with_interval(hi, metric)} at {x} {_num(hi[x])}"
            + (
                "; the two intervals do not overlap."
                if apart
                else "; their intervals overlap, so the extremes are not told apart from seed noise."
                if not pd.isna(lo[f"{metric}_ci_high"])
                else "; one seed: no interval."
            )
        )
    return sentences


def _against_zero(group: pd.DataFrame, x: str, metric: str, who: str, label: str) -> str:
    """Where a paired difference (each seed's run against itself, e.g. population minus EMA accuracy)
    is beyond seed noise: its 95% interval over seeds excludes 0."""
    verdicts = {"above 0": [], "below 0": [], "within seed noise": [], "one seed: no interval": []}
    for _, row in group.iterrows():
        low, high = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
        key = (
            "one seed: no interval"
            if pd.isna(high)
            else "above 0"
            if low > 0
            else "below 0"
            if high < 0
            else "within seed noise"
        )
        verdicts[key].append(f"{x} {_num(row[x])} ({_with_interval(row, metric)})")
    parts = [f"{k} at {', '.join(v)}" for k, v in verdicts.items() if v]
    return f"{who}: {label} (per seed, the same run): " + "; ".join(parts) + "."


# the report ------------------------------------------------------------------------------
def analyse(runs: pd.DataFrame, study: Study) -> tuple:
    """(answer sentences, {table name: frame}) for the study's answer kind."""
    if runs.empty:  # no record of any run (a study stopped before it planned one)
        return ["No run was recorded: nothing to answer."], {
            "study": pd.DataFrame(columns=["framework", "variant", "seeds", "complete", "diverged", "missing"])
        }
    cell_table = cells(runs, study)
    kind = study.answer["kind"]
    extra = {}
    if kind == "largest-stable":
        extra["stability"] = stability(cell_table, study)
        answer = _stability_answer(extra["stability"], study)
    elif kind == "compare":
        extra["comparisons"] = comparisons(runs, study)
        answer = _compare_answer(extra["comparisons"], cell_table, study)
        for metric in study.answer.get("also", ()):  # the same comparisons for each further metric
            more = comparisons(runs, study, metric=metric)
            extra["comparisons"] = pd.concat([extra["comparisons"], more], ignore_index=True)
            answer += _compare_answer(more, cell_table, study, metric=metric)
        if study.answer.get("best"):
            extra["against_best"] = comparisons(runs, study, against_best=True)
            answer = _best_answer(extra["against_best"], runs, study) + answer
    else:
        answer = _trend_answer(cell_table, study)
    return answer, {"study": cell_table, **extra}


def shown_metrics(study: Study) -> list:
    """The metrics a study's tables and plots show: the answer's, each further one it compares (`also`), and
    the [plot] table's, in that order, once each."""
    return list(dict.fromkeys([study.answer["metric"], *study.answer.get("also", ()), *study.plot["metrics"]]))


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
    series_keys = [k for k in _cell_keys(study, cell_table) if k != x and k not in study.scale]
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
            label = " ".join(_num(v) for v in values)
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
            ax.set_xticks(grid, [_num(v) for v in grid])
            ax.minorticks_off()
        else:
            ax.set_xticks(np.arange(len(categories)), [_num(c) for c in categories])
        ax.set_xlabel(x)
        ax.set_ylabel(METRICS[metric].label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study.name}: mean over seeds, 95% t-interval; x = a seed failed or diverged", fontsize=9)
    fig.tight_layout()
    return fig


def _evidence_columns(cell_table: pd.DataFrame, study: Study) -> list:
    metrics = shown_metrics(study)
    counts = ["seeds", "complete", "diverged", "missing"] + (["failed"] if study.failure else [])
    return _cell_keys(study, cell_table) + metrics + counts


def render(
    study: Study,
    answer: list,
    frames: dict,
    env: dict,
    plots: list,
    written: list,
    unfinished: pd.DataFrame,
    problems: list,
) -> str:
    cell_table = frames["study"]
    n_seeds = int(cell_table.seeds.max()) if not cell_table.empty else 0
    parts = [f"# Study: {study.name}\n", f"**Question.** {study.question}\n"]
    if study.about:
        parts.append(study.about + "\n")
    parts += ["## Answer (measured)\n"] + [f"- {s}" for s in answer] + [""]
    if env.get("interrupted"):
        parts.append(
            f"**This study was interrupted ({env.get('signal')}).** Start it again with the same "
            f"`--run-id` to run the cells that have no result; the answer above uses what was measured.\n"
        )
    if cell_table.empty or cell_table.complete.sum() == 0:
        parts.append(
            "**No run has a complete result**, so the answer above has nothing to rest on"
            + (
                f" ({int(cell_table.diverged.sum())} diverged)"
                if not cell_table.empty and cell_table.diverged.sum()
                else ""
            )
            + "; the tables below say what each cell is missing.\n"
        )
    elif n_seeds <= 1:
        parts.append(
            "**Every cell rests on one seed**: no spread between seeds is measured, so no interval "
            "is given and no difference can be told from seed noise; `--seeds 0,1,2` gives one.\n"
        )
    grid = (
        "; ".join(
            f"{k} = {', '.join(_num(v) for v in dict.fromkeys(cell_table[k]))}" for k in study.axes if k in cell_table
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
    parts += [
        "## How it was measured\n",
        *commands,
        f"- grid: {grid}; variants: {', '.join(dict.fromkeys(cell_table.variant)) if not cell_table.empty else ''}; "
        f"frameworks: {', '.join(dict.fromkeys(cell_table.framework)) if not cell_table.empty else ''}; "
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
    parts.append("")
    if problems:
        parts += ["## Problems reading this study\n"] + [f"- {p}" for p in problems] + [""]
    parts += [
        "## Evidence\n",
        "Per cell, over seeds (complete runs).\n",
        _table(cell_table, _evidence_columns(cell_table, study)),
        two_seed_note(cell_table, "cell"),
    ]
    for name in ("stability", "comparisons", "against_best"):
        if name in frames:
            shown = [c for c in frames[name].columns if not c.startswith("difference_ci")]  # shown as [low, high]
            parts += [f"### {name.replace('_', ' ').capitalize()}\n", _table(frames[name], shown)]
    if not unfinished.empty:
        parts += [
            "## Runs without a complete result\n",
            "`diverged` is a result (counted above); the others are missing and are run again when the "
            "study is started again with the same `--run-id`.\n",
            markdown_table(
                unfinished,
                [
                    c
                    for c in ["framework", "variant", "seed", *study.axes, "status", "epochs_done", "detail"]
                    if c in unfinished
                ],
            ),
        ]
    retried = frames.get("runs_retried")
    if retried is not None and not retried.empty:
        parts += [
            "## Runs tried again\n",
            "Their worker or node was lost; the executor ran them again elsewhere (the tables hold the last "
            "attempt).\n",
            markdown_table(
                retried,
                [c for c in ["framework", "variant", "seed", *study.axes, "attempts", "status"] if c in retried],
            ),
        ]
    if plots:
        parts += ["## Plots\n"] + [f"![{p}]({p})\n" for p in plots]
    parts += ["## Files\n", ", ".join(f"`{w}`" for w in written) + "\n"]
    return "\n".join(parts)


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
            shown[c] = [_with_interval(row, c, m) for (_, row), m in zip(rows, metrics)]
        elif frame[c].dtype.kind == "f":
            shown[c] = [
                _fmt_metric(row[c], m) if m in METRICS else ("" if pd.isna(row[c]) else _num(row[c]))
                for (_, row), m in zip(rows, metrics)
            ]
    return markdown_table(shown[[c for c in columns if c in shown]], columns)  # intervals already shown
