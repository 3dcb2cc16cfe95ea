"""The record schema a worker emits, one JSON object per line.

Every record has `kind` and `schema`. Run records also carry framework,
variant and seed. Floats that are not finite are written as null.
"""

from __future__ import annotations

import math

SCHEMA_VERSION = 2

KINDS = ("plan", "worker", "run_start", "epoch", "run_end", "error", "bench")

# Every run (framework x configuration) ends in exactly one of these. A run with
# no end record (its runner was killed outright) reads as "interrupted".
STATUSES = ("complete", "diverged", "interrupted", "crashed", "failed")
# complete: every epoch ran. diverged: the training loss stopped being finite (a
# result, with the epoch and step). interrupted: stopped by a signal, or never
# started because of one. crashed: the worker died or raised during training.
# failed: a clear error before training (no environment, bad data, bad device).

RUN_KEYS = ("framework", "variant", "seed", "config_id")

EPOCH_KEYS = RUN_KEYS + (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "train_examples_per_s",
    "train_seconds",
    "timed_steps",
    "warmup_examples_per_s",
    "warmup_seconds",
    "warmup_steps",
    "eval_examples_per_s",
    "eval_seconds",
    "probe_acc_eval",
    "probe_acc_train",
    "probe_logit_mad",
    "probe_disagreement",
    "bn_gap",  # list of {layer, mean_gap, var_log_ratio; whiteness or ks_uniform for whiten and the PITs}
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


# What each kind of record must hold to be usable by the reports.
REQUIRED = {
    "plan": RUN_KEYS + ("epochs",),
    "worker": ("framework",),
    "run_start": RUN_KEYS + ("config", "backend"),
    "epoch": EPOCH_KEYS,
    "run_end": RUN_KEYS + ("status",),
    "error": RUN_KEYS + ("status", "error_type", "message"),
    "bench": ("framework",),
}
_NUMERIC = tuple(k for k in EPOCH_KEYS if k not in RUN_KEYS + ("bn_gap", "snapshot", "step_losses"))


def problem(record) -> str | None:
    """Why a parsed JSON line cannot be used as a record, or None if it can."""
    if not isinstance(record, dict):
        return f"not a record (a JSON {type(record).__name__})"
    kind = record.get("kind")
    if kind not in KINDS:
        return f"unknown record kind {kind!r}"
    missing = [k for k in REQUIRED[kind] if k not in record]
    if missing:
        return f"{kind} record lacks {', '.join(missing)}"
    if kind in ("run_end", "error") and record["status"] not in STATUSES:
        return f"{kind} record has unknown status {record['status']!r}"
    if kind == "epoch":
        bad = [
            k
            for k in _NUMERIC
            if record[k] is not None and (isinstance(record[k], bool) or not isinstance(record[k], (int, float)))
        ]
        if bad or not isinstance(record["epoch"], int) or not isinstance(record["bn_gap"], list):
            return f"epoch record has non-numeric {', '.join(bad or ['epoch/bn_gap'])}"
    return None


def make(kind: str, **fields) -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    record = clean({"kind": kind, "schema": SCHEMA_VERSION, **fields})
    why = problem(record)
    if why:
        raise ValueError(why)
    return record
