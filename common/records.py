"""The record schema a worker emits, one JSON object per line.

Every record has `kind` and `schema`. Run records also carry framework,
variant and seed. Floats that are not finite are written as null.
"""
from __future__ import annotations

import math

SCHEMA_VERSION = 1

KINDS = ("worker", "run_start", "epoch", "run_end", "error", "bench")

RUN_KEYS = ("framework", "variant", "seed", "config_id")

EPOCH_KEYS = RUN_KEYS + (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc",
    "train_examples_per_s", "train_seconds", "timed_steps",
    "warmup_examples_per_s", "warmup_seconds", "warmup_steps",
    "eval_examples_per_s", "eval_seconds",
    "probe_acc_eval", "probe_acc_train", "probe_logit_mad", "probe_disagreement",
    "bn_gap",  # list of {layer, mean_gap, var_log_ratio}
    "snapshot",  # file (relative to the run dir) holding parameters and probe logits
    "step_losses",  # losses of the first config.trace_steps steps (empty unless asked for)
)


def clean(value):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def make(kind: str, **fields) -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    record = {"kind": kind, "schema": SCHEMA_VERSION, **fields}
    if kind == "epoch":
        missing = [k for k in EPOCH_KEYS if k not in record]
        if missing:
            raise ValueError(f"epoch record lacks {missing}")
    return clean(record)
