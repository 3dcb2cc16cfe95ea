"""A study's answer in sentences, each made from the numbers of its analysis tables (compare.studies.analysis):
per answer kind (largest-stable, compare, trend), and for every subset of runs with a result, a sentence
saying what is missing where something is."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..reporting.markdown import fmt, interval_text, on_plateau
from ..reporting.stats import clipped, difference_bounds, metric_bounds
from .analysis import (
    NO_PAIR,
    NO_VALUE,
    ONE_SEED,
    arm_label,
    cell_keys,
    cells,
    comparisons,
    groups,
    num,
    stability,
    strata_of,
)
from .spec import METRICS, Study


def _statuses(frame: pd.DataFrame) -> str:
    """' (2 diverged, 1 without a result)' for the cells of frame (a cell table); '' when every run completed."""
    parts = [f"{int(frame[k].sum())} {k}" for k in ("diverged",) if k in frame and frame[k].sum()]
    parts += [f"{int(frame.missing.sum())} without a result"] if "missing" in frame and frame.missing.sum() else []
    return f" ({', '.join(parts)})" if parts else ""


def fmt_metric(value, metric) -> str:
    return fmt(value, metric) or "n/a"


def with_interval(row, column, metric=None) -> str:
    """row[column] with its 95% interval as [low, high] clipped to what the metric can be (a comparison's
    difference: to what a difference of it can be) and its n, formatted as `metric` (default: itself)."""
    metric = metric or column
    text = fmt_metric(row[column], metric)
    if not pd.isna(row.get(f"{column}_ci_high")):
        bounds = difference_bounds(metric) if column == "difference" else metric_bounds(metric)
        text += " " + interval_text(row[f"{column}_ci_low"], row[f"{column}_ci_high"], metric, bounds)
    return text + (f" (n={int(row[f'{column}_n'])})" if f"{column}_n" in row else "")


# largest-stable ------------------------------------------------------------------
def _stability_answer(table: pd.DataFrame, study: Study) -> list:
    x = study.answer["x"]
    threshold = study.failure["min_best_test_acc"]
    sentences = []
    seeds = int(table.seeds.max())
    for variant, group in table.groupby("variant", sort=False):
        parts = []
        for _, row in group.iterrows():
            where = row.framework + "".join(
                f", {k} {num(row[k])}"
                for k in group.columns
                if k not in ("framework", "variant", "seeds", "note") and not k.startswith(("largest_", "smallest_"))
            )
            value, failing = row[f"largest_stable_{x}"], row[f"smallest_failing_{x}"]
            if value is not None and not pd.isna(value):
                text = num(value)
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
def _best_answer(table: pd.DataFrame, runs: pd.DataFrame, study: Study) -> list:
    """Per stratum (every stratum that has runs, whatever their status): the best arm, the arms within seed
    noise of it, those told apart from it by one seed only, and those behind it beyond seed noise; or what is
    missing where a stratum has fewer than two arms with complete runs."""
    metric, axis = study.answer["metric"], list(study.answer["axis"])
    label = METRICS[metric].label
    most = "highest" if METRICS[metric].better == "higher" else "lowest"
    strata = strata_of(study, runs)
    sentences = []
    for values, stratum in groups(runs, strata):
        where = arm_label(strata, values) or "all runs"
        mine = table
        for key, value in zip(strata, values):
            if not mine.empty:
                mine = mine[mine[key].isna() if pd.isna(value) else mine[key] == value]
        done = stratum[(stratum.status == "complete") & stratum[metric].notna()]
        ran = sorted({arm_label(axis, v) for v in done[axis].itertuples(index=False)})
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
            f"({fmt_metric(mine.baseline_mean.iloc[0], metric)}); within seed noise of it: "
            f"{arms('within seed noise')}; "
            + (f"not told apart from it (one paired seed): {one}; " if one != "none" else "")
            + f"behind it beyond seed noise: {arms('higher', 'lower')}."
        )
    return sentences


def _compare_answer(table: pd.DataFrame, cell_table: pd.DataFrame, study: Study, metric: str | None = None) -> list:
    metric = metric or study.answer["metric"]
    label, better = METRICS[metric].label, METRICS[metric].better
    sentences = []
    if "framework" in study.answer["axis"]:  # each framework's figure first, then the pairs
        for variant, group in cell_table.groupby("variant", sort=False):
            sentences.append(
                f"{variant}: mean {label} "
                + "; ".join(f"{row.framework} {with_interval(row, metric)}" for _, row in group.iterrows())
                + "."
            )
    if table.empty:
        ran = cell_table[cell_table.complete > 0]
        arms = sorted(
            {
                arm_label(study.answer["axis"], values)
                for values in ran[list(study.answer["axis"])].itertuples(index=False)
            }
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
        stratum = ", ".join(num(row[k]) for k in strata)
        low, high = clipped(row.difference_ci_low, row.difference_ci_high, difference_bounds(metric))
        interval = "" if pd.isna(low) else f", 95% CI {low:+.4f} to {high:+.4f}"
        verdict = {"higher": "higher beyond seed noise", "lower": "lower beyond seed noise"}.get(
            row.verdict, row.verdict
        )
        which = f"{row.arm} vs {row.baseline}{' (' + stratum + ')' if stratum else ''}: {label} "
        if row.verdict == NO_VALUE:
            pairs.append(which + "not compared: the complete runs that share a seed have no value of it.")
            continue
        if row.paired_seeds == 0:
            pairs.append(which + "not compared: their complete runs share no seed.")
            continue
        seeds = f"{int(row.paired_seeds)} paired seed{'s' if row.paired_seeds != 1 else ''}"
        pairs.append(
            which + f"{fmt_metric(row.arm_mean, metric)} vs {fmt_metric(row.baseline_mean, metric)}, "
            f"difference {row.difference:+.4f} ({seeds}{interval}): {verdict}."
        )
    if (table.verdict == NO_VALUE).all():
        lead = f"The complete runs that share a seed have no value of {label}: nothing to compare."
    elif (table.paired_seeds == 0).all():
        lead = (
            f"No arm has complete runs that share a seed with the arm it is compared with: nothing to "
            f"compare{' for ' + label if metric != study.answer['metric'] else ''}."
        )
    elif measured.empty:
        lead = "With one paired seed no difference can be told from seed noise."
    else:
        of = f" of {label}" if metric != study.answer["metric"] else ""  # a further metric (`also`) says which
        lead = (
            f"{len(beyond)} of {len(measured)} comparisons{of} differ beyond seed noise"
            + (f" ({better} is better)." if better else ".")
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
    keys = [k for k in cell_keys(study, cell_table) if k != x and k not in study.scale]
    sentences = []
    for values, everything in groups(cell_table, keys):
        group = everything.dropna(subset=[metric]).sort_values(x)
        who = ", ".join(num(v) for v in values)
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
            f"{who}: {label} {shape}: lowest {with_interval(lo, metric)} at {x} {num(lo[x])}, "
            f"highest {with_interval(hi, metric)} at {x} {num(hi[x])}"
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
        verdicts[key].append(f"{x} {num(row[x])} ({with_interval(row, metric)})")
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
    return answer + _plateau_sentences(runs, study), {"study": cell_table, **extra}


def _plateau_sentences(runs: pd.DataFrame, study: Study) -> list:
    """A sentence per cell whose complete runs are, on average, still on the initial plateau (training loss
    within 10% of ln 10): what is measured of it describes a network that has not started learning."""
    done = runs[runs.status == "complete"].dropna(subset=["final_train_loss"])
    keys = ["framework", "variant", *[a for a in study.axes if a in done]]
    out = []
    for values, group in done.groupby(keys, sort=False):
        loss = group.final_train_loss.mean()
        if on_plateau(loss):
            cell = ", ".join(f"{k} {num(v)}" if k in study.axes else str(v) for k, v in zip(keys, values))
            out.append(
                f"{cell}: still on its initial plateau (mean final training loss {loss:.3f}, ln 10 = 2.303): it has "
                f"not started learning, so its comparisons describe a network that is not moving."
            )
    return out
