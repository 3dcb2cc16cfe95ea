"""compare.port's figures and report: trained models found in a run folder, and what loading them elsewhere gives.

A port folder holds port.json: the machine and command, the models (each framework and variant's trained
snapshot of one run), and one row per comparison with everything its table needs (test accuracies, the largest
logit difference, prediction agreement, and the per-round inference examples/s from which the speeds and their
paired ratio are computed again here). port.md and the excerpts in docs/measured are rendered from it alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import VARIANTS
from common.registry import FRAMEWORKS

from .files import read_records
from .stats import paired_ratio


def trained_models(run_dir: Path, epoch: int | None = None) -> list:
    """Every complete run of a run folder as {framework, variant, seed, config, epsilon, epoch, snapshot}: its
    snapshot of `epoch` (default: its last), the configuration it trained with and its layers' epsilon."""
    records, _ = read_records(run_dir)
    starts = {(r["framework"], r["config_id"]): r for r in records if r.get("kind") == "run_start"}
    ended = [r for r in records if r.get("kind") == "run_end" and r.get("status") == "complete"]
    complete = {(r["framework"], r["config_id"]) for r in ended}
    epochs = {}
    for r in records:
        key = (r.get("framework"), r.get("config_id"))
        if r.get("kind") != "epoch" or key not in complete or not r.get("snapshot"):
            continue
        if r["epoch"] == epoch or (epoch is None and r["epoch"] >= epochs.get(key, {}).get("epoch", 0)):
            epochs[key] = r
    models = []
    for key, r in epochs.items():
        start = starts[key]
        path = Path(run_dir) / r["snapshot"]
        if not path.is_file():
            continue  # a study keeps only its last epoch's snapshot
        models.append(
            {
                "framework": r["framework"],
                "variant": r["variant"],
                "seed": r["seed"],
                "config": start["config"],
                "epsilon": (start.get("backend") or {}).get("bn_epsilon"),
                "epoch": r["epoch"],
                "snapshot": str(path),
                "test_acc": r["test_acc"],
            }
        )
    order = {name: i for i, name in enumerate([*FRAMEWORKS, *VARIANTS])}
    return sorted(models, key=lambda m: (order.get(m["framework"], 99), order.get(m["variant"], 99), m["seed"]))


def logit_distance(mine: np.ndarray, theirs: np.ndarray) -> dict:
    """The largest |logit difference| and the share of examples whose predicted class agrees."""
    mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
    return {
        "max_logit_diff": float(np.max(np.abs(mine - theirs))),
        "agreement": float(np.mean(mine.argmax(axis=1) == theirs.argmax(axis=1))),
    }


def fold_table(rows: list) -> pd.DataFrame:
    """One row per folded model: accuracies, the logit distance, and inference examples/s of both (medians over
    rounds) with the paired ratio folded / unfolded and its distribution-free 95% interval."""
    out = []
    for r in rows:
        ratio = paired_ratio(r["folded_examples_per_s"], r["examples_per_s"]) if r.get("examples_per_s") else {}
        out.append(
            {
                "framework": r["framework"],
                "variant": r["variant"],
                "test_acc": r["test_acc"],
                "folded_test_acc": r["folded_test_acc"],
                "max_logit_diff": r["max_logit_diff"],
                "agreement": r["agreement"],
                "examples_per_s": float(np.median(r["examples_per_s"])) if r.get("examples_per_s") else math.nan,
                "folded_examples_per_s": (
                    float(np.median(r["folded_examples_per_s"])) if r.get("folded_examples_per_s") else math.nan
                ),
                "speedup": ratio.get("", math.nan),
                "speedup_low": ratio.get("_low", math.nan),
                "speedup_high": ratio.get("_high", math.nan),
                "rounds": len(r.get("examples_per_s") or []),
            }
        )
    return pd.DataFrame(out)


def _interval(low, high) -> str:
    return "" if pd.isna(low) else f" [{low:.2f}, {high:.2f}]"


def fold_markdown(frame: pd.DataFrame, dtype: str) -> list:
    """The fold table and the sentence it supports."""
    if frame.empty:
        return []
    lines = [
        "| framework | variant | test acc | folded | largest logit difference | prediction agreement | "
        "inference examples/s | folded | folded / BN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in frame.itertuples():
        lines.append(
            f"| {FRAMEWORKS[r.framework].label} | {r.variant} | {r.test_acc:.4f} | {r.folded_test_acc:.4f} | "
            f"{r.max_logit_diff:.2g} | {r.agreement:.2%} | {r.examples_per_s:,.0f} | {r.folded_examples_per_s:,.0f} | "
            f"{r.speedup:.2f}x{_interval(r.speedup_low, r.speedup_high)} |"
        )
    worst = frame.max_logit_diff.max()
    lines += [
        "",
        f"Folding each BN into the layer before it leaves eval mode's predictions as they were on "
        f"{frame.agreement.min():.2%} or more of the test images in every framework, its logits within "
        f"{worst:.2g} ({dtype}: what rounding the weights differently leaves); inference runs at "
        f"{frame.speedup.min():.2f}x to {frame.speedup.max():.2f}x the unfolded network's examples/s (median of "
        f"{int(frame.rounds.max())} alternating rounds, each ratio paired within its round).",
    ]
    return lines


def render(data: dict) -> str:
    """port.md from port.json's contents."""
    machine = data["machine"]
    dtype = data.get("dtype", "float32")
    parts = [
        "# bn-compare port\n",
        f"- command: `{machine.get('command', '?')}`",
        f"- trained models: {data.get('source', '?')}",
        f"- machine: {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} cores)\n",
    ]
    fold = fold_table(data.get("fold", []))
    if not fold.empty:
        parts += [
            "## BN folded into the layer before it (the textbook's equivalent transformation)\n",
            "Each trained model in eval mode against the same network without BN layers whose convolution and "
            "dense weights and biases have each BN folded in (w' = w gamma / sqrt(var + eps), b' = (b - mean) gamma "
            "/ sqrt(var + eps) + beta, common.fold), on the whole test set, in the same framework.\n",
            *fold_markdown(fold, dtype),
            "",
        ]
    refused = data.get("refused", [])
    if refused:
        parts += ["## Not folded\n"] + [f"- {r['framework']} {r['variant']}: {r['why']}" for r in refused] + [""]
    return "\n".join(parts) + "\n"


def load(folder: Path) -> dict:
    return json.loads((Path(folder) / "port.json").read_text())
