"""A study's runs as DataFrames: which runs failed, statistics per cell over seeds, the largest stable value
of a grid field, and paired comparisons of arms.

Statistics over seeds: mean, sample standard deviation and the 95% Student-t interval
(compare.reporting.stats) of each run's metric. Differences between two arms (compare): the per-seed
differences of runs that share a seed (the same seed gives the same initial weights and batches, so the
pairing removes what the arms share), with their own t-interval. compare.studies.answers makes the
sentences from these tables, compare.studies.render the plot and study.md.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..reporting.stats import seed_stats
from .spec import METRICS, Study, arm_label, num

DONE = ("complete", "diverged")  # a result; the other statuses mean the run is missing


ONE_SEED = "one seed: no interval"  # a comparison's verdict with one paired seed


NO_PAIR = "no paired seed"  # ... with none (the arms' complete runs share no seed)
NO_VALUE = "no value"  # ... runs share seeds but the metric has no value in them (a snapshot metric without them)


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


def cell_keys(study: Study, runs: pd.DataFrame) -> list:
    return ["framework", "variant"] + [a for a in study.axes if a in runs.columns]


def strata_of(study: Study, frame: pd.DataFrame) -> list:
    """The cell coordinates a comparison holds fixed: all but the answer's axis and the [scale]d fields (which
    follow a grid field, so they never vary within a stratum on their own)."""
    return [k for k in cell_keys(study, frame) if k not in study.answer["axis"] and k not in study.scale]


def groups(frame: pd.DataFrame, keys: list) -> list:
    """[(values tuple, group)] of frame by keys, in order of appearance; one group of everything without keys."""
    if not keys:
        return [((), frame)]
    return [(v if isinstance(v, tuple) else (v,), g) for v, g in frame.groupby(keys, sort=False, dropna=False)]


def cells(runs: pd.DataFrame, study: Study) -> pd.DataFrame:
    """One row per cell (framework x variant x grid point): statistics over seeds of each metric."""
    metrics = list(dict.fromkeys([*shown_metrics(study), "best_test_acc"]))
    keys = cell_keys(study, runs)
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


def stability(cell_table: pd.DataFrame, study: Study) -> pd.DataFrame:
    """Per framework x variant (x the other grid fields): the largest x at which no seed failed."""
    x = study.answer["x"]
    keys = [k for k in cell_keys(study, cell_table) if k != x and k not in study.scale]
    rows = []
    for values, group in cell_table.groupby(keys, sort=False, dropna=False):
        group = group.sort_values(x)
        passed = group[(group.failed == 0) & (group.missing == 0)]
        failing = group[group.failed > 0]
        unknown = group[(group.failed == 0) & (group.missing > 0)]
        largest = passed[x].max() if not passed.empty else None
        note = []
        if largest is not None and not failing.empty and (failing[x] < largest).any():
            smaller = ", ".join(num(v) for v in failing[x][failing[x] < largest])
            note.append(f"not monotone: also fails at the smaller {x} {smaller}")
        if not unknown.empty:
            note.append(f"unknown at {', '.join(num(v) for v in unknown[x])} (runs missing)")
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


def comparisons(
    runs: pd.DataFrame, study: Study, against_best: bool = False, metric: str | None = None
) -> pd.DataFrame:
    """Each arm (a value of the answer's axis) against the baseline arm, or every pair of arms when
    there is no baseline, within each stratum (the other cell coordinates): the paired per-seed
    difference of the metric with its 95% t-interval. against_best: each arm against the stratum's
    best arm (the best mean of the metric) instead. metric: another than the answer's (its `also` list)."""
    metric, axis = metric or study.answer["metric"], list(study.answer["axis"])
    higher = METRICS[metric].better == "higher"
    strata = strata_of(study, runs)
    done = runs[runs.status == "complete"]
    rows = []
    for svalues, stratum in groups(done, strata):
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
                verdict = NO_VALUE if len(shared) else NO_PAIR
            elif st["n"] < 2:
                verdict = ONE_SEED
            elif st["ci_low"] > 0 or st["ci_high"] < 0:
                verdict = "higher" if st["mean"] > 0 else "lower"
            else:
                verdict = "within seed noise"
            rows.append(
                {
                    **dict(zip(strata, svalues)),
                    "arm": arm_label(axis, arm),
                    "baseline": arm_label(axis, base),
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


def shown_metrics(study: Study) -> list:
    """The metrics a study's tables and plots show: the answer's, each further one it compares (`also`), and
    the [plot] table's, in that order, once each."""
    return list(dict.fromkeys([study.answer["metric"], *study.answer.get("also", ()), *study.plot["metrics"]]))
