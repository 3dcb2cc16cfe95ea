"""Records -> pandas tables (runs, epochs, per-layer gaps, drift, summary, mixed precision) -> CSV and Parquet.

The records (records.jsonl) are the source of truth: every table is rebuilt from them, the snapshots and
environment.json. Every file is written to a temporary name and renamed, so a failure never leaves half a
table. Reporting never decides pass/fail; tests assert on the same records.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from common import records as records_schema
from common.config import VARIANTS, RunConfig
from common.errors import ConfigError
from common.norms import array_role
from common.registry import FRAMEWORKS

from .files import NO_END, atomic, read_environment, read_records
from .metrics import RUN_METRICS, TRACE_METRICS
from .stats import seed_stats

RUN_INDEX = ["framework", "variant", "seed", "config_id"]
TABLES = ("epochs", "bn_gap", "drift", "summary", "runs", "errors")


def _fw_order(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "framework" not in frame:
        return frame
    orders = {"framework": {n: i for i, n in enumerate(FRAMEWORKS)}, "variant": {n: i for i, n in enumerate(VARIANTS)}}
    return frame.sort_values(
        by=[c for c in ["framework", "variant", "seed", "epoch", "layer"] if c in frame],
        key=lambda s: s.map(orders[s.name]) if s.name in orders else s,
        kind="stable",
    ).reset_index(drop=True)


def snapshot_distance(mine: Path, ref: Path) -> dict:
    """How far one snapshot's parameters, running statistics and probe logits are from another's: which array is
    which is common.norms.array_role's (the normalisations' table), so whitening's running covariance counts as a
    running statistic; counters (renorm's steps) count in neither."""
    with np.load(mine) as a, np.load(ref) as b:
        a, b = dict(a), dict(b)
    params = [k for k in b if k.startswith("param/")]
    trainable = [k for k in params if array_role(k) == "parameter"]
    running = [k for k in params if array_role(k) == "statistic"]

    def rel(keys):
        if not keys:
            return np.nan
        diff = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in keys)
        norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in keys)
        return np.sqrt(diff / norm) if norm else np.nan

    logits = np.abs(a["probe/logits_eval"].astype(np.float64) - b["probe/logits_eval"].astype(np.float64))
    same_pred = np.mean(a["probe/logits_eval"].argmax(1) == b["probe/logits_eval"].argmax(1))
    return {
        "param_rel_l2": rel(trainable),
        "running_stats_rel_l2": rel(running),
        "param_max_abs": max(
            float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in trainable
        ),
        "probe_logit_max_abs": float(logits.max()),
        "probe_logit_mad": float(logits.mean()),
        "probe_pred_agreement": float(same_pred),
    }


def _mixed_vs_float32(epochs: pd.DataFrame, records: list, run_dir: Path) -> pd.DataFrame:
    """Each mixed-precision run's epochs beside the float32 run of the same framework, variant, seed and
    everything else (its twin: the same configuration with mixed off): accuracy and train/eval divergence
    of both, and how far the mixed run's parameters, running statistics and probe logits are from the
    float32 run's (common.precision)."""
    configs = {
        r["config_id"]: r["config"]
        for r in records
        if r.get("kind") in ("plan", "run_start") and isinstance(r.get("config"), dict)
    }
    twins = {}
    for cid, config in configs.items():
        if config.get("mixed", "off") != "off":
            try:
                twins[cid] = RunConfig.from_dict(config).replace(mixed="off").config_id
            except ConfigError:
                continue  # a record from another version of the suite
    if epochs.empty or not twins:
        return pd.DataFrame()
    by_key = epochs.set_index(["framework", "config_id", "epoch"])
    rows = []
    for _, row in epochs[epochs.config_id.isin(list(twins))].iterrows():
        key = (row.framework, twins[row.config_id], row.epoch)
        if key not in by_key.index:
            continue
        base = by_key.loc[key]
        out = {
            "framework": row.framework,
            "variant": row.variant,
            "seed": row.seed,
            "config_id": row.config_id,
            "float32_config_id": twins[row.config_id],
            "epoch": row.epoch,
            "precision": f"mixed-{configs[row.config_id]['mixed']}",
        }
        for metric in ("test_acc", "probe_disagreement", "probe_logit_mad", "train_examples_per_s"):
            out[f"{metric}_mixed"], out[f"{metric}_float32"] = row[metric], base[metric]
        snapshots = (row.snapshot, base["snapshot"])
        if all(isinstance(x, str) and (run_dir / x).is_file() for x in snapshots):
            out.update(snapshot_distance(run_dir / snapshots[0], run_dir / snapshots[1]))
        rows.append(out)
    return pd.DataFrame(rows)


def _drift(epochs: pd.DataFrame, run_dir: Path, reference: str) -> pd.DataFrame:
    """Distance of each framework's parameters and probe logits from the reference's, per epoch."""
    rows = []
    if epochs.empty:
        return pd.DataFrame()
    ref_rows = epochs[epochs.framework == reference].set_index(["variant", "seed", "config_id", "epoch"])
    for _, row in epochs[epochs.framework != reference].iterrows():
        key = (row.variant, row.seed, row.config_id, row.epoch)
        if key not in ref_rows.index:
            continue
        if not isinstance(row.snapshot, str) or not isinstance(ref_rows.loc[key, "snapshot"], str):
            continue  # an epoch whose snapshot was not kept (a study keeps the final one)
        mine, ref = run_dir / row.snapshot, run_dir / ref_rows.loc[key, "snapshot"]
        if not (mine.is_file() and ref.is_file()):
            continue
        rows.append(
            {
                "framework": row.framework,
                "reference": reference,
                "variant": row.variant,
                "seed": row.seed,
                "config_id": row.config_id,
                "epoch": row.epoch,
                **snapshot_distance(mine, ref),
            }
        )
    return pd.DataFrame(rows)


def latest_attempts(records: list) -> list:
    """Each run's records from its last plan record on. A resumed study plans again the runs it
    re-runs, so what an interrupted attempt left is superseded, not counted twice."""
    last_plan = {}
    for i, r in enumerate(records):
        if r.get("kind") == "plan":
            last_plan[(r["framework"], r["config_id"])] = i
    return [r for i, r in enumerate(records) if i >= last_plan.get((r.get("framework"), r.get("config_id")), -1)]


def coordinates(records: list) -> dict:
    """config_id -> the grid coordinates its plan record carries (a study's cells; empty for a run)."""
    return {r["config_id"]: r["coords"] for r in records if r.get("kind") == "plan" and r.get("coords")}


POPULATION_COLUMNS = (
    "pop_test_loss",
    "pop_test_acc",
    "pop_probe_acc_eval",
    "pop_probe_logit_mad",
    "pop_probe_disagreement",
    "population_images",
    "population_seconds",
)


def _population(g: pd.DataFrame) -> dict:
    """A run's population figures (NaN where the run has none: off, or no BN layer)."""
    if "pop_test_acc" not in g or g.pop_test_acc.isna().all():
        return {}
    last = g.iloc[-1]
    return {
        "best_pop_test_acc": g.pop_test_acc.max(),
        "final_pop_test_acc": last.pop_test_acc,
        "final_pop_gain": last.pop_test_acc - last.test_acc,
        "final_pop_probe_disagreement": last.pop_probe_disagreement,
    }


def trace_tables(epochs: pd.DataFrame) -> tuple:
    """(trace_layers, trace_steps) from the epoch records' "trace" lists (--trace-every, common.trace): per traced
    step and layer, the activation input's percentiles (conv1 ... fc2) and the ICS (conv2 ... fc3); per traced
    step, the loss, gradient norm and landscape figures. Both empty without traces."""
    layer_rows, step_rows = [], []
    if "trace" not in epochs:
        return pd.DataFrame(), pd.DataFrame()
    for _, row in epochs.iterrows():
        for t in row["trace"] if isinstance(row["trace"], list) else []:
            ident = {**{k: row[k] for k in RUN_INDEX}, "epoch": t["epoch"], "step": t["step"]}
            land = t["landscape"]
            step_rows.append(
                {
                    **ident,
                    "loss": t["loss"],
                    "grad_norm": t["grad_norm"],
                    **{k: land[k] for k in ("loss_variation", "grad_predictiveness", "beta_smoothness")},
                    "trace_seconds": t["seconds"],
                }
            )
            layers = dict.fromkeys([*t["percentiles"], *t["ics"]])
            for layer in layers:
                pct, ics = t["percentiles"].get(layer), t["ics"].get(layer, {})
                layer_rows.append(
                    {
                        **ident,
                        "layer": layer,
                        **({} if pct is None else dict(zip(("p15", "p50", "p85"), pct["all"]))),
                        **({} if pct is None else dict(zip(("unit_p15", "unit_p50", "unit_p85"), pct["unit"]))),
                        "ics_rel_diff": ics.get("rel_diff"),
                        "ics_cos": ics.get("cos"),
                    }
                )
    return pd.DataFrame(layer_rows), pd.DataFrame(step_rows)


def _trace_metrics(layers: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Per run, the mean of each trace figure over its traced steps (and, for the ICS, its layers)."""
    if steps.empty:
        return pd.DataFrame(columns=["framework", "config_id"])
    by = ["framework", "config_id"]
    step_means = steps.groupby(by)[["loss_variation", "grad_predictiveness", "beta_smoothness", "grad_norm"]].mean()
    layer_means = layers.groupby(by)[["ics_rel_diff", "ics_cos"]].mean()
    both = step_means.join(layer_means).add_prefix("mean_").reset_index()
    return both.reindex(columns=[*by, *TRACE_METRICS])


def _run_metrics(epochs: pd.DataFrame) -> pd.DataFrame:
    if epochs.empty:
        return pd.DataFrame(columns=["framework", "config_id", *RUN_METRICS])
    rows = []
    for (fw, cid), g in epochs.sort_values("epoch").groupby(["framework", "config_id"], sort=False):
        last = g.iloc[-1]
        rows.append(
            {
                "framework": fw,
                "config_id": cid,
                "best_test_acc": g.test_acc.max(),
                "final_test_acc": last.test_acc,
                "final_train_loss": last.train_loss,
                "final_train_acc": last.train_acc,
                **{
                    f"final_{k}": last[k]
                    for k in ("probe_acc_eval", "probe_acc_train", "probe_disagreement", "probe_logit_mad")
                },
                "train_examples_per_s": g.train_examples_per_s.median(),
                **_population(g),
                **{f"final_{k}": last[k] for k in ("whiteness", "ks_uniform") if k in g and pd.notna(last[k])},
            }
        )
    return pd.DataFrame(rows).reindex(columns=["framework", "config_id", *RUN_METRICS])


def config_labels(config: dict) -> dict:
    """The normalisation (none for the variant without one), the activation and the precision of a run, from
    its configuration (records from before --norm and --precision ran BN, in their dtype)."""
    mixed, model = config.get("mixed", "off"), config.get("model", {})
    replicas, ghost = config.get("replicas", 1), model.get("ghost_batch", 0)
    return {
        "norm": "none" if model.get("variant") == "none" else model.get("norm", "batch"),
        "activation": model.get("activation", "sigmoid"),
        "precision": config.get("dtype") if mixed == "off" else f"mixed-{mixed}",
        # how the batch statistics are split (docs/data-parallel.md); absent for the one-process whole batch
        **({"data_parallel": f"{replicas} replicas, {config.get('bn_sync', 'local')} sync"} if replicas > 1 else {}),
        **({"data_parallel": f"ghost batches of {ghost}"} if ghost else {}),
    }


def _runs(records: list) -> pd.DataFrame:
    """One row per run (framework x configuration) the records know of, planned or seen, with its
    status: the status of its end record, or interrupted where it has none."""
    rows = {}
    for r in records:
        if r["kind"] not in ("plan", "run_start", "epoch", "run_end", "error"):
            continue
        row = rows.setdefault(
            (r["framework"], r["config_id"]),
            {
                **{k: r[k] for k in RUN_INDEX},
                "status": None,
                "epochs": None,
                "epochs_done": 0,
                "attempts": 1,
                "detail": None,
            },
        )
        if isinstance(r.get("config"), dict):  # plan and run_start
            row.update(config_labels(r["config"]))
        if r["kind"] == "plan":
            row["epochs"] = r["epochs"]
            row["attempts"] = r.get("attempt", 1)  # > 1: the executor ran it again after losing a worker
        elif r["kind"] == "run_start":
            row.update({f"backend_{k}": v for k, v in r["backend"].items()})

            row.update(
                data_verified=r.get("data_verified"),
                train_examples=r.get("train_examples"),
                test_examples=r.get("test_examples"),
            )
            if row["epochs"] is None and isinstance(r["config"], dict):
                row["epochs"] = r["config"].get("epochs")
        elif r["kind"] == "epoch":
            row["epochs_done"] = max(row["epochs_done"], r["epoch"])
        else:
            row["status"] = r["status"]
            row["detail"] = r.get("message")
            for key in ("error_type", "exit_status", "diverged_epoch", "diverged_step", "log_tail"):
                if r.get(key) is not None:
                    row[key] = r[key]
    for row in rows.values():
        if row["status"] is None:
            row["status"], row["detail"] = "interrupted", NO_END
    return pd.DataFrame(list(rows.values()))


def _with_run_columns(frame: pd.DataFrame, runs: pd.DataFrame, coords: dict) -> pd.DataFrame:
    """frame plus its run's status and grid coordinates (after the run's identity columns)."""
    if frame.empty or runs.empty:
        return frame
    status = runs.set_index(["framework", "config_id"]).status
    frame = frame.copy()
    frame["status"] = [status.get((f, c)) for f, c in zip(frame.framework, frame.config_id)]
    return _with_coords(frame, coords)


def coordinate_names(coords: dict) -> list:
    """The grid fields of coords (config_id -> coordinates), in order."""
    return list(dict.fromkeys(k for c in coords.values() for k in c))


def _with_coords(frame: pd.DataFrame, coords: dict) -> pd.DataFrame:
    # a grid field a table already has as a measured column (an epoch's warmup_steps) keeps the measured one
    names = [n for n in coordinate_names(coords) if n not in frame.columns]
    if frame.empty or not names:
        return frame
    frame = frame.copy()
    at = list(frame.columns).index("config_id") + 1
    for offset, name in enumerate(names):
        frame.insert(at + offset, name, [coords.get(c, {}).get(name) for c in frame.config_id])
    return frame


def tables(records: list, run_dir: Path, reference: str | None = None) -> dict:
    records = latest_attempts(records)
    coords = coordinates(records)
    epochs = pd.DataFrame([r for r in records if r.get("kind") == "epoch"])
    runs = _runs(records)
    if not runs.empty:
        runs = _with_coords(runs.merge(_run_metrics(epochs), on=["framework", "config_id"], how="left"), coords)
    errors = _with_coords(
        pd.DataFrame(
            [
                {k: r.get(k) for k in RUN_INDEX + ["status", "error_type", "message"]}
                for r in records
                if r.get("kind") == "error"
            ]
        ),
        coords,
    )
    gap_rows = []
    if not epochs.empty:
        for _, row in epochs.iterrows():
            for gap in row["bn_gap"] or []:
                gap_rows.append({**{k: row[k] for k in RUN_INDEX + ["epoch"]}, **gap})
        epochs = epochs.drop(columns=["bn_gap", "kind", "schema", "step_losses"], errors="ignore")
    bn_gap = pd.DataFrame(gap_rows)
    trace_layers, trace_steps = trace_tables(epochs)
    epochs = epochs.drop(columns=["trace"], errors="ignore")
    if not trace_steps.empty and not runs.empty:
        runs = runs.merge(_trace_metrics(trace_layers, trace_steps), on=["framework", "config_id"], how="left")
    if reference is None:
        frameworks = [f for f in FRAMEWORKS if not epochs.empty and f in set(epochs.framework)]
        reference = frameworks[0] if frameworks else None
    drift = _drift(epochs, Path(run_dir), reference) if reference else pd.DataFrame()
    mixed = _mixed_vs_float32(epochs, records, Path(run_dir))
    if not mixed.empty and not runs.empty and "running_stats_rel_l2" in mixed:
        final = mixed[mixed.epoch == mixed.groupby(["framework", "config_id"]).epoch.transform("max")]
        drift_of = {(r.framework, r.float32_config_id): 0.0 for r in final.itertuples()}
        drift_of.update({(r.framework, r.config_id): r.running_stats_rel_l2 for r in final.itertuples()})
        runs["final_running_stats_drift"] = [drift_of.get(key, np.nan) for key in zip(runs.framework, runs.config_id)]
    epochs, bn_gap, drift, trace_layers, trace_steps = (
        _with_run_columns(t, runs, coords) for t in (epochs, bn_gap, drift, trace_layers, trace_steps)
    )
    summary = _summary(epochs, runs, drift, coordinate_names(coords))
    frames = dict(epochs=epochs, bn_gap=bn_gap, drift=drift, summary=summary, runs=runs, errors=errors)
    if not mixed.empty:
        frames["mixed_precision"] = mixed
    if not trace_steps.empty:
        frames.update(trace_layers=trace_layers, trace_steps=trace_steps)
    return {name: _fw_order(frame) for name, frame in frames.items()}


def status_summary(statuses) -> str:
    """'complete', or the count of each status, e.g. '2 complete, 1 diverged'."""
    counts = pd.Series(list(statuses)).value_counts()
    if len(counts) == 1:
        return counts.index[0]
    return ", ".join(f"{counts[s]} {s}" for s in records_schema.STATUSES if s in counts)


def _with_ci(name: str, per_seed: pd.Series) -> dict:
    """name (the mean over seeds) with name_std, name_ci_low/high (95% t-interval) and name_n."""
    st = seed_stats(per_seed.tolist())
    return {
        name: st["mean"],
        f"{name}_std": st["std"],
        f"{name}_ci_low": st["ci_low"],
        f"{name}_ci_high": st["ci_high"],
        f"{name}_n": st["n"],
    }


def _summary(epochs, runs, drift, by=()) -> pd.DataFrame:
    """One row per framework x variant (x a study's grid coordinates `by`): statistics over seeds."""
    if runs.empty:
        return pd.DataFrame()
    rows = []
    keys = ["framework", "variant", *by]
    for values, group in _fw_order(runs).groupby(keys, sort=False, dropna=False):
        fw, variant = values[:2]
        done = group.epochs_done
        row = {
            **dict(zip(keys, values)),
            "status": status_summary(group.status),
            "seeds": group.seed.nunique(),
            "epochs": group.epochs.max(),
            # the epoch the final_* columns come from (a range when the seeds stopped apart)
            "final_epoch": str(done.max()) if done.min() == done.max() else f"{done.min()}-{done.max()}",
        }
        mine = epochs[(epochs.framework == fw) & epochs.config_id.isin(group.config_id)] if not epochs.empty else epochs
        if not mine.empty:
            seen = group.dropna(subset=["best_test_acc"])
            curve = mine.groupby("epoch").test_acc.mean()
            row.update(
                {
                    **_with_ci("final_test_acc", seen.final_test_acc),
                    **_with_ci("best_test_acc", seen.best_test_acc),
                    "best_epoch": int(curve.idxmax()),
                    "final_train_loss": seen.final_train_loss.mean(),
                    "train_examples_per_s": mine.train_examples_per_s.median(),
                    "warmup_examples_per_s": mine.warmup_examples_per_s.median(),
                    # epoch 1's first step, timed apart: a compiled mode's compilation (records before it: NaN)
                    "first_step_seconds": (
                        mine[mine.epoch == 1].first_step_seconds.median() if "first_step_seconds" in mine else np.nan
                    ),
                    "eval_examples_per_s": mine.eval_examples_per_s.median(),
                    **{
                        k: seen[k].mean()
                        for k in (
                            "final_probe_acc_eval",
                            "final_probe_acc_train",
                            "final_probe_disagreement",
                            "final_probe_logit_mad",
                            "final_pop_probe_disagreement",
                        )
                    },
                    **_with_ci("final_pop_test_acc", seen.final_pop_test_acc),
                    **_with_ci("final_pop_gain", seen.final_pop_gain),
                    "best_pop_test_acc": seen.best_pop_test_acc.mean(),
                    **{
                        k: mine[k].median() if k in mine else np.nan
                        for k in ("population_images", "population_seconds")
                    },
                }
            )
        info = group.dropna(subset=["backend_version"]) if "backend_version" in group else group.iloc[:0]
        if not info.empty:
            row.update(
                device=info.backend_device_name.iloc[0],
                version=info.backend_version.iloc[0],
                execution=info.backend_execution.iloc[0],
                bn_decay=info.backend_bn_decay.iloc[0],
                bn_epsilon=info.backend_bn_epsilon.iloc[0],
                norm=info.norm.iloc[0] if "norm" in info else "batch",
                **{
                    key: info[column].iloc[0]
                    for key, column in (
                        ("data_parallel", "data_parallel"),
                        ("replica_statistics", "backend_replica_statistics"),
                    )
                    if column in info and info[column].notna().any()
                },
                activation=info.activation.iloc[0] if "activation" in info else "sigmoid",
            )
        if "precision" not in row and "precision" in group and group.precision.notna().any():
            row["precision"] = group.precision.dropna().iloc[0]
        if not drift.empty and fw in set(drift.framework):
            d = drift[(drift.framework == fw) & drift.config_id.isin(group.config_id)]
            d = d[d.epoch == d.epoch.max()]
            row.update(final_param_rel_l2=d.param_rel_l2.mean(), final_probe_logit_max_abs=d.probe_logit_max_abs.mean())
        row["errors"] = int(group.status.isin(["crashed", "failed"]).sum())
        rows.append(row)
    return pd.DataFrame(rows)


# Markdown ----------------------------------------------------------------------
# The columns of each table that may come out empty (no drift with one framework, no error), so that its CSV
# still has a header and pandas reads it: what the table holds when it has rows.
EMPTY_COLUMNS = {
    "drift": [
        "framework",
        "reference",
        "variant",
        "seed",
        "config_id",
        "epoch",
        "param_rel_l2",
        "running_stats_rel_l2",
        "param_max_abs",
        "probe_logit_max_abs",
        "probe_logit_mad",
        "probe_pred_agreement",
    ],
    "errors": RUN_INDEX + ["status", "error_type", "message"],
    "bn_gap": RUN_INDEX + ["epoch", "layer", "mean_gap", "var_log_ratio"],
    "epochs": RUN_INDEX + ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"],
    "runs": RUN_INDEX + ["status"],
    "summary": ["framework", "variant", "status", "seeds"],
}


def write_tables(t: dict, out_dir: Path) -> list:
    """Each table as NAME.csv (with its header even when it has no row) and (where pyarrow is there and the
    table is not empty) NAME.parquet; returns the file names written."""
    written = []
    try:
        import pyarrow  # noqa: F401

        parquet = True
    except ImportError:
        parquet = False
    for name, frame in t.items():
        if frame.empty and len(frame.columns) == 0:
            frame = pd.DataFrame(columns=EMPTY_COLUMNS.get(name, ["framework", "variant"]))
        atomic(out_dir / f"{name}.csv", lambda p: frame.to_csv(p, index=False))
        written.append(f"{name}.csv")
        if parquet and not frame.empty:
            atomic(out_dir / f"{name}.parquet", lambda p: frame.to_parquet(p, index=False))
            written.append(f"{name}.parquet")
    return written


def load(run_dir: Path, reference: str | None = None) -> tuple:
    """(tables, environment, problems, number of usable records) of a run or study folder; problems are said
    in its report."""
    run_dir = Path(run_dir)
    env, env_problem = read_environment(run_dir)
    recs, skipped = read_records(run_dir)
    problems = [env_problem] if env_problem and (run_dir / "environment.json").exists() else []
    if skipped:
        problems.append(
            f"{len(skipped)} line(s) of records.jsonl could not be used and were skipped: "
            + "; ".join(f"line {n}: {why}" for n, why in skipped[:20])
            + (f"; and {len(skipped) - 20} more" if len(skipped) > 20 else "")
        )
    if env_problem:
        print(f"warning: {env_problem}", file=sys.stderr)
    return tables(recs, run_dir, reference or env.get("reference")), env, problems, len(recs)
