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

from common import onnx
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


def own_name(model: dict) -> str:
    """A trained model's evaluation in its own framework, as compare.port names the task."""
    return f"{model['framework']}_{model['variant']}_s{model['seed']}"


def port_name(model: dict, framework: str, variant: str) -> str:
    """The model loaded into framework's variant model (the same name as own_name where that is the model)."""
    if (framework, variant) == (model["framework"], model["variant"]):
        return own_name(model)
    return f"{own_name(model)}_to_{framework}_{variant}"


def logits(port_dir: Path, result: dict) -> np.ndarray:
    with np.load(Path(port_dir) / result["logits"]) as arrays:
        return arrays["logits"]


def compare(models: list, results: dict, port_dir: Path, frameworks) -> dict:
    """port.json's rows from the workers' results (by task name, compare.port): each fold against its model, each
    port against the model in its own framework, each mistaken port against the right one. A comparison whose
    evaluations failed is left out (the failure is in the results, and the command's exit status)."""

    def ok(name):
        return name in results and not results[name].get("error")

    fold, ported = [], []
    for model in models:
        name = own_name(model)
        if not ok(name):
            continue
        own = results[name]
        ident = {k: model[k] for k in ("framework", "variant", "seed", "epoch")}
        if ok(f"{name}_folded"):
            folded = results[f"{name}_folded"]
            fold.append(
                {
                    **ident,
                    "test_acc": own["test_acc"],
                    "folded_test_acc": folded["test_acc"],
                    **logit_distance(logits(port_dir, own), logits(port_dir, folded)),
                    "examples_per_s": own.get("examples_per_s", []),
                    "folded_examples_per_s": folded.get("examples_per_s", []),
                    "execution": own.get("execution"),
                }
            )
        for target in frameworks:
            for variant in ("scratch", "builtin"):
                task = port_name(model, target, variant)
                if task == name or not ok(task):
                    continue
                there = results[task]
                ported.append(
                    {
                        **ident,
                        "target": target,
                        "target_variant": variant,
                        "source_test_acc": own["test_acc"],
                        "target_test_acc": there["test_acc"],
                        **logit_distance(logits(port_dir, own), logits(port_dir, there)),
                    }
                )
    return {"fold": fold, "ports": ported, "mistakes": _mistakes(models, results, port_dir, frameworks, ok)}


def _mistakes(models, results, port_dir, frameworks, ok) -> list:
    from common.port import MISTAKES

    rows = []
    for model in (m for m in models if m["variant"] == "builtin"):
        for target in frameworks:
            into = port_name(model, target, "builtin")
            for mistake in MISTAKES:
                right = f"{into}_finetuned" if mistake == "momentum" else into
                wrong = f"{into}_{mistake}"
                if not (ok(right) and ok(wrong)):
                    continue
                rows.append(
                    {
                        "framework": model["framework"],
                        "seed": model["seed"],
                        "target": target,
                        "mistake": mistake,
                        "right_test_acc": results[right]["test_acc"],
                        "mistaken_test_acc": results[wrong]["test_acc"],
                        "right_epsilon": results[right].get("epsilon"),
                        "mistaken_epsilon": results[wrong].get("epsilon"),
                        **logit_distance(logits(port_dir, results[right]), logits(port_dir, results[wrong])),
                    }
                )
    return rows


def port_table(rows: list) -> pd.DataFrame:
    """One row per port: the model's framework and variant, the target framework and variant, accuracies at both
    and the logit distance."""
    return pd.DataFrame(rows)


def mistake_table(rows: list) -> pd.DataFrame:
    """One row per mistaken port: the accuracy change against the right port (points) and the share of test
    images whose predicted class it changes."""
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["accuracy_change"] = frame.mistaken_test_acc - frame.right_test_acc
        frame["predictions_changed"] = 1 - frame.agreement
    return frame


def port_markdown(frame: pd.DataFrame, dtype: str) -> list:
    """Per (model variant, target variant), a matrix of the largest logit difference, sources as rows and targets
    as columns, and the sentence it supports."""
    if frame.empty:
        return []
    order = [f for f in FRAMEWORKS if f in set(frame.framework) | set(frame.target)]
    lines = []
    for (variant, into), group in frame.groupby(["variant", "target_variant"], sort=False):
        lines += [
            f"{variant} model into the {into} model: the largest |logit difference| on the test set",
            "",
            "| from \\ to | " + " | ".join(FRAMEWORKS[f].label for f in order) + " |",
            "|---|" + "---|" * len(order),
        ]
        for source in order:
            mine = group[group.framework == source].set_index("target")
            cells = [f"{mine.max_logit_diff[t]:.2g}" if t in mine.index else "" for t in order]
            lines.append(f"| {FRAMEWORKS[source].label} | " + " | ".join(cells) + " |")
        lines.append("")
    agree = frame.agreement.min()
    moved = (frame.target_test_acc - frame.source_test_acc).abs().max()
    lines.append(
        f"Every port ({len(frame)}, {dtype}) predicts the class its model predicts on "
        + ("every test image" if agree == 1 else f"{agree:.2%} or more of the test images")
        + f", with logits within {frame.max_logit_diff.max():.2g} of the model's; test accuracy "
        + ("does not move." if moved == 0 else f"moves by at most {moved:.4f}.")
    )
    return lines


def mistake_markdown(frame: pd.DataFrame) -> list:
    """Per mistake, per target framework: the accuracy change against the right port, in points, and the share
    of predictions it changes (the largest over the models ported in)."""
    from common.port import MISTAKES

    if frame.empty:
        return []
    order = [f for f in FRAMEWORKS if f in set(frame.target)]
    lines = [
        "| mistake | " + " | ".join(f"into {FRAMEWORKS[f].label}" for f in order) + " |",
        "|---|" + "---|" * len(order),
    ]
    for mistake, group in frame.groupby("mistake", sort=False):
        cells = []
        for target in order:
            mine = group[group.target == target]
            if mine.empty:
                cells.append("")
                continue
            low, high = 100 * mine.accuracy_change.min(), 100 * mine.accuracy_change.max()
            change = f"{low:+.2f}" if f"{low:+.2f}" == f"{high:+.2f}" else f"{low:+.2f} to {high:+.2f}"
            cells.append(f"{change} points; {mine.predictions_changed.max():.2%} changed")
        lines.append(f"| {MISTAKES[mistake].what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each cell: the test accuracy of the mistaken port minus the right port's (points, over the built-in models "
        "ported in, its own framework's included), and the largest share of test images whose predicted class the "
        "mistake changes.",
    ]
    return lines


def onnx_table(rows: list) -> pd.DataFrame:
    """One row per model: exported or not (and why), the exporter, onnx.checker's verdict, and per ONNX Runtime
    level (plain: no graph optimisation; optimized: all) the largest |logit difference| from the framework's own
    eval mode, the agreement, and the graph's BatchNormalization nodes and elementwise ops (common.onnx)."""
    frame = pd.DataFrame(rows)
    for level in ("plain", "optimized"):
        if f"{level}_ops" in frame:
            counted = frame[f"{level}_ops"].map(lambda ops: ops if isinstance(ops, dict) else {})
            frame[f"{level}_bn_nodes"] = counted.map(lambda ops: ops.get("BatchNormalization", 0))
            frame[f"{level}_elementwise"] = counted.map(lambda ops: sum(ops.get(op, 0) for op in onnx.ELEMENTWISE))
    return frame.drop(columns=[c for c in frame if c.endswith("_ops")])


def onnx_markdown(frame: pd.DataFrame) -> list:
    """Per model: its exporter, the checker's verdict, what its normalisations became before and after ONNX
    Runtime's optimisations, and how close ONNX Runtime comes to the framework; the models not exported, and why."""
    if frame.empty:
        return []
    imported = "importer" in frame or "import_error" in frame  # compare.port --onnx-import
    lines = [
        "| model | exporter | onnx.checker | norm layers | BatchNormalization nodes; elementwise ops | after ONNX "
        r"Runtime's optimisations | largest \|logit difference\| (plain; optimised) | predictions kept |"
        + (r" back in PyTorch (onnx2torch): largest \|logit difference\|; predictions kept |" if imported else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if imported else ""),
    ]
    order = list(FRAMEWORKS)
    for r in sorted(frame.to_dict("records"), key=lambda r: (order.index(r["framework"]), r["variant"])):
        model = f"{FRAMEWORKS[r['framework']].label} {r['variant']}"
        if not r["exported"]:
            lines.append(f"| {model} | not exported: {r['why']} | | | | | | |" + (" |" if imported else ""))
            continue
        cells = [f"{r['exporter']}, opset {r['opset']:.0f}", r["checker"], f"{r['layers']:.0f}"]
        levels = ("plain", "optimized")
        ran = [level for level in levels if not isinstance(r.get(f"{level}_error"), str)]  # ONNX Runtime ran it
        for level in levels:
            counts = f"{r.get(f'{level}_bn_nodes', 0):.0f}; {r.get(f'{level}_elementwise', 0):.0f}"
            cells.append(counts if level in ran else f"does not run: {r[f'{level}_error']}")
        cells.append("; ".join(f"{r[f'{level}_max_logit_diff']:.2g}" if level in ran else "-" for level in levels))
        cells.append(f"{min(r[f'{level}_agreement'] for level in ran):.2%}" if ran else "")
        if imported:
            error = r.get("import_error")
            back = f"{r.get('torch_max_logit_diff', math.nan):.2g}; {r.get('torch_agreement', math.nan):.2%}"
            cells.append(f"not imported: {error}" if isinstance(error, str) else back)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each model in eval mode, exported and run in ONNX Runtime on the CPU over the test set, graph optimisations "
        "off (plain) and on (optimised), against the model in its own framework. Elementwise ops ("
        + ", ".join(onnx.ELEMENTWISE)
        + ") include bias additions an exporter writes apart."
        + (f" Back in PyTorch: converted by {_importer(frame)}, run on the CPU." if imported else ""),
    ]
    return lines


def _importer(frame: pd.DataFrame) -> str:
    names = frame.importer.dropna().unique() if "importer" in frame else []
    return ", ".join(names) or "onnx2torch"


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
    ported = port_table(data.get("ports", []))
    if not ported.empty:
        parts += [
            "## Ports: each model in every other framework\n",
            "Each trained model's canonical arrays loaded into the other frameworks' scratch and built-in models, "
            "in eval mode on the test set, against the model in its own framework.\n",
            *port_markdown(ported, dtype),
            "",
        ]
    mistaken = mistake_table(data.get("mistakes", []))
    if not mistaken.empty:
        parts += [
            "## Mistakes: what each plausible slip of a port costs\n",
            "Each built-in model ported into another framework's built-in model with one mistake (common.port), "
            "against the same port done right (for the momentum, both fine-tuned one epoch in the target).\n",
            *mistake_markdown(mistaken),
            "",
        ]
    exported = onnx_table(data.get("onnx", []))
    if not exported.empty:
        parts += ["## ONNX: each model exported and run in ONNX Runtime\n", *onnx_markdown(exported), ""]
    refused = data.get("refused", [])
    if refused:
        parts += ["## Not folded\n"] + [f"- {r['framework']} {r['variant']}: {r['why']}" for r in refused] + [""]
    not_ported = data.get("not_ported", [])
    if not_ported:
        parts += ["## Not ported\n"] + [f"- into {r['framework']}: {r['task']}: {r['why']}" for r in not_ported] + [""]
    return "\n".join(parts) + "\n"


def load(folder: Path) -> dict:
    return json.loads((Path(folder) / "port.json").read_text())
