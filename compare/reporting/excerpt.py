"""Measured figures that the guides quote, generated from committed records, so that prose cannot drift.

docs/measured/NAME/ holds what one run, study or benchmark wrote that its figures come from: records.jsonl and
environment.json, for a study also its study.toml and study.json (the snapshots are left out: no quoted figure
needs them), for a benchmark its bench.json (each cell's per-repeat figures). excerpt.md beside them is
generated from them (a run's: a table and ranges; a study's: its measured answer and evidence table, as
study.md gives them; a benchmark's: its table and ratio ranges, computed again from the repeats):

    .tox/run/bin/python -m compare.reporting.excerpt docs/measured/NAME

A guide quotes from it inside `<!-- measured: NAME -->` ... `<!-- /measured -->`, and tests/test_docs.py
fails when excerpt.md is not what its records give, or when a number in such a passage is not in excerpt.md.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..studies import answers, render, spec, summary
from . import benchmark, layer, ports
from .files import atomic
from .markdown import fmt
from .stats import paired_ratio
from .tables import load


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _span(values: list, digits: int, unit: str = "") -> str:
    low, high = (f"{v:.{digits}f}" for v in (min(values), max(values)))
    return f"{low}{unit}" if low == high else f"{low}{' to ' if min(values) < 0 else '-'}{high}{unit}"


def _cost_and_steadiness(epochs) -> list:
    """Sentences on what population statistics cost (seconds per epoch, against training's) and how much steadier
    test accuracy is with them over the second half of the epochs, from the epoch records."""
    runs = epochs.dropna(subset=["pop_test_acc"]).groupby(["framework", "variant", "seed"])
    if not len(runs):
        return []
    seconds, shares, ema_jumps, pop_jumps = [], [], [], []
    for _, run in runs:
        run = run.sort_values("epoch")
        seconds.append(run.population_seconds.median())
        shares.append(100 * run.population_seconds.median() / run.train_seconds.median())
        late = run[run.epoch > run.epoch.max() // 2]
        ema_jumps.append(100 * late.test_acc.diff().abs().max())
        pop_jumps.append(100 * late.pop_test_acc.diff().abs().max())
    first, last = int(epochs.epoch.max()) // 2 + 1, int(epochs.epoch.max())
    cost = (
        f"Computing them took {_span(seconds, 1, ' s')} per epoch (the median of each run), "
        f"{_span(shares, 0, '%')} of an epoch's training time."
    )
    if last - first < 1:  # one late epoch: nothing moves between consecutive ones
        return ["", cost]
    return [
        "",
        f"{cost} Over epochs {first}-{last}, test accuracy with the running average moves by up to "
        f"{_span(ema_jumps, 1)} points between consecutive epochs, with population statistics by up to "
        f"{_span(pop_jumps, 1)}.",
    ]


def _measured_with(env: dict, entry: str) -> str:
    """ "Measured with `COMMAND` on CPU (N cores)", the command as tox runs it and without its --out folder
    (where the measurement was written, not what it measured)."""
    command = env.get("command", "?").replace(f"python -m compare.{entry}", f"tox -e {entry} --")
    command = re.sub(r" --out \S+", "", command)
    return f"Measured with `{command}` on {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores)"


def _mixed_against_float32(t: dict) -> list:
    """For a run with mixed-precision runs: each one's final epoch beside its float32 twin (accuracy, train/eval
    disagreement, training throughput), from the records alone (the snapshot distances need the snapshots,
    which measured folders leave out)."""
    mixed = t.get("mixed_precision")
    if mixed is None or mixed.empty:
        return []
    last = mixed[mixed.epoch == mixed.groupby(["framework", "config_id"]).epoch.transform("max")]
    lines = [
        "",
        "Mixed precision against float32, the same seed, weights and batches (final epoch):",
        "",
        "| framework | variant | precision | test acc, mixed vs float32 | train/eval disagreement, mixed vs float32 | "
        "training throughput, mixed / float32 |",
        "|---|---|---|---|---|---|",
    ]
    runs = t["runs"]
    speed = dict(zip(zip(runs.framework, runs.config_id), runs.train_examples_per_s))  # median over epochs
    ratios = {}
    for _, r in last.iterrows():
        ratio = speed[(r.framework, r.config_id)] / speed[(r.framework, r.float32_config_id)]
        ratios.setdefault(r.framework, []).append(ratio)
        lines.append(
            f"| {r.framework} | {r.variant} | {r.precision} | {r.test_acc_mixed:.3f} vs {r.test_acc_float32:.3f} | "
            f"{_percent(r.probe_disagreement_mixed)} vs {_percent(r.probe_disagreement_float32)} | {ratio:.2f} |"
        )
    speeds = ", ".join(f"{fw} {_span(values, 2, 'x')}" for fw, values in ratios.items())
    return lines + [
        "",
        f"Training throughput (each run's median over epochs) in mixed precision over float32's: {speeds}.",
    ]


def bench_excerpt(folder: Path) -> str:
    """excerpt.md of a measured benchmark folder (its bench.json): each cell's row computed again from the
    per-repeat figures the benchmark measured, and the ranges the guides quote."""
    data = json.loads((folder / "bench.json").read_text())
    rows = pd.DataFrame([benchmark.row(result) for result in data["measured"]])  # the benchmark's own arithmetic
    # what pairs two cells repeat by repeat: the suite's figures, and whether the cells took turns in each repeat
    rows["suite_all"] = [result["suite_all"] for result in data["measured"]]
    rows["interleaved"] = [result.get("interleaved", False) for result in data["measured"]]
    lines = [
        f"{_measured_with(data['machine'], 'bench')}; suite/bare and suite/textbook are medians of the repeats' "
        f"own ratios, with their 95% intervals:",
        "",
        "| framework | variant | execution | batch | suite examples/s | suite/bare | suite/textbook |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in rows.iterrows():
        lines.append(
            f"| {r.framework} | {_variant(r)} | {r.execution_name or r.execution} | {r.batch_size} | "
            f"{r.suite_examples_per_s:,.0f} | {benchmark.ratio_text(r, 'bare')} | "
            f"{benchmark.ratio_text(r, 'textbook')} |"
        )
    lows, highs = rows.suite_over_bare_low.dropna(), rows.suite_over_bare_high.dropna()
    within = f", every interval within {lows.min():.3f}-{highs.max():.3f}" if len(lows) else ""
    textbook = "; ".join(
        f"{fw} {_span(list(g.suite_over_textbook), 2)}" for fw, g in rows.groupby("framework", sort=False)
    )
    lines += [
        "",
        f"suite/bare {_span(list(rows.suite_over_bare), 3)}{_in_all(rows)}{within}; suite/textbook: {textbook}.",
    ]
    return "\n".join(lines + _execution_modes(rows) + _norm_share(rows) + _of_peak(rows) + _population(rows)) + "\n"


def _variant(r) -> str:
    """A bench row's variant, with its normalisation where it is not BN (--norms)."""
    norm = getattr(r, "norm", "batch")
    return r.variant if norm == "batch" or r.variant == "none" else f"{r.variant}, --norm {norm}"


def _of_peak(rows: pd.DataFrame) -> list:
    """For a benchmark that measured the peak: each cell's arithmetic rate against its framework's matrix product."""
    rows = rows[rows.peak_gflops_per_s.notna()]
    if rows.empty:
        return []
    lines = [
        "",
        "Against the machine's limit (GFLOP/s: suite examples/s x a training step's FLOPs per image, common.flops, "
        "which counts the convolutions and dense layers only, so a --norm whiten row's own matrix products are left "
        "out and its fraction understates the work; peak: the framework's own 2048 x 2048 matrix product, measured "
        "by the same worker):",
        "",
        "| framework | variant | execution | image | batch | suite examples/s | training s per 60,000 images | "
        "GFLOP/s | peak GFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.itertuples():
        lines.append(
            f"| {r.framework} | {_variant(r)} | {r.execution_name or r.execution} | {r.image_size}x{r.image_size} | "
            f"{r.batch_size} | {r.suite_examples_per_s:,.0f} | {60000 / r.suite_examples_per_s:,.0f} | "
            f"{r.suite_gflops_per_s:,.2f} | {r.peak_gflops_per_s:,.1f} | {_percent(r.suite_of_peak)} |"
        )
    spans = "; ".join(
        f"{fw} {_span([100 * f for f in g.suite_of_peak], 1, '%')} of {g.peak_gflops_per_s.iloc[0]:,.1f}"
        for fw, g in rows.groupby("framework", sort=False)
    )
    return lines + ["", f"Fraction of peak per framework: {spans}."]


def _in_all(rows) -> str:
    return f" in all {len(rows)} cells" if len(rows) > 1 else " in its one cell"


def _population(rows: pd.DataFrame) -> list:
    """For a benchmark with --population-size: the population pass against an epoch without it."""
    rows = rows[rows.population_share.notna()]
    if rows.empty:
        return []
    lines = [
        "",
        f"The population pass (--population-size {rows.population_size.iloc[0]}; each two-epoch run's second "
        "epoch: the pass's seconds against that epoch's training and test evaluation, the median of the repeats' "
        "own ratios with its 95% interval; the first epoch's pass, compilation included, apart; and the second "
        "epoch's training examples/s against the suite's without the pass):",
        "",
        "| framework | variant | execution | epoch s | population s | share of the epoch | first epoch's s | "
        "training with it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in rows.iterrows():
        low, high = r.population_share_low, r.population_share_high
        interval = "" if pd.isna(low) else f" [{_percent(low)}, {_percent(high)}]"
        lines.append(
            f"| {r.framework} | {r.variant} | {r.execution_name or r.execution} | {r.epoch_seconds:.2f} | "
            f"{r.population_seconds:.2f} | {_percent(r.population_share)}{interval} | "
            f"{r.population_first_seconds:.2f} | {benchmark.ratio_text(r, 'suite', 'population_over_')} |"
        )
    top = rows.loc[rows.population_share.idxmax()]
    return lines + [
        "",
        f"Share of an epoch: {_span([100 * f for f in rows.population_share], 1, '%')}{_in_all(rows)}, "
        f"the largest {top.framework} {top.variant}.",
    ]


def _mode(r) -> str:
    return f"{r.execution_name or r.execution} (`{r.execution}`)"


def _execution_modes(rows: pd.DataFrame) -> list:
    """For a benchmark of several execution modes: each mode's suite examples/s against the same variant's eager
    cell and its first step (the compilation); then, for any benchmark, the scratch layer against the built-in
    per mode. The table's ratios are of two cells' medians; in records from before compare.bench interleaved
    its cells, those cells ran one after the other."""
    if rows.groupby(["framework", "variant"]).execution.nunique().max() < 2:
        return _scratch_over_builtin(rows)
    lines = [
        "",
        "Execution modes (ratios of two cells' medians"
        + ("):" if rows.interleaved.all() else ": the cells ran one after the other, not alternating):"),
        "",
        "| framework | variant | execution | suite examples/s | against eager | first step, first repeat | "
        "first step, later repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    speed = {(r.framework, r.variant, r.execution): r.suite_examples_per_s for r in rows.itertuples()}

    for r in rows.itertuples():
        eager = speed.get((r.framework, r.variant, "eager"))
        later = "n/a" if r.first_step_seconds_later is None else f"{r.first_step_seconds_later:.2f} s"
        lines.append(
            f"| {r.framework} | {r.variant} | {_mode(r)} | {r.suite_examples_per_s:,.0f} | "
            f"{'n/a' if eager is None else f'{r.suite_examples_per_s / eager:.2f}x'} | "
            f"{r.first_step_seconds:.2f} s | {later} |"
        )
    return lines + _scratch_over_builtin(rows)


def _scratch_over_builtin(rows: pd.DataFrame) -> list:
    """The scratch layer's suite examples/s over the built-in's, per framework and mode. Where the two cells took
    turns within each repeat (compare.bench since it interleaves them): the median of the repeats' own ratios,
    with its 95% interval from 6 repeats; in older records, whose cells ran one after the other, the ratio of
    the two cells' medians (the machine's drift between them is in it)."""
    cells = {(r.framework, r.variant, r.execution): r for r in rows.itertuples()}

    def ratio(r, builtin) -> str:
        if not (r.interleaved and builtin.interleaved):
            return f"{r.suite_examples_per_s / builtin.suite_examples_per_s:.2f}x"
        paired = paired_ratio(r.suite_all, builtin.suite_all)
        interval = "" if np.isnan(paired["_low"]) else f" [{paired['_low']:.2f}, {paired['_high']:.2f}]"
        return f"{paired['']:.2f}x{interval}"

    def form(variant):  # a scratch layer with its backward written out is named so (compare.bench --norm-backward)
        return "" if variant == "scratch" else ", " + variant.split(", ", 1)[1]

    pairs = [
        (f"{r.framework} {_mode(r)}{form(r.variant)} {ratio(r, cells[key])}", r.interleaved and cells[key].interleaved)
        for r in rows.itertuples()
        if r.variant.startswith("scratch") and (key := (r.framework, "builtin", r.execution)) in cells
    ]
    if not pairs:
        return []
    if all(paired for _, paired in pairs):
        how = (
            "Each is the median of the repeats' own ratios (the cells took turns within each repeat), with its 95% "
            "interval where there were 6 repeats or more."
        )
    else:
        how = (
            "Each is a ratio of two cells' medians, the cells measured one after the other, so the machine's drift "
            "between them is in it."
        )
    return [
        "",
        "The scratch layer's suite examples/s over the built-in's, per mode: "
        + "; ".join(p for p, _ in pairs)
        + ". "
        + how,
    ]


def _norm_share(rows: pd.DataFrame) -> list:
    """Where a benchmark has the `none` variant (the network without normalisation) beside a variant in the same
    mode, and the cells took turns within each repeat: the normalisation's share of the variant's training step,
    1 - (none's step time / the variant's) = 1 - (the variant's examples/s / none's), repeat by repeat; the median
    with its 95% interval where there were 6 repeats or more. Negative: the variant's step was the faster."""
    nones = {(r.framework, r.execution, r.batch_size): r for r in rows.itertuples() if r.variant == "none"}
    shares = []
    for r in rows.itertuples():
        none = nones.get((r.framework, r.execution, r.batch_size))
        if r.variant == "none" or none is None or not (r.interleaved and none.interleaved):
            continue
        paired = paired_ratio(r.suite_all, none.suite_all)
        interval = "" if np.isnan(paired["_low"]) else f" [{1 - paired['_high']:.0%}, {1 - paired['_low']:.0%}]"
        shares.append(f"{r.framework} {_mode(r)} {_variant(r)} {1 - paired['']:.0%}{interval}")
    if not shares:
        return []
    return [
        "",
        "The normalisation's share of the training step, 1 - (the step time without normalisation, the `none` "
        "cell of the same mode / the cell's), the median of the repeats' own figures with its 95% interval where "
        "there were 6 repeats or more: " + "; ".join(shares) + ".",
    ]


def study_excerpt(folder: Path) -> str:
    """excerpt.md of a measured study folder: its command, the study's measured answer and its evidence table,
    computed here from the records exactly as compare.study writes them into study.md."""
    name = json.loads((folder / "study.json").read_text())["study"]
    study = spec.load(folder / "study.toml", name=name)
    t, env, _, _ = load(folder)
    answer, frames = answers.analyse(t["runs"], study)
    said = summary.summarise(t["runs"], study, frames)
    lines = [f"{_measured_with(env, 'study')}; the answer:", "", said.markdown(), "Every comparison:", ""]
    lines += [f"- {line}" for line in answer]
    lines += ["", "Per cell, over seeds (complete runs):", "", render.evidence(frames["study"], study)]
    return "\n".join(lines + _trace_cost(t)) + "\n"


def _trace_cost(t: dict) -> list:
    """For traced runs (--trace-every): per framework, the median time of one trace (11 forward-backward passes,
    common.trace) against the median time of one training step."""
    if "trace_steps" not in t:
        return []
    epochs = t["epochs"]
    step = (epochs.train_seconds / (epochs.timed_steps + epochs.warmup_steps)).groupby(epochs.framework).median()
    trace = t["trace_steps"].groupby("framework", sort=False).trace_seconds.median()
    parts = [f"{fw} {seconds:.2f} s ({seconds / step[fw]:.0f} training steps)" for fw, seconds in trace.items()]
    return ["", "One trace, median per framework: " + "; ".join(parts) + "."]


def answer_block(folder: Path, part: str = "fold") -> str:
    """The generated part of a guide's section: a study's summary (its sentences, compact table and caption), or
    one part of a port (fold, ports, mistakes or onnx: its table and sentence), and how and where it was measured, from
    the folder's committed records."""
    folder = Path(folder)
    if (folder / "port.json").exists():
        data = ports.load(folder)
        dtype = data.get("dtype", "float32")
        tables = {
            "fold": lambda: ports.fold_markdown(ports.fold_table(data["fold"]), dtype),
            "ports": lambda: ports.port_markdown(ports.port_table(data.get("ports", [])), dtype),
            "mistakes": lambda: ports.mistake_markdown(ports.mistake_table(data.get("mistakes", []))),
            "onnx": lambda: ports.onnx_markdown(ports.onnx_table(data.get("onnx", []))),
        }
        if part not in tables:
            raise ValueError(f"{folder.name}#{part}: a port's parts are {', '.join(tables)}")
        return "\n".join(tables[part]()) + f"\n\n*{_measured_with(data['machine'], 'port')}.*\n"
    name = json.loads((folder / "study.json").read_text())["study"]
    study = spec.load(folder / "study.toml", name=name)
    t, env, _, _ = load(folder)
    _, frames = answers.analyse(t["runs"], study)
    said = summary.summarise(t["runs"], study, frames)
    minutes = f"; {env['seconds'] / 60:.0f} min" if env.get("seconds") else ""
    return (
        said.markdown()
        + f"\n*{_measured_with(env, 'study')}: {env.get('budget', '?')}, seeds "
        + f"{', '.join(map(str, env.get('seeds', [])))}{minutes}.*\n"
    )


ANSWER = re.compile(r"(<!-- answer: ([\w-]+)(?:#(\w+))? -->\n)(.*?)(<!-- /answer -->)", re.S)


def answer_blocks(page: Path, measured: Path) -> str:
    """page's text with every `<!-- answer: NAME -->` block made again from measured/NAME, and a
    `<!-- durations -->` block (the shipped studies' times) made again from measured/*."""
    text = ANSWER.sub(
        lambda m: m.group(1) + answer_block(measured / m.group(2), m.group(3) or "fold") + m.group(5), page.read_text()
    )
    return DURATIONS.sub(lambda m: m.group(1) + durations_block(measured) + m.group(2), text)


DURATIONS = re.compile(r"(<!-- durations -->\n).*?(<!-- /durations -->)", re.S)
FULL_IMAGES = 60000  # Fashion-MNIST's training images: an epoch of the full budget


def _images(study, quick: bool) -> int:
    """Training images over every run of a study's file (its frameworks and seeds), at a budget."""
    configs, _ = study.cells(quick=quick)
    return sum(c.epochs * min(c.train_limit or FULL_IMAGES, FULL_IMAGES) for c in configs)


def durations_block(measured: Path) -> str:
    """A table of every shipped study: how long its --quick budget took where docs/measured holds its records
    (the frameworks and seeds it ran, the machine), and how many times as many training images its full budget
    trains (from the file: an estimate of the full budget's time, not a measurement)."""
    lines = [
        "| study | `--quick` took | measured with | the full budget trains |",
        "|---|---|---|---|",
    ]
    for name in spec.shipped():
        study = spec.load(spec.find(name), name=name)
        factor = _images(study, False) / _images(study, True)
        folder = Path(measured) / name
        took, what = "not measured", ""
        if (folder / "study.json").is_file() and json.loads((folder / "study.json").read_text())["study"] == name:
            env = json.loads((folder / "environment.json").read_text())
            if env.get("seconds"):
                took = f"{env['seconds'] / 60:.0f} min"
                fws = env.get("frameworks", [])
                what = (
                    f"{len(fws)} framework{'s' if len(fws) != 1 else ''}, {len(env.get('seeds', []))} seeds, "
                    f"{env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores)"
                )
        lines.append(f"| `{name}` | {took} | {what} | {factor:.0f}x the images |")
    return "\n".join(lines) + "\n"


def layer_excerpt(folder: Path) -> str:
    """compare.bench --layer's report, from every round's figures in layer.json (compare.reporting.layer)."""
    data = json.loads((folder / "layer.json").read_text())
    rows = [layer.layer_row(record) for record in data["measured"]]
    return layer.render_layers(pd.DataFrame(rows), layer.scratch_over_builtin(rows), data["machine"])


def excerpt(folder: Path) -> str:
    """excerpt.md of a measured folder: its command, a table of the final epoch per framework and variant
    (accuracy and train/eval disagreement with the running average and with population statistics), and the
    ranges the guides quote, each computed here: the accuracy gained and disagreement removed, the population
    pass's cost in seconds, and how much accuracy moves between late epochs either way."""
    if (Path(folder) / "study.json").exists():
        return study_excerpt(Path(folder))
    if (Path(folder) / "bench.json").exists():
        return bench_excerpt(Path(folder))
    if (Path(folder) / "layer.json").exists():  # compare.bench --layer: the report, computed again
        return layer_excerpt(Path(folder))
    if (Path(folder) / "port.json").exists():  # its three parts, as the guides quote them
        parts = ("ports", "mistakes", "fold") + (("onnx",) if ports.load(folder).get("onnx") else ())
        return "\n".join(answer_block(Path(folder), part) for part in parts)
    t, env, _, _ = load(Path(folder))
    s = t["summary"]
    seeds = ", ".join(map(str, sorted(set(t["runs"].seed))))
    precisions = "precision" in s and s.precision.nunique() > 1  # a column only where runs differ in it
    lines = [
        f"{_measured_with(env, 'run')}; {int(s.epochs.max())} epochs, seed {seeds}; final epoch:",
        "",
        "| framework | variant | " + ("precision | " if precisions else "") + "test acc, running average | "
        "with population statistics | train/eval disagreement | with population statistics |",
        "|---|---|---|---|---|---|" + ("---|" if precisions else ""),
    ]
    costs, lags = [], []
    for _, row in s.iterrows():
        pop = row.get("final_pop_test_acc")
        lines.append(
            f"| {row.framework} | {row.variant} | "
            + (f"{row.precision} | " if precisions else "")
            + f"{fmt(row.final_test_acc, 'final_test_acc')} | "
            f"{fmt(pop, 'final_pop_test_acc') or 'n/a'} | {_percent(row.final_probe_disagreement)} | "
            + (_percent(row.final_pop_probe_disagreement) if not np.isnan(pop) else "n/a")
            + " |"
        )
        if not np.isnan(pop) and row.final_probe_disagreement > 0:
            costs.append(100 * row.final_pop_gain)
            lags.append(100 * (1 - row.final_pop_probe_disagreement / row.final_probe_disagreement))
    if costs:
        lines += [
            "",
            f"With population statistics in place of the running average, test accuracy rises by "
            f"{_span(costs, 1)} points, and {_span(lags, 0, '%')} of the train/eval disagreement on the probe "
            f"images goes away: that share is the running average's lag, the rest batch noise.",
        ]
        lines += _cost_and_steadiness(t["epochs"])
    lines += _mixed_against_float32(t)
    lines += _time(t)
    return "\n".join(lines) + "\n"


def _time(t) -> list:
    """A table of each run's time: its execution mode, training examples/s and seconds of training per epoch (the
    medians over its epochs; the first step and the evaluation apart)."""
    s, epochs = t["summary"], t["epochs"]
    if epochs.empty:
        return []
    keys = [k for k in ("framework", "variant", "precision") if k in epochs and k in s]
    seconds = epochs.groupby(keys).train_seconds.median()
    lines = [
        "",
        "Time (the median over epochs):",
        "",
        "| " + " | ".join(keys) + " | execution | training examples/s | training seconds per epoch |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for _, row in s.iterrows():
        key = tuple(row[k] for k in keys)
        if key in seconds:
            lines.append(
                "| " + " | ".join(map(str, key)) + f" | {row.execution} | "
                f"{fmt(row.train_examples_per_s, 'train_examples_per_s')} | {seconds[key]:.1f} |"
            )
    return lines


def main(argv=None) -> int:
    """python -m compare.reporting.excerpt FOLDER ...: each folder's excerpt.md; --answers PAGE: the page's answer
    blocks, from docs/measured beside it."""
    folders = sys.argv[1:] if argv is None else argv
    if folders[:1] == ["--answers"]:
        for page in map(Path, folders[1:]):
            text = answer_blocks(page, page.parent / "measured")
            atomic(page, lambda p: p.write_text(text))
            print(f"{page}: answer blocks made again")
        return 0
    for folder in folders:
        text = excerpt(Path(folder))
        atomic(Path(folder) / "excerpt.md", lambda p: p.write_text(text))
        print(f"{folder}/excerpt.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
