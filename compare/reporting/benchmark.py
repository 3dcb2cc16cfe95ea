"""The benchmark's arithmetic and report (compare.bench): each cell's row from its per-repeat figures, the
table, its sentences and its plot. compare.bench measures; this module and compare.reporting.excerpt, which
quotes a measured benchmark, compute from what was measured the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import ModelSpec
from common.flops import PEAK_MATMUL, training_flops

from .files import atomic
from .markdown import markdown_table
from .stats import paired_ratio

LOOPS = ("suite", "bare", "textbook")
COLUMNS = [
    "framework",
    "norm",
    "variant",
    "execution",
    "execution_name",
    "batch_size",
    "image_size",
    "suite_gflops_per_s",
    "peak_gflops_per_s",
    "suite_of_peak",
    "first_step_seconds",
    "first_step_seconds_later",
    "population_size",
    "population_first_seconds",
    "population_seconds",
    "epoch_seconds",
    "population_share",
    "population_share_low",
    "population_share_high",
    "population_over_suite",
    "population_over_suite_low",
    "population_over_suite_high",
    "suite_examples_per_s",
    "bare_examples_per_s",
    "textbook_examples_per_s",
    "suite_over_bare",
    "suite_over_bare_low",
    "suite_over_bare_high",
    "suite_over_textbook",
    "suite_over_textbook_low",
    "suite_over_textbook_high",
    "suite_spread",
    "bare_spread",
    "textbook_spread",
    "repeats",
    "device_name",
]


def row(result: dict) -> dict:
    """One table row from a worker's bench record: each loop's median and spread ((max - min) / median),
    and the paired ratios suite/bare (the harness overhead) and suite/textbook."""
    out = {
        k: result.get(k) for k in ("framework", "variant", "execution", "execution_name", "batch_size", "device_name")
    }
    out["norm"] = result.get("norm", "batch")
    out["image_size"] = result.get("image_size", 28)  # records from before --image-size ran 28x28
    for loop in LOOPS:
        figures = result[f"{loop}_all"]
        out[f"{loop}_examples_per_s"] = float(np.median(figures))
        out[f"{loop}_spread"] = float((max(figures) - min(figures)) / np.median(figures))
    for other in ("bare", "textbook"):
        ratio = paired_ratio(result["suite_all"], result[f"{other}_all"])
        out.update({f"suite_over_{other}{key}": value for key, value in ratio.items()})
    out["repeats"] = len(result["suite_all"])
    # what the suite's throughput is in arithmetic (common.flops), against the framework's own matrix product
    out["suite_gflops_per_s"] = (
        out["suite_examples_per_s"] * training_flops(ModelSpec(image_size=out["image_size"])) / 1e9
    )
    out["peak_gflops_per_s"] = result.get("peak_gflops_per_s", math.nan)  # none measured before
    out["suite_of_peak"] = out["suite_gflops_per_s"] / out["peak_gflops_per_s"]
    # the suite's first step, timed apart from the throughput: the first repeat's holds a compiled mode's
    # compilation from cold caches; the later repeats' (median) what a new run in a warm process pays
    first = result["suite_first_step_seconds"]
    out["first_step_seconds"] = first[0]
    out["first_step_seconds_later"] = float(np.median(first[1:])) if len(first) > 1 else None
    # the population pass (--population-size): each two-epoch run's second epoch, the pass's time against the
    # same epoch's training and evaluation; its first epoch's time (compilation included) apart; and that
    # epoch's training examples/s against the suite's without the pass (1 = the pass leaves training alone)
    nan = {"": math.nan, "_low": math.nan, "_high": math.nan}
    runs, epochs = result.get("population_seconds", []), result.get("population_epoch_seconds", [])
    out["population_size"] = result.get("population_size", 0)
    out["population_first_seconds"] = float(np.median([r[0] for r in runs])) if runs else math.nan
    out["population_seconds"] = float(np.median([r[-1] for r in runs])) if runs else math.nan
    out["epoch_seconds"] = float(np.median([e[-1] for e in epochs])) if epochs else math.nan
    share = paired_ratio([r[-1] for r in runs], [e[-1] for e in epochs]) if runs else nan
    out.update({f"population_share{key}": value for key, value in share.items()})
    trained = paired_ratio(result["population_all"], result["suite_all"]) if runs else nan
    out.update({f"population_over_suite{key}": value for key, value in trained.items()})
    return out


def line(r: dict) -> str:
    return (
        f"{r['framework']:>10} {r['norm']:<8} {r['variant']:<16} {r['execution_name'] or r['execution']:<12} "
        f"{r['batch_size']:>5}  "
        f"suite {r['suite_examples_per_s']:>8,.0f}  bare {r['bare_examples_per_s']:>8,.0f}  "
        f"textbook {r['textbook_examples_per_s']:>8,.0f} ex/s   suite/bare {ratio_text(r, 'bare')}  "
        f"suite/textbook {ratio_text(r, 'textbook')}"
    )


def ratio_text(r, other: str, prefix: str = "suite_over_") -> str:
    """A paired ratio with its 95% interval, as every benchmark table prints one: 0.987 [0.950, 1.010]."""
    low, high = r[f"{prefix}{other}_low"], r[f"{prefix}{other}_high"]
    interval = "" if pd.isna(low) else f" [{low:.3f}, {high:.3f}]"
    return f"{r[f'{prefix}{other}']:.3f}{interval}"


def _share(r) -> str:
    low, high = r["population_share_low"], r["population_share_high"]
    return f"{r['population_share']:.1%}" + ("" if pd.isna(low) else f" ({low:.1%}-{high:.1%})")


def render(frame: pd.DataFrame, machine: dict, loops: dict, args) -> str:
    shown = frame.copy()
    for loop in LOOPS:
        shown[loop] = [
            f"{m:,.0f} ±{s / 2:.0%}" for m, s in zip(frame[f"{loop}_examples_per_s"], frame[f"{loop}_spread"])
        ]
    for other in ("bare", "textbook"):
        shown[f"suite/{other}"] = [ratio_text(r, other) for _, r in frame.iterrows()]
    shown["execution"] = [n or e for n, e in zip(frame["execution_name"], frame["execution"])]
    shown["batch"] = frame["batch_size"].astype(str)
    shown["image"] = [f"{s}x{s}" for s in frame["image_size"]]
    shown["GFLOP/s"] = [f"{g:,.2f}" for g in frame["suite_gflops_per_s"]]
    shown["of peak"] = [
        "" if pd.isna(f) else f"{f:.1%} of {p:,.0f}" for f, p in zip(frame["suite_of_peak"], frame["peak_gflops_per_s"])
    ]
    shown["population"] = [
        "" if pd.isna(r["population_share"]) else f"{r['population_seconds']:.2f} s, {_share(r)}"
        for _, r in frame.iterrows()
    ]
    shown["population first"] = ["" if pd.isna(s) else f"{s:.2f} s" for s in frame["population_first_seconds"]]
    shown["training with it"] = [
        "" if pd.isna(r["population_over_suite"]) else ratio_text(r, "suite", "population_over_")
        for _, r in frame.iterrows()
    ]
    shown["first step s"] = [
        f"{a:.2f}" + ("" if pd.isna(b) else f" / {b:.2f}")
        for a, b in zip(frame["first_step_seconds"], frame["first_step_seconds_later"])
    ]
    table = markdown_table(
        shown,
        [
            "framework",
            "norm",
            "variant",
            "execution",
            "batch",
            "image",
            "suite",
            "bare",
            "textbook",
            "suite/bare",
            "suite/textbook",
            "GFLOP/s",
            "of peak",
            "first step s",
        ]
        + (["population", "population first", "training with it"] if frame["population_share"].notna().any() else []),
    )
    parts = [
        "# Throughput: suite, bare and textbook loops\n",
        f"`{machine['command']}`, {machine['started']}\n",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {machine['platform']}, "
        f"Python {machine['python']}; device {', '.join(sorted(set(frame['device_name'].dropna())))}.\n",
        f"Training examples per second of one epoch ({args.train_limit or 60000:,} images, the first "
        f"5 steps excluded), median of {args.repeats} epochs per loop, the three loops alternating in one "
        "process; ± is half the range (max - min) of the repeats, relative to the median. suite/bare is "
        "the harness overhead (1 = none), suite/textbook the gain over the textbook's loop: each the "
        "median of the repeats' own ratios (the loops of a repeat run next to each other, so the "
        "machine's drift between repeats cancels), with its distribution-free 95% interval in "
        "parentheses (order statistics; from 6 repeats). "
        "first step s: the suite's first training step, never part of the throughput: in the first "
        "repeat (compilation from cold caches, for a compiled mode) / the median of the later repeats. "
        "GFLOP/s: the suite's examples/s times a training step's FLOPs per image (common.flops: the "
        "convolutions' and dense layers' multiply-adds, forward and backward); of peak: that against the "
        f"framework's own product of two {PEAK_MATMUL} x {PEAK_MATMUL} matrices in the run's dtype on the same "
        "device, measured in "
        "the same worker before the cells (the median of 5), the machine's limit for this arithmetic."
        + (
            f" population: with --population-size {args.population_size}, a fourth loop per repeat is a two-epoch "
            "run of the suite with the population pass on, as a run has it (common.population: the statistics "
            "over that many training images, then the whole test set and the probe in eval mode with them); "
            "population: the pass's seconds in the second epoch and their share of that epoch without it "
            "(training, warm-up included, and the test evaluation), the median of the repeats' own ratios with "
            "its 95% interval; population first: the first epoch's pass (compilation included); training with "
            "it: the second epoch's training examples/s against the suite's without the pass (1 = the pass "
            "leaves training alone)."
            if args.population_size
            else ""
        )
        + "\n",
        table,
        "## Loops\n",
        "".join(
            ["- suite: `common.loop` through the framework's backend (the loop every run uses)\n"]
            + [f"- {fw} {text}\n" for (fw, _), text in sorted(loops.items())]
        ),
    ]
    return "\n".join(parts)


def plot(frame: pd.DataFrame, path: Path) -> None:
    """One panel per framework: the suite's examples/s against the batch size, a line per variant x
    execution, the bare loop dotted beside it; the whiskers span the repeats (min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = list(dict.fromkeys(frame["framework"]))
    fig, axes = plt.subplots(1, len(frameworks), figsize=(5.5 * len(frameworks), 4.2), squeeze=False)
    for ax, framework in zip(axes[0], frameworks):
        rows, last_color = frame[frame["framework"] == framework], None
        for (norm, variant, execution), group in rows.groupby(["norm", "variant", "execution_name"], sort=False):
            group = group.sort_values("batch_size")
            for loop, style in (("suite", "-o"), ("bare", ":x")):
                median = group[f"{loop}_examples_per_s"]
                half = median * group[f"{loop}_spread"] / 2
                line = ax.errorbar(
                    group["batch_size"],
                    median,
                    yerr=half,
                    fmt=style,
                    capsize=3,
                    label=f"{norm} {variant}, {execution}" if loop == "suite" else None,
                    color=None if loop == "suite" else last_color,
                )
                last_color = line[0].get_color()
        ax.set_xscale("log", base=2)
        ax.set_title(framework)
        ax.set_xlabel("batch size")
        ax.set_ylabel("training examples / s (suite solid, bare dotted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
