"""compare.bench --layer's arithmetic and report: the normalisation layer alone against the memory roofline.

Each row is one layer (bn1 or bn2 of BN-LeNet) of one cell: its median seconds per training-mode forward and
backward, the minimal traffic it must move per second (common.roofline.norm_bytes), the memory's bandwidth at the
same size in the same rounds (the framework's triad or numpy's add, whichever was faster), and their ratio, the
fraction of the roofline, as the median of the rounds' own ratios with its 95% interval. The comparison pairs
each scratch layer with the built-in one of the same framework, mode and shape, round by round.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.roofline import bytes_per_s, memory_rates

from .benchmark import ratio_text
from .markdown import markdown_table
from .stats import paired_ratio

COLUMNS = [
    "framework",
    "norm",
    "variant",
    "execution",
    "execution_name",
    "batch_size",
    "image_size",
    "layer",
    "shape",
    "dtype",
    "microseconds",
    "layer_gb_per_s",
    "memory_gb_per_s",
    "of_roofline",
    "of_roofline_low",
    "of_roofline_high",
    "rounds",
    "device_name",
]
KEY = ["framework", "norm", "execution_name", "batch_size", "image_size", "layer"]


def layer_row(record: dict) -> dict:
    """One row from a worker's layer record (compare.execution.worker.layer)."""
    seconds = record["seconds_all"]
    layer_rates = [bytes_per_s(record["layer_bytes"], s) for s in seconds]
    memory = memory_rates(record["triad_bytes"], record["triad_seconds_all"], record["add_seconds_all"])
    fraction = paired_ratio(layer_rates, memory)
    return {
        **{k: record[k] for k in ("framework", "norm", "variant", "execution", "execution_name", "batch_size")},
        **{k: record[k] for k in ("image_size", "layer", "dtype", "device_name")},
        "shape": "x".join(str(n) for n in record["shape"]),
        "microseconds": float(np.median(seconds)) * 1e6,
        "layer_gb_per_s": bytes_per_s(record["layer_bytes"], float(np.median(seconds))) / 1e9,
        "memory_gb_per_s": float(np.median(memory)) / 1e9,
        **{f"of_roofline{key}": value for key, value in fraction.items()},
        "rounds": len(seconds),
        "seconds_all": seconds,
    }


def scratch_over_builtin(rows: list) -> pd.DataFrame:
    """Per framework, mode and layer shape: each scratch layer's speed (autodiff's or closed-form's backward)
    against the built-in one's (built-in seconds over scratch seconds, round by round; above 1, the scratch
    layer is faster), with its interval."""
    frame = pd.DataFrame(rows)
    out = []
    for key, group in frame.groupby(KEY, sort=False):
        by = {r["variant"]: r for _, r in group.iterrows()}
        for variant in (v for v in by if v.startswith("scratch") and "builtin" in by):
            ratio = paired_ratio(by["builtin"]["seconds_all"], by[variant]["seconds_all"])
            out.append(
                {**dict(zip(KEY, key)), "variant": variant, **{f"scratch_speed{k}": v for k, v in ratio.items()}}
            )
    columns = KEY + ["variant", "scratch_speed", "scratch_speed_low", "scratch_speed_high"]
    return pd.DataFrame(out, columns=columns)


def layer_line(r: dict) -> str:
    return (
        f"{r['framework']:>10} {r['variant']:<16} {r['execution_name']:<30} {r['layer']} {r['shape']:<14} "
        f"{r['microseconds']:>9,.1f} us  {r['layer_gb_per_s']:>6.1f} GB/s  memory {r['memory_gb_per_s']:>6.1f} GB/s  "
        f"of roofline {ratio_text(r, 'roofline', 'of_')}"
    )


def render_layers(frame: pd.DataFrame, ratios: pd.DataFrame, machine: dict) -> str:
    shown = frame.copy()
    shown["execution"] = frame["execution_name"]
    shown["time (us)"] = [f"{t:,.1f}" for t in frame["microseconds"]]
    shown["GB/s"] = [f"{g:.1f}" for g in frame["layer_gb_per_s"]]
    shown["memory GB/s"] = [f"{g:.1f}" for g in frame["memory_gb_per_s"]]
    shown["of roofline"] = [ratio_text(r, "roofline", "of_") for _, r in frame.iterrows()]
    columns = ["framework", "variant", "execution", "layer", "shape", "time (us)", "GB/s", "memory GB/s", "of roofline"]
    parts = [
        "# The normalisation layer against the memory roofline\n",
        f"`{machine['command']}`, {machine['started']}\n",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {machine['platform']}, "
        f"Python {machine['python']}; device {', '.join(sorted(set(frame['device_name'].dropna())))}.\n",
        "One training-mode forward and backward of each layer alone, on BN-LeNet's inputs of bn1 and bn2 "
        "(N, C, H, W), median of the rounds. GB/s: the layer's minimal traffic (common.roofline: read x and write "
        "y forward, read dy and x and write dx backward, 5 values per activation) per second; memory GB/s: the "
        "faster of the framework's STREAM triad and numpy's add as large as the input, timed in the same rounds; "
        "of roofline: the first over the second, "
        "the median of the rounds' own ratios with its 95% interval (from 6 rounds). A layer that reads its "
        "input twice in each pass reaches at most 5/8 = 0.625.\n",
        markdown_table(shown, columns),
        "\nThe best fraction of the roofline per framework: "
        + "; ".join(
            f"{framework} {r['of_roofline']:.2f} ({r['variant']}, {r['execution_name']}, {r['layer']})"
            for framework, group in frame.groupby("framework", sort=False)
            for r in [group.loc[group.of_roofline.idxmax()]]
        )
        + ".\n",
    ]
    if not ratios.empty:
        shown = ratios.copy()
        shown["execution"] = ratios["execution_name"]
        shown["scratch speed / built-in"] = [ratio_text(r, "speed", "scratch_") for _, r in ratios.iterrows()]
        parts += [
            "\n## Scratch against built-in\n",
            "The built-in layer's seconds over the scratch layer's, round by round (above 1: the scratch layer "
            "is faster), median with its 95% interval.\n",
            markdown_table(
                shown, ["framework", "variant", "execution", "layer", "batch_size", "scratch speed / built-in"]
            ),
        ]
    return "\n".join(parts)
