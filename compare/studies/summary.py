"""A study's answer as a learner takes it away: one sentence per question, said once for the frameworks and the
strata where they agree, and one compact table (arms as rows, frameworks as columns, the mean over seeds with its
95% interval in each cell, the verdict beside).

compare.studies.answers keeps every stratum's own sentence, which study.md shows as its appendix; both are made from
the same analysis tables (compare.studies.analysis), so the two cannot disagree. study.md, the excerpts in
docs/measured and docs/answers.md all take the summary from here.

Words: a study's [answer] `names` table gives an arm or a coordinate its name ("scratch, norm_noise=True" =
"noisy BN", "activation=relu" = "ReLU"); without one, the arm's label stands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.registry import FRAMEWORKS

from ..reporting.markdown import fmt, interval_text, on_plateau, thrown_off
from .analysis import NO_PAIR, NO_VALUE, ONE_SEED, arm_label, cell_keys, groups, num, strata_of
from .spec import METRICS, Study

COUNTS = {1: "one", 2: "both", 3: "all three", 4: "all four"}
VERDICTS = {  # a comparison's verdict (analysis.comparisons) as the summary says it
    "higher": "higher beyond seed noise",
    "lower": "lower beyond seed noise",
    "within seed noise": "within seed noise",
    ONE_SEED: "not told apart (one seed)",
    NO_PAIR: "not compared (no shared seed)",
    NO_VALUE: "not compared (no value)",
}
SHORT = {  # ... and in the compact table's verdict column
    "higher": "higher",
    "lower": "lower",
    "within seed noise": "within noise",
    ONE_SEED: "one seed",
    NO_PAIR: "not compared",
    NO_VALUE: "not compared",
}


@dataclass
class Summary:
    """sentences: the answer, one per question (arm and metric), aggregated; table: the compact table, its cells
    already text; caption: one line under the table saying what a cell holds."""

    sentences: list
    table: pd.DataFrame
    caption: str

    def markdown(self) -> str:
        """The sentences as a list, then the table and its caption."""
        lines = [f"- {s}" for s in self.sentences]
        if not self.table.empty:
            columns = list(self.table.columns)
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in self.table.itertuples(index=False)]
            lines += ["", self.caption]
        return "\n".join(lines) + "\n"


def label(framework: str) -> str:
    """A framework as the reports name it (common.registry)."""
    return FRAMEWORKS[framework].label if framework in FRAMEWORKS else framework


def name(study: Study, text: str) -> str:
    """An arm's or a coordinate's name in words, where the study gives one."""
    return study.answer.get("names", {}).get(text, text)


def coordinate(study: Study, key: str, value) -> str:
    """One cell coordinate in words: its name where the study gives one ("activation=relu" -> "ReLU"), else
    "activation relu"."""
    text = f"{key}={num(value)}"
    named = name(study, text)
    return named if named != text else (str(value) if key in ("framework", "variant") else f"{key} {num(value)}")


def value_text(study: Study, key: str, value) -> str:
    """A coordinate's value as a table cell: its name where the study gives one, else the value."""
    return name(study, f"{key}={num(value)}") if f"{key}={num(value)}" in study.answer.get("names", {}) else num(value)


def frameworks_text(frameworks: list, total: int) -> str:
    """'all four frameworks', 'PyTorch and JAX', '3 of 4 frameworks' (where more than two and not all)."""
    if len(frameworks) == total and total > 1:
        return f"{COUNTS.get(total, f'all {total}')} frameworks"
    if len(frameworks) <= 2:
        return " and ".join(label(f) for f in frameworks)
    return f"{len(frameworks)} of {total} frameworks"


def span(values, metric: str) -> str:
    """The values' range as the metric prints it: one figure when they print the same."""
    shown = [fmt(v, metric) for v in sorted(v for v in values if not pd.isna(v))]
    if not shown:
        return "n/a"
    if shown[0] == shown[-1]:
        return shown[0]
    return f"{shown[0]}{' to ' if shown[0].startswith('-') else '-'}{shown[-1]}"


def mean_with_interval(row, metric: str) -> str:
    """A cell of the compact table: the mean over seeds and its 95% interval, clipped to what the metric can be."""
    value = fmt(row.get(metric), metric)
    if not value:
        return "n/a"
    high = row.get(f"{metric}_ci_high")
    return value if pd.isna(high) else f"{value} {interval_text(row[f'{metric}_ci_low'], high, metric)}"


def _by_verdict(rows: pd.DataFrame) -> list:
    """[(verdict, rows)] of comparison rows, the most frequent verdict first (ties in the verdicts' order)."""
    order = list(VERDICTS)
    found = {}
    for verdict, group in rows.groupby("verdict", sort=False):
        found[verdict] = group
    return sorted(found.items(), key=lambda item: (-item[1].framework.nunique(), order.index(item[0])))


def verdict_text(rows: pd.DataFrame, metric: str, total: int, wheres: dict | None = None, named: bool = True) -> str:
    """How the frameworks' comparisons of one arm came out: 'lower beyond seed noise in all four frameworks
    (0.3876 against 0.4457)', or the most frequent verdict first, then the others naming their frameworks. wheres:
    {row index: its stratum in words} where the rows come from several strata, whose figures are then given apart.
    named=False leaves out 'in all four frameworks' (the sentence says it once for all its clauses)."""
    parts = []
    for verdict, group in _by_verdict(rows):
        frameworks = list(dict.fromkeys(group.framework))
        text = VERDICTS.get(verdict, verdict) + (f" in {frameworks_text(frameworks, total)}" if named else "")
        if verdict not in (NO_PAIR, NO_VALUE):
            places = list(dict.fromkeys(wheres[i] for i in group.index)) if wheres else [None]
            figures = []
            for place in places:
                mine = group if place is None else group[[wheres[i] == place for i in group.index]]
                figure = f"{span(mine.arm_mean, metric)} against {span(mine.baseline_mean, metric)}"
                figures.append(figure if place is None or len(places) == 1 else f"{place}: {figure}")
            text += f" ({'; '.join(figures)})"
        parts.append(text)
    return ", ".join(parts)


def verdict_short(rows: pd.DataFrame, total: int) -> str:
    """The compact table's verdict cell: 'lower in 4 of 4', 'within noise in 3 of 4; higher: MXNet Gluon'."""
    parts = []
    for i, (verdict, group) in enumerate(_by_verdict(rows)):
        frameworks = list(dict.fromkeys(group.framework))
        if i == 0:
            parts.append(f"{SHORT.get(verdict, verdict)} in {len(frameworks)} of {total}")
        else:
            parts.append(f"{SHORT.get(verdict, verdict)}: {', '.join(label(f) for f in frameworks)}")
    return "; ".join(parts)


def shown(study: Study, frame: pd.DataFrame, keys: list) -> list:
    """The keys worth saying: those that take more than one value in frame (a study of one variant need not
    say 'scratch' in every sentence)."""
    return [k for k in keys if k in frame and frame[k].nunique(dropna=False) > 1]


def places(study: Study, keys: list, values: list) -> str:
    """Several strata in words: 'batch_size 4, 16 and 64' where one key tells them apart, else each one whole."""
    varying = [i for i, k in enumerate(keys) if len({v[i] for v in values}) > 1]
    if len(varying) == 1:
        i = varying[0]
        fixed = [coordinate(study, k, values[0][j]) for j, k in enumerate(keys) if j != i]
        named = [coordinate(study, keys[i], v[i]) for v in values]
        if all(n.startswith(f"{keys[i]} ") for n in named):  # 'batch_size 4, 16 and 64'
            named = [named[0]] + [n.removeprefix(f"{keys[i]} ") for n in named[1:]]
        listed = ", ".join(named[:-1]) + f" and {named[-1]}" if len(named) > 1 else named[0]
        return ", ".join(fixed + [listed])
    return "; ".join(", ".join(coordinate(study, k, v) for k, v in zip(keys, value)) for value in values)


def _pattern(rows: pd.DataFrame) -> tuple:
    return tuple(sorted(zip(rows.framework, rows.verdict)))


# compare ---------------------------------------------------------------------------------------------------------
def _compare_sentences(comparisons: pd.DataFrame, study: Study, runs: pd.DataFrame) -> list:
    """One sentence per arm (per arm and stratum where the strata came out differently): a clause per metric with
    its verdict against the baseline in each framework; where every clause holds in every framework, the sentence
    says so once ('noisy BN against BN, in all four frameworks: best test accuracy within seed noise (...); final
    training loss higher beyond seed noise (...).'). study.md's appendix keeps each metric's full label."""
    if comparisons.empty:
        return []
    everyone = list(dict.fromkeys(runs.framework))
    strata = shown(study, comparisons, [k for k in strata_of(study, runs) if k != "framework"])
    comparisons, merged = _merge_alike(comparisons, study, everyone, strata)
    sentences = []
    for (arm, baseline), of_arm in comparisons.groupby(["arm", "baseline"], sort=False):
        by_stratum = list(groups(of_arm, strata))
        outcomes = {
            tuple((m, _pattern(rows)) for m, rows in stratum.groupby("metric", sort=False)) for _, stratum in by_stratum
        }
        parts = (
            [("", of_arm)] if len(outcomes) <= 1 else [(where_of(study, strata, s.iloc[0]), s) for _, s in by_stratum]
        )
        for where, rows in parts:
            sentences.append(_arm_sentence(rows, study, strata if not where else [], everyone, arm, baseline, where))
    return merged + sentences


def _merge_alike(comparisons: pd.DataFrame, study: Study, everyone: list, strata: list) -> tuple:
    """(the comparisons left, sentences): arms against the same baseline whose every metric came out with one
    verdict in every framework, in each stratum, the same for all of them, said in one sentence with each arm's
    figures ('Every arm against no BN, in all four frameworks: best test accuracy higher beyond seed noise (BN
    after conv1 0.4587; BN after conv2 0.5475; BN everywhere 0.7515; no BN 0.1068).')."""
    alike = {}  # (baseline, ((metric, stratum, verdict), ...)) -> [arm]
    for (arm, baseline), rows in comparisons.groupby(["arm", "baseline"], sort=False):
        verdicts = []
        for metric, mine in rows.groupby("metric", sort=False):
            for values, stratum in groups(mine, strata):
                if stratum.verdict.nunique() != 1 or set(stratum.framework) != set(everyone):
                    break
                verdicts.append((metric, tuple(values), stratum.verdict.iloc[0]))
            else:
                continue
            break
        else:
            alike.setdefault((baseline, tuple(verdicts)), []).append(arm)
    sentences, said = [], set()
    for (baseline, verdicts), arms in alike.items():
        if len(arms) < 2:
            continue
        clauses = []
        for metric in dict.fromkeys(m for m, _, _ in verdicts):
            mine = [(values, verdict) for m, values, verdict in verdicts if m == metric]
            rows = comparisons[(comparisons.metric == metric) & (comparisons.baseline == baseline)]
            per_verdict = {}
            for values, verdict in mine:
                here = rows
                for k, v in zip(strata, values):
                    here = here[here[k] == v]
                figures = [f"{name(study, a)} {span(here[here.arm == a].arm_mean, metric)}" for a in arms]
                figures.append(f"{name(study, baseline)} {span(here[here.arm.isin(arms)].baseline_mean, metric)}")
                where = ", ".join(coordinate(study, k, v) for k, v in zip(strata, values))
                per_verdict.setdefault(verdict, []).append((f"{where}: " if where else "") + "; ".join(figures))
            clauses.append(
                f"{METRICS[metric].said} "
                + "; ".join(f"{VERDICTS.get(v, v)} ({' | '.join(f)})" for v, f in per_verdict.items())
            )
        against = set(comparisons.arm[comparisons.baseline == baseline])
        listed = (
            "Every arm"
            if set(arms) == against
            else ", ".join(name(study, a) for a in arms[:-1]) + f" and {name(study, arms[-1])}"
        )
        sentences.append(
            f"{listed} against {name(study, baseline)}, in {frameworks_text(everyone, len(everyone))}: "
            + "; ".join(clauses)
            + "."
        )
        said |= {(a, baseline) for a in arms}
    left = comparisons[[(a, b) not in said for a, b in zip(comparisons.arm, comparisons.baseline)]]
    return left, sentences


def _arm_sentence(rows, study: Study, strata: list, everyone: list, arm: str, baseline: str, where: str) -> str:
    agreed = all(
        stratum.verdict.nunique() == 1 and set(stratum.framework) == set(everyone)
        for _, by_metric in rows.groupby("metric", sort=False)
        for _, stratum in groups(by_metric, strata)
    )
    absent = [f for f in everyone if f not in set(rows.framework)]  # no metric to compare: said once, at the end
    clauses = [
        f"{METRICS[metric].said} {_metric_clause(mine, metric, study, strata, everyone, not agreed, absent)}"
        for metric, mine in rows.groupby("metric", sort=False)
    ]
    if absent:
        clauses.append(f"no complete runs to compare in {' and '.join(label(f) for f in absent)}")
    where = f" ({where})" if where else ""
    everywhere = f", in {frameworks_text(everyone, len(everyone))}" if agreed else ""
    return f"{name(study, arm)} against {name(study, baseline)}{where}{everywhere}: " + "; ".join(clauses) + "."


def _metric_clause(
    rows: pd.DataFrame, metric: str, study: Study, strata: list, everyone: list, named: bool, said_apart: list
) -> str:
    """One metric's verdicts for an arm, the strata whose frameworks came out the same said once; a framework
    with no complete run for this metric alone is named here (said_apart: those the sentence names once)."""
    merged = {}  # verdict pattern -> [(stratum values, its rows)]: strata that came out the same, said once
    for values, stratum in groups(rows, strata):
        merged.setdefault(_pattern(stratum), []).append((values, stratum))
    said = []
    for found in merged.values():
        group = pd.concat([stratum for _, stratum in found])
        if len(merged) == 1:  # every stratum came out the same: said once, each one's figures apart
            wheres = {i: where_of(study, strata, r) for i, r in group.iterrows()}
            several = len(set(wheres.values())) > 1
            said.append(verdict_text(group, metric, len(everyone), wheres if several else None, named))
        else:
            where = places(study, strata, [values for values, _ in found])
            said.append(f"{verdict_text(group, metric, len(everyone), named=named)} ({where})")
    text = ", ".join(said) if len(merged) == 1 else "; ".join(said)
    absent = [f for f in everyone if f not in set(rows.framework) and f not in said_apart]
    return text + (f"; no complete runs to compare in {' and '.join(label(f) for f in absent)}" if absent else "")


def where_of(study: Study, strata: list, row) -> str:
    """A comparison row's stratum in words."""
    return ", ".join(coordinate(study, k, row[k]) for k in strata)


def _best_sentences(against_best: pd.DataFrame, study: Study, runs: pd.DataFrame) -> list:
    """Per stratum: the best arm and the arms within seed noise of it, said once for the frameworks that agree."""
    if against_best.empty:
        return []
    metric = study.answer["metric"]
    most = "highest" if METRICS[metric].better == "higher" else "lowest"
    total = runs.framework.nunique()
    strata = shown(study, against_best, [k for k in strata_of(study, runs) if k != "framework"])
    sentences = []
    for values, stratum in groups(against_best, strata):
        where = ", ".join(coordinate(study, k, v) for k, v in zip(strata, values))
        verdicts = {}
        for framework, rows in stratum.groupby("framework", sort=False):
            close = sorted(name(study, a) for a in rows[rows.verdict == "within seed noise"].arm)
            key = (name(study, rows.baseline.iloc[0]), tuple(close))
            verdicts.setdefault(key, []).append(framework)
        said = [
            f"{best}'s in {frameworks_text(fws, total)}"
            + (f" (within seed noise of it: {', '.join(close)})" if close else " (every other arm behind it)")
            for (best, close), fws in sorted(verdicts.items(), key=lambda item: -len(item[1]))
        ]
        sentences.append(
            f"{where + ': ' if where else ''}the {most} {METRICS[metric].label} is " + "; ".join(said) + "."
        )
    return sentences


def _compare_table(cell_table: pd.DataFrame, comparisons: pd.DataFrame, study: Study, runs: pd.DataFrame):
    """Arms as rows (within each stratum, the baseline first), frameworks as columns; the verdict against the
    baseline beside."""
    metric, axis = study.answer["metric"], list(study.answer["axis"])
    frameworks = list(dict.fromkeys(cell_table.framework))
    if "framework" in axis:  # the frameworks are the arms: a row per variant (and stratum)
        keys = [k for k in cell_keys(study, cell_table) if k != "framework" and k not in study.scale]
        rows = []
        for values, group in groups(cell_table, keys):
            row = {k: value_text(study, k, v) for k, v in zip(keys, values)}
            by_framework = {r.framework: r for _, r in group.iterrows()}
            row.update({label(f): mean_with_interval(by_framework[f], metric) for f in frameworks if f in by_framework})
            rows.append(row)
        return pd.DataFrame(rows)
    strata = shown(study, cell_table, [k for k in strata_of(study, cell_table) if k != "framework"])
    main = comparisons[comparisons.metric == metric] if not comparisons.empty else comparisons
    baseline = study.answer.get("baseline")
    rows = []
    for values, group in groups(cell_table, strata):
        where = {k: value_text(study, k, v) for k, v in zip(strata, values)}
        arms = list(dict.fromkeys(arm_label(axis, a) for a in group[axis].itertuples(index=False)))
        if baseline is not None:
            first = arm_label(axis, tuple(baseline[a] for a in axis))
            arms = [first] + [a for a in arms if a != first] if first in arms else arms
        for arm in arms:
            mine = group[[arm_label(axis, a) == arm for a in group[axis].itertuples(index=False)]]
            by_framework = {r.framework: r for _, r in mine.iterrows()}
            row = {**where, "arm": name(study, arm)}
            row.update({label(f): mean_with_interval(by_framework[f], metric) for f in frameworks if f in by_framework})
            compared = main
            for k, v in zip(strata, values):
                compared = compared[compared[k] == v] if not compared.empty else compared
            compared = compared[compared.arm == arm] if not compared.empty else compared
            row["against " + name(study, compared.baseline.iloc[0]) if len(compared) else "verdict"] = (
                verdict_short(compared, len(frameworks)) if len(compared) else "baseline" if baseline else ""
            )
            rows.append(row)
    table = pd.DataFrame(rows).fillna("")
    verdicts = [c for c in table.columns if c.startswith("against ") or c == "verdict"]
    if len(verdicts) > 1:  # one verdict column, named once
        table["verdict"] = table[verdicts].apply(lambda r: next((v for v in r if v), ""), axis=1)
        table = table.drop(columns=[c for c in verdicts if c != "verdict"])
    return table


# largest-stable ----------------------------------------------------------------------------------------------------
def _stability_sentences(stability: pd.DataFrame, study: Study, runs: pd.DataFrame) -> list:
    x = study.answer["x"]
    total = runs.framework.nunique()
    keys = [
        k
        for k in stability.columns
        if k not in ("framework", "seeds", "note") and not k.startswith(("largest_", "smallest_"))
    ]
    values_of = {}
    for _, row in stability.iterrows():
        largest, failing = row[f"largest_stable_{x}"], row[f"smallest_failing_{x}"]
        text = (
            num(largest)
            if largest is not None and not pd.isna(largest)
            else ("unknown (no result)" if failing is None or pd.isna(failing) else "none in the grid")
        )
        values_of.setdefault(tuple(row[k] for k in keys), {})[row.framework] = (text, largest)
    parts = []
    for where, by_framework in values_of.items():
        same = {}
        for framework, (text, _) in by_framework.items():
            same.setdefault(text, []).append(framework)
        said = "; ".join(f"{text} in {frameworks_text(fws, total)}" for text, fws in same.items())
        parts.append(f"{', '.join(coordinate(study, k, v) for k, v in zip(keys, where))}: {said}")
    sentences = [f"The largest stable {x}: " + "; ".join(parts) + "."]
    if "variant" in keys and "none" in set(stability.variant):  # what BN does to it, where both have a value
        others = [k for k in keys if k != "variant"]
        for where, by_framework in values_of.items():
            variant = where[keys.index("variant")]
            if variant == "none":
                continue
            base = values_of.get(tuple("none" if k == "variant" else v for k, v in zip(keys, where)), {})
            moves = {}
            for framework, (_, mine) in by_framework.items():
                theirs = base.get(framework, (None, None))[1]
                if mine is None or theirs is None or pd.isna(mine) or pd.isna(theirs):
                    continue
                moves.setdefault((theirs, mine), []).append(framework)
            if not moves:
                continue
            extra = ", ".join(coordinate(study, k, v) for k, v in zip(keys, where) if k in others)
            said = "; ".join(
                f"from {num(a)} to {num(b)} ({num(b / a)}x) in {frameworks_text(fws, total)}"
                if b != a
                else f"left it at {num(a)} in {frameworks_text(fws, total)}"
                for (a, b), fws in moves.items()
            )
            sentences.append(
                f"{coordinate(study, 'variant', variant)} against {coordinate(study, 'variant', 'none')}"
                f"{' (' + extra + ')' if extra else ''}: the largest stable {x} went {said}."
            )
    return sentences


def _stability_table(stability: pd.DataFrame, study: Study) -> pd.DataFrame:
    x = study.answer["x"]
    keys = [
        k
        for k in stability.columns
        if k not in ("framework", "seeds", "note") and not k.startswith(("largest_", "smallest_"))
    ]
    rows = {}
    for _, row in stability.iterrows():
        where = tuple(row[k] for k in keys)
        largest, failing = row[f"largest_stable_{x}"], row[f"smallest_failing_{x}"]
        text = (
            num(largest)
            if largest is not None and not pd.isna(largest)
            else ("no result" if failing is None or pd.isna(failing) else "none")
        )
        rows.setdefault(where, {k: value_text(study, k, v) for k, v in zip(keys, where)})[label(row.framework)] = text
    return pd.DataFrame(list(rows.values()))


# trend ---------------------------------------------------------------------------------------------------------------
def _shape(group: pd.DataFrame, x: str, metric: str) -> str:
    means = group.sort_values(x)[metric].to_numpy()
    steps = np.sign(np.diff(means))
    if len(means) < 2:
        return "no trend (fewer than two values)"
    if (steps > 0).all():
        return f"rises with {x}"
    if (steps < 0).all():
        return f"falls as {x} grows"
    return f"is not monotone in {x}"


def _trend_sentences(cell_table: pd.DataFrame, study: Study) -> list:
    x, metric = study.answer["x"], study.answer["metric"]
    total = cell_table.framework.nunique()
    keys = shown(study, cell_table, [k for k in cell_keys(study, cell_table) if k not in ("framework", x)])
    keys = [k for k in keys if k not in study.scale]
    sentences = []
    for values, stratum in groups(cell_table, keys):
        where = ", ".join(coordinate(study, k, v) for k, v in zip(keys, values))
        shapes = {}
        for framework, group in stratum.groupby("framework", sort=False):
            done = group.dropna(subset=[metric])
            shapes.setdefault(_shape(done, x, metric), []).append((framework, done.sort_values(x)))
        said = []
        for shape, found in shapes.items():
            fws = [f for f, _ in found]
            ends = [g for _, g in found if len(g) >= 2]
            text = f"{shape} in {frameworks_text(fws, total)}"
            if ends:
                first, last = ends[0][x].iloc[0], ends[0][x].iloc[-1]
                text += (
                    f", from {span([g[metric].iloc[0] for g in ends], metric)} at {x} {num(first)} to "
                    f"{span([g[metric].iloc[-1] for g in ends], metric)} at {num(last)}"
                )
            said.append(text)
        sentence = f"{where + ': ' if where else ''}{METRICS[metric].label} " + "; ".join(said) + "."
        if metric.endswith("_gain"):  # a per-seed paired difference: where its interval leaves 0
            sentence += " " + _against_zero(stratum, x, metric, total)
        else:
            sentence += " " + _extremes_apart(stratum, metric, total)
        sentences.append(sentence)
    return sentences


def _extremes_apart(stratum: pd.DataFrame, metric: str, total: int) -> str:
    """Whether the lowest and the highest cell of each framework are told apart: their 95% intervals do not
    overlap (the trend is beyond seed noise) or do (it is not)."""
    found = {}
    for framework, group in stratum.dropna(subset=[metric]).groupby("framework", sort=False):
        if len(group) < 2:
            continue
        low, high = group.loc[group[metric].idxmin()], group.loc[group[metric].idxmax()]
        apart = bool(low[f"{metric}_ci_high"] < high[f"{metric}_ci_low"])
        found.setdefault(apart, []).append(framework)
    if not found:
        return ""
    if len(found) == 1:
        apart, fws = next(iter(found.items()))
        return (
            f"The lowest and highest cells' 95% intervals {'do not overlap' if apart else 'overlap'} in "
            f"{frameworks_text(fws, total)}: the trend is {'beyond' if apart else 'not told apart from'} seed noise."
        )
    return (
        f"The lowest and highest cells' 95% intervals do not overlap in {frameworks_text(found[True], total)} (the "
        f"trend is beyond seed noise there) and overlap in {frameworks_text(found[False], total)}."
    )


def _against_zero(stratum: pd.DataFrame, x: str, metric: str, total: int) -> str:
    found = {}
    for framework, group in stratum.groupby("framework", sort=False):
        above = [num(r[x]) for _, r in group.iterrows() if r[f"{metric}_ci_low"] > 0]
        found.setdefault(tuple(above), []).append(framework)
    said = [
        (f"above 0 beyond seed noise at {x} {', '.join(above)}" if above else "nowhere above 0 beyond seed noise")
        + f" in {frameworks_text(fws, total)}"
        for above, fws in found.items()
    ]
    return "Per seed against the same run: " + "; ".join(said) + "."


def _trend_table(cell_table: pd.DataFrame, study: Study) -> pd.DataFrame:
    metric = study.answer["metric"]
    keys = [k for k in cell_keys(study, cell_table) if k != "framework" and k not in study.scale]
    rows = {}
    for _, row in cell_table.iterrows():
        where = tuple(row[k] for k in keys)
        rows.setdefault(where, {k: value_text(study, k, v) for k, v in zip(keys, where)})[label(row.framework)] = (
            mean_with_interval(row, metric)
        )
    return pd.DataFrame(list(rows.values()))


# on the plateau --------------------------------------------------------------------------------------------------
def cell_words(study: Study, coords: dict) -> str:
    """A cell in words: its arm's name where the study names it (a compare study's axis), then the other
    coordinates ("no BN"; "Gaussian PIT in (0, 1), batch 256 (lr 1)")."""
    axis = [a for a in study.answer.get("axis", ()) if a in coords] if study.answer["kind"] == "compare" else []
    arm = arm_label(axis, [coords[a] for a in axis]) if axis else ""
    named = name(study, arm) if arm else ""
    rest = [  # a scaled field (lr with the batch size) follows its grid field, which is said already
        coordinate(study, k, v) for k, v in coords.items() if not (named != arm and k in axis) and k not in study.scale
    ]
    return ", ".join(([named] if named != arm else []) + rest)


def _plateau_sentences(runs: pd.DataFrame, study: Study) -> list:
    """The cells still on the initial plateau, and those whose loss ended above a uniform guess's, each kind in one
    sentence for the cells in the same frameworks: each cell with its mean final training loss."""
    done = runs[runs.status == "complete"].dropna(subset=["final_train_loss"])
    total = runs.framework.nunique()
    keys = shown(study, runs, ["variant", *study.axes])
    found = {}  # (kind, the frameworks) -> [the cell in words, with its losses there]
    for values, group in groups(done, keys):
        losses = group.groupby("framework", sort=False).final_train_loss.mean()
        for kind, rule in (("plateau", on_plateau), ("thrown", thrown_off)):
            where = tuple(f for f, loss in losses.items() if rule(loss))
            if where:
                cell = cell_words(study, dict(zip(keys, values))) or "Every run"
                found.setdefault((kind, where), []).append(f"{cell} ({span(losses[list(where)], 'final_train_loss')})")
    out = []
    for (kind, where), cells in sorted(found.items(), key=lambda item: item[0][0] != "plateau"):
        one = len(cells) == 1
        listed = cells[0] if one else "; ".join(cells[:-1]) + f"; and {cells[-1]}"
        frameworks = frameworks_text(list(where), total)
        if kind == "plateau":
            what = "it describes a network that is" if one else "them describes networks that are"
            out.append(
                f"At chance in {frameworks}, mean final training loss near ln 10 = 2.303 (a uniform guess's): "
                f"{listed}. {'It has' if one else 'They have'} not learned in this budget (not yet started, or "
                f"thrown back to chance), so what is measured of {what} not learning."
            )
        else:
            out.append(
                f"Thrown off in {frameworks}, mean final training loss above a uniform guess's (ln 10 = 2.303) though "
                f"finite: {listed}. {'Its steps were' if one else 'Their steps were'} too large to learn, not yet "
                "large enough to diverge."
            )
    return out


def summarise(runs: pd.DataFrame, study: Study, frames: dict) -> Summary:
    """The answer's sentences and compact table, from the analysis tables compare.studies.answers.analyse made."""
    cell_table = frames["study"]
    metric = study.answer["metric"]
    caption = (
        f"Each cell: {METRICS[metric].label}, the mean over the seeds' complete runs with its 95% t-interval "
        "[low, high]."
    )
    if runs.empty or cell_table.empty or not cell_table.complete.sum():
        return Summary(["No run completed: nothing to answer yet."], pd.DataFrame(), caption)
    kind = study.answer["kind"]
    if kind == "largest-stable":
        sentences = _stability_sentences(frames["stability"], study, runs)
        table = _stability_table(frames["stability"], study)
        failure = study.failure["min_best_test_acc"]
        caption = (
            f"Each cell: the largest {study.answer['x']} at which no seed failed (a non-finite training loss or a "
            f"best test accuracy below {failure:g}); none: every value failed."
        )
    elif kind == "compare":
        sentences = _best_sentences(frames.get("against_best", pd.DataFrame()), study, runs)
        sentences += _compare_sentences(frames["comparisons"], study, runs)
        table = _compare_table(cell_table, frames["comparisons"], study, runs)
        if "framework" not in study.answer["axis"]:
            caption += " Verdict: the paired per-seed difference against the baseline, per framework."
    else:
        sentences = _trend_sentences(cell_table, study)
        table = _trend_table(cell_table, study)
    if cell_table.seeds.max() <= 1:
        sentences.append("Every cell rests on one seed: no difference can be told from seed noise.")
    if kind != "largest-stable":  # where the limit is the answer, the cells past it fail by definition
        sentences += _plateau_sentences(runs, study)
    return Summary(sentences, table, caption)
