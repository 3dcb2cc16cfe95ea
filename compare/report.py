"""Records -> pandas tables -> CSV and Parquet, report.md, PNG plots.

`python -m compare.report DIR` rebuilds everything in DIR from records.jsonl,
environment.json and the snapshots. Every file is written to a temporary name
and renamed, so a failure never leaves half a report. Reporting never decides
pass/fail; tests assert on the same records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from common import records as records_schema
from common.config import RUNNING_NORMS, VARIANTS, RunConfig
from common.errors import ConfigError
from common.registry import FRAMEWORKS

from .stats import clipped, metric_bounds, seed_stats

RUN_INDEX = ["framework", "variant", "seed", "config_id"]
TABLES = ("epochs", "bn_gap", "drift", "summary", "runs", "errors")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj) -> None:
    _atomic(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def read_records(run_dir: Path) -> tuple:
    """(records, skipped): every usable record of records.jsonl, and (line number, reason) for each
    line that could not be used. A bad line never stops the report."""
    path = Path(run_dir) / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a bn-compare run directory?")
    out, skipped = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append((number, "not UTF-8 text"))
            continue
        except json.JSONDecodeError:
            skipped.append((number, "not valid JSON (a line cut by a crash?)"))
            continue
        why = records_schema.problem(record)
        if why:
            skipped.append((number, why))
        else:
            out.append(record)
    for number, why in skipped:
        print(f"warning: {path}:{number}: {why}; skipped", file=sys.stderr)
    return out, skipped


def read_environment(run_dir: Path) -> tuple:
    """(environment dict, problem or None): a missing or corrupt environment.json is reported, not fatal."""
    path = Path(run_dir) / "environment.json"
    if not path.is_file():
        return {}, f"{path.name} is missing (the runner was stopped before writing it?)"
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path.name} is corrupt ({exc}); the tables are built without it"
    if not isinstance(env, dict):
        return {}, f"{path.name} holds a JSON {type(env).__name__}, not an object; the tables are built without it"
    return env, None


def _fw_order(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "framework" not in frame:
        return frame
    orders = {"framework": {n: i for i, n in enumerate(FRAMEWORKS)},
              "variant": {n: i for i, n in enumerate(VARIANTS)}}
    return frame.sort_values(by=[c for c in ["framework", "variant", "seed", "epoch", "layer"] if c in frame],
                             key=lambda s: s.map(orders[s.name]) if s.name in orders else s,
                             kind="stable").reset_index(drop=True)


def snapshot_distance(mine: Path, ref: Path) -> dict:
    """How far one snapshot's parameters, running statistics and probe logits are from another's."""
    with np.load(mine) as a, np.load(ref) as b:
        a, b = dict(a), dict(b)
    trainable = [k for k in b if k.startswith("param/") and not k.endswith(("running_mean", "running_var", "steps"))]
    running = [k for k in b if k.startswith("param/") and k.endswith(("running_mean", "running_var"))]

    def rel(keys):
        if not keys:
            return np.nan
        diff = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in keys)
        norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in keys)
        return np.sqrt(diff / norm) if norm else np.nan

    logits = np.abs(a["probe/logits_eval"].astype(np.float64) - b["probe/logits_eval"].astype(np.float64))
    same_pred = np.mean(a["probe/logits_eval"].argmax(1) == b["probe/logits_eval"].argmax(1))
    return {"param_rel_l2": rel(trainable), "running_stats_rel_l2": rel(running),
            "param_max_abs": max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
                                 for k in trainable),
            "probe_logit_max_abs": float(logits.max()), "probe_logit_mad": float(logits.mean()),
            "probe_pred_agreement": float(same_pred)}


def _mixed_vs_float32(epochs: pd.DataFrame, records: list, run_dir: Path) -> pd.DataFrame:
    """Each mixed-precision run's epochs beside the float32 run of the same framework, variant, seed and
    everything else (its twin: the same configuration with mixed off): accuracy and train/eval divergence
    of both, and how far the mixed run's parameters, running statistics and probe logits are from the
    float32 run's (common.precision)."""
    configs = {r["config_id"]: r["config"] for r in records if r.get("kind") in ("plan", "run_start")
               and isinstance(r.get("config"), dict)}
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
        out = {"framework": row.framework, "variant": row.variant, "seed": row.seed, "config_id": row.config_id,
               "float32_config_id": twins[row.config_id], "epoch": row.epoch,
               "precision": f"mixed-{configs[row.config_id]['mixed']}"}
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
        rows.append({"framework": row.framework, "reference": reference, "variant": row.variant,
                     "seed": row.seed, "config_id": row.config_id, "epoch": row.epoch,
                     **snapshot_distance(mine, ref)})
    return pd.DataFrame(rows)


NO_END = "no end record: the runner stopped before it could write one"


def latest_attempts(records: list) -> list:
    """Each run's records from its last plan record on. A resumed study plans again the runs it
    re-runs, so what an interrupted attempt left is superseded, not counted twice."""
    last_plan = {}
    for i, r in enumerate(records):
        if r.get("kind") == "plan":
            last_plan[(r["framework"], r["config_id"])] = i
    return [r for i, r in enumerate(records)
            if i >= last_plan.get((r.get("framework"), r.get("config_id")), -1)]


def coordinates(records: list) -> dict:
    """config_id -> the grid coordinates its plan record carries (a study's cells; empty for a run)."""
    return {r["config_id"]: r["coords"] for r in records if r.get("kind") == "plan" and r.get("coords")}


# Per run, from its epochs (runs table): name -> (what it is, which way is better). A study aggregates
# these over seeds and answers with them.
RUN_METRICS = {
    "best_test_acc": ("best test accuracy", "higher"),
    "final_test_acc": ("final test accuracy", "higher"),
    "final_train_loss": ("final training loss", "lower"),
    "final_probe_disagreement": ("train/eval prediction disagreement", "lower"),
    "final_probe_logit_mad": ("train/eval mean |logit difference|", "lower"),
    "final_probe_acc_eval": ("probe accuracy in eval mode", "higher"),
    "final_probe_acc_train": ("probe accuracy in train mode", "higher"),
    "train_examples_per_s": ("training examples/s", "higher"),
    # with population statistics in place of the running average (common.population); NaN where off
    "best_pop_test_acc": ("best test accuracy with population statistics", "higher"),
    "final_pop_test_acc": ("final test accuracy with population statistics", "higher"),
    "final_pop_gain": ("final test accuracy, population statistics minus running average", "higher"),
    "final_pop_probe_disagreement": ("train/eval prediction disagreement with population statistics", "lower"),
}
POPULATION_COLUMNS = ("pop_test_loss", "pop_test_acc", "pop_probe_acc_eval", "pop_probe_logit_mad",
                      "pop_probe_disagreement", "population_images", "population_seconds")


def _population(g: pd.DataFrame) -> dict:
    """A run's population figures (NaN where the run has none: off, or no BN layer)."""
    if "pop_test_acc" not in g or g.pop_test_acc.isna().all():
        return {}
    last = g.iloc[-1]
    return {"best_pop_test_acc": g.pop_test_acc.max(), "final_pop_test_acc": last.pop_test_acc,
            "final_pop_gain": last.pop_test_acc - last.test_acc,
            "final_pop_probe_disagreement": last.pop_probe_disagreement}


def _run_metrics(epochs: pd.DataFrame) -> pd.DataFrame:
    if epochs.empty:
        return pd.DataFrame(columns=["framework", "config_id", *RUN_METRICS])
    rows = []
    for (fw, cid), g in epochs.sort_values("epoch").groupby(["framework", "config_id"], sort=False):
        last = g.iloc[-1]
        rows.append({"framework": fw, "config_id": cid, "best_test_acc": g.test_acc.max(),
                     "final_test_acc": last.test_acc, "final_train_loss": last.train_loss,
                     **{f"final_{k}": last[k] for k in ("probe_acc_eval", "probe_acc_train",
                                                         "probe_disagreement", "probe_logit_mad")},
                     "train_examples_per_s": g.train_examples_per_s.median(), **_population(g)})
    return pd.DataFrame(rows).reindex(columns=["framework", "config_id", *RUN_METRICS])


def config_labels(config: dict) -> dict:
    """The normalisation and the precision of a run, from its configuration (records from before --norm
    and --precision ran BN, in their dtype)."""
    mixed = config.get("mixed", "off")
    return {"norm": config.get("model", {}).get("norm", "batch"),
            "precision": config.get("dtype") if mixed == "off" else f"mixed-{mixed}"}


def _runs(records: list) -> pd.DataFrame:
    """One row per run (framework x configuration) the records know of, planned or seen, with its
    status: the status of its end record, or interrupted where it has none."""
    rows = {}
    for r in records:
        if r["kind"] not in ("plan", "run_start", "epoch", "run_end", "error"):
            continue
        row = rows.setdefault((r["framework"], r["config_id"]), {
            **{k: r[k] for k in RUN_INDEX}, "status": None, "epochs": None, "epochs_done": 0, "attempts": 1,
            "detail": None})
        if isinstance(r.get("config"), dict):  # plan and run_start
            row.update(config_labels(r["config"]))
        if r["kind"] == "plan":
            row["epochs"] = r["epochs"]
            row["attempts"] = r.get("attempt", 1)  # > 1: the executor ran it again after losing a worker
        elif r["kind"] == "run_start":
            row.update({f"backend_{k}": v for k, v in r["backend"].items()})

            row.update(data_verified=r.get("data_verified"), train_examples=r.get("train_examples"),
                       test_examples=r.get("test_examples"))
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
    errors = _with_coords(pd.DataFrame([{k: r.get(k) for k in RUN_INDEX + ["status", "error_type", "message"]}
                                        for r in records if r.get("kind") == "error"]), coords)
    gap_rows = []
    if not epochs.empty:
        for _, row in epochs.iterrows():
            for gap in row["bn_gap"] or []:
                gap_rows.append({**{k: row[k] for k in RUN_INDEX + ["epoch"]}, **gap})
        epochs = epochs.drop(columns=["bn_gap", "kind", "schema", "step_losses"], errors="ignore")
    bn_gap = pd.DataFrame(gap_rows)
    if reference is None:
        frameworks = [f for f in FRAMEWORKS if not epochs.empty and f in set(epochs.framework)]
        reference = frameworks[0] if frameworks else None
    drift = _drift(epochs, Path(run_dir), reference) if reference else pd.DataFrame()
    mixed = _mixed_vs_float32(epochs, records, Path(run_dir))
    epochs, bn_gap, drift = (_with_run_columns(t, runs, coords) for t in (epochs, bn_gap, drift))
    summary = _summary(epochs, runs, drift, coordinate_names(coords))
    frames = dict(epochs=epochs, bn_gap=bn_gap, drift=drift, summary=summary, runs=runs, errors=errors)
    if not mixed.empty:
        frames["mixed_precision"] = mixed
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
    return {name: st["mean"], f"{name}_std": st["std"], f"{name}_ci_low": st["ci_low"],
            f"{name}_ci_high": st["ci_high"], f"{name}_n": st["n"]}


def _summary(epochs, runs, drift, by=()) -> pd.DataFrame:
    """One row per framework x variant (x a study's grid coordinates `by`): statistics over seeds."""
    if runs.empty:
        return pd.DataFrame()
    rows = []
    keys = ["framework", "variant", *by]
    for values, group in _fw_order(runs).groupby(keys, sort=False, dropna=False):
        fw, variant = values[:2]
        done = group.epochs_done
        row = {**dict(zip(keys, values)), "status": status_summary(group.status),
               "seeds": group.seed.nunique(), "epochs": group.epochs.max(),
               # the epoch the final_* columns come from (a range when the seeds stopped apart)
               "final_epoch": str(done.max()) if done.min() == done.max() else f"{done.min()}-{done.max()}"}
        mine = (epochs[(epochs.framework == fw) & epochs.config_id.isin(group.config_id)] if not epochs.empty
                else epochs)
        if not mine.empty:
            seen = group.dropna(subset=["best_test_acc"])
            curve = mine.groupby("epoch").test_acc.mean()
            row.update({
                **_with_ci("final_test_acc", seen.final_test_acc),
                **_with_ci("best_test_acc", seen.best_test_acc),
                "best_epoch": int(curve.idxmax()),
                "final_train_loss": seen.final_train_loss.mean(),
                "train_examples_per_s": mine.train_examples_per_s.median(),
                "warmup_examples_per_s": mine.warmup_examples_per_s.median(),
                # epoch 1's first step, timed apart: a compiled mode's compilation (records before it: NaN)
                "first_step_seconds": (mine[mine.epoch == 1].first_step_seconds.median()
                                       if "first_step_seconds" in mine else np.nan),
                "eval_examples_per_s": mine.eval_examples_per_s.median(),
                **{k: seen[k].mean() for k in ("final_probe_acc_eval", "final_probe_acc_train",
                                               "final_probe_disagreement", "final_probe_logit_mad",
                                               "final_pop_probe_disagreement")},
                **_with_ci("final_pop_test_acc", seen.final_pop_test_acc),
                **_with_ci("final_pop_gain", seen.final_pop_gain),
                "best_pop_test_acc": seen.best_pop_test_acc.mean(),
                **{k: mine[k].median() if k in mine else np.nan for k in ("population_images", "population_seconds")},
            })
        info = group.dropna(subset=["backend_version"]) if "backend_version" in group else group.iloc[:0]
        if not info.empty:
            row.update(device=info.backend_device_name.iloc[0], version=info.backend_version.iloc[0],
                       execution=info.backend_execution.iloc[0], bn_decay=info.backend_bn_decay.iloc[0],
                       bn_epsilon=info.backend_bn_epsilon.iloc[0],
                       norm=info.norm.iloc[0] if "norm" in info else "batch")
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
def interval_text(low, high, column: str, bounds: tuple | None = None) -> str:
    """A 95% interval as [low, high], clipped to what the metric can be (the tables keep it unclipped)."""
    low, high = clipped(float(low), float(high), bounds or metric_bounds(column))
    return f"[{_fmt(low, column)}, {_fmt(high, column)}]"


def two_seed_note(frame: pd.DataFrame, what: str) -> str:
    """A sentence for the rows whose interval rests on two seeds ('' if none)."""
    ns = [c for c in frame.columns if c.endswith("_n") and f"{c[:-2]}_ci_high" in frame] if not frame.empty else []
    two = frame[(frame[ns] == 2).any(axis=1)] if ns else frame.iloc[:0]
    if two.empty:
        return ""
    who = f"every {what}" if len(two) == len(frame) else f"{len(two)} of {len(frame)} {what}s"
    return (f"The intervals of {who} (n=2) rest on two seeds: t(0.975, 1) = 12.71, so they are wide and say "
            f"little; more seeds (`--seeds 0,1,2,3,4`) narrow them.\n")


def _fmt(value, column: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        if column.endswith("_per_s"):
            return f"{value:,.0f}"
        if column.endswith(("_acc", "_acc_eval", "_acc_train", "disagreement", "agreement", "_gain")):
            return f"{value:.4f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, columns: list | None = None) -> str:
    if frame is None or frame.empty:
        return "_(none)_\n"
    columns = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    if "precision" in frame and "variant" in columns and "precision" not in columns:  # every row says its precision
        columns.insert(columns.index("variant") + 1, "precision")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = [_fmt(row[c], c) for c in columns]
        for i, c in enumerate(columns):  # a mean over seeds shows its 95% interval
            high = row.get(f"{c}_ci_high")
            if cells[i] and high is not None and not pd.isna(high):
                cells[i] += " " + interval_text(row[f"{c}_ci_low"], high, c)
        if "status" in row and row["status"] != "complete":  # never read as a finished run
            for i, c in enumerate(columns):
                if c == "status":
                    cells[i] = f"**{cells[i]}**"
                elif c in ("best_test_acc", "final_test_acc") and cells[i] and "final_epoch" in row:
                    cells[i] += f" (to epoch {row['final_epoch']} of {_fmt(row.get('epochs'), 'epochs')})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Plots -------------------------------------------------------------------------
def _plots(t: dict, run_dir: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panels(frame):  # with more than one precision, a panel per variant and precision
        if "precision" in frame and frame.precision.nunique() > 1:
            return frame.assign(variant=frame.variant + ", " + frame.precision.astype(str))
        return frame

    epochs = panels(t["epochs"])
    made = []
    if epochs.empty:
        return made
    variants = list(dict.fromkeys(epochs.variant))
    mean = epochs.groupby(["framework", "variant", "epoch"], sort=False).mean(numeric_only=True).reset_index()

    def per_variant(name, metrics, title, frame=mean, ylabels=None, dashed=None):
        fig, axes = plt.subplots(len(metrics), len(variants), figsize=(3.6 * len(variants), 2.8 * len(metrics)),
                                 squeeze=False, sharex=True)
        for i, metric in enumerate(metrics):
            for j, variant in enumerate(variants):
                ax = axes[i][j]
                for fw, g in frame[frame.variant == variant].groupby("framework", sort=False):
                    line, = ax.plot(g.epoch, g[metric], marker="o", ms=3, label=fw)
                    twin = (dashed or {}).get(metric)
                    if twin in g and g[twin].notna().any():
                        ax.plot(g.epoch, g[twin], ls="--", marker="x", ms=3, color=line.get_color(),
                                label=f"{fw} (population statistics)")
                if i == 0:
                    ax.set_title(variant)
                if j == 0:
                    ax.set_ylabel((ylabels or metrics)[i])
                if i == len(metrics) - 1:
                    ax.set_xlabel("epoch")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        _atomic(run_dir / name, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        made.append(name)

    population = {"test_acc": "pop_test_acc", "probe_disagreement": "pop_probe_disagreement"}
    per_variant("curves.png", ["train_loss", "train_acc", "test_acc"],
                "Training curves (mean over seeds; test in eval mode; dashed: population statistics)",
                dashed=population)
    per_variant("divergence.png", ["probe_logit_mad", "probe_disagreement"],
                "Train-mode vs eval-mode BN on the probe set (dashed: population statistics)",
                ylabels=["mean |logit diff|", "prediction disagreement"], dashed=population)
    if not t["drift"].empty:
        drift = panels(t["drift"]).groupby(["framework", "variant", "epoch"], sort=False).mean(
            numeric_only=True).reset_index()
        ref = t["drift"].reference.iloc[0]
        per_variant("drift.png", ["param_rel_l2", "probe_logit_max_abs"], f"Drift from {ref}", frame=drift,
                    ylabels=["param rel. L2", "max |logit diff|"])
    summary = panels(t["summary"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(variants)), 3.4))
    frameworks = list(dict.fromkeys(summary.framework))
    width = 0.8 / max(1, len(frameworks))
    for k, fw in enumerate(frameworks):
        s = summary[summary.framework == fw].set_index("variant").reindex(variants)
        ax.bar(np.arange(len(variants)) + k * width, s.train_examples_per_s, width, label=fw)
    ax.set_xticks(np.arange(len(variants)) + width * (len(frameworks) - 1) / 2, variants)
    ax.set_ylabel("train examples/s (median epoch)")
    ax.set_title("Training throughput")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _atomic(run_dir / "throughput.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    made.append("throughput.png")
    return made


SUMMARY_COLUMNS = ["framework", "variant", "status", "seeds", "epochs", "best_test_acc", "best_epoch",
                   "final_test_acc", "train_examples_per_s", "first_step_seconds", "eval_examples_per_s", "execution",
                   "device"]
DIVERGENCE_COLUMNS = ["framework", "variant", "status", "final_probe_acc_eval", "final_probe_acc_train",
                      "final_probe_disagreement", "final_probe_logit_mad"]
CONVENTION_COLUMNS = ["framework", "variant", "norm", "version", "bn_decay", "bn_epsilon"]
UNFINISHED_COLUMNS = ["framework", "variant", "seed", "status", "epochs_done", "epochs", "detail"]


POPULATION_SUMMARY_COLUMNS = ["framework", "variant", "status", "final_test_acc", "final_pop_test_acc",
                              "final_pop_gain", "final_probe_disagreement", "final_pop_probe_disagreement",
                              "population_images", "population_seconds"]
LAG_NOISE_COLUMNS = ["framework", "variant", "layer", "lag_mean_gap", "lag_var_log_ratio", "noise_mean_gap",
                     "noise_var_log_ratio"]


def final_epoch_gaps(gap: pd.DataFrame) -> pd.DataFrame:
    """The bn_gap table's final epoch per framework and variant, each layer's figures averaged over seeds."""
    last = gap[gap.epoch == gap.groupby(by_run(gap)).epoch.transform("max")]
    return last.groupby(by_run(gap) + ["layer"], sort=False).mean(numeric_only=True).reset_index()


def by_run(frame: pd.DataFrame) -> list:
    """framework, variant, and precision where the frame has more than one: the keys of a report row."""
    multi = "precision" in frame and frame.precision.nunique() > 1
    return ["framework", "variant"] + (["precision"] if multi else [])


def who(row, frame: pd.DataFrame) -> str:
    """How a sentence names a report row: framework and variant, and its precision where there are several."""
    return " ".join(str(row[k]) for k in by_run(frame))


def population_answer(summary: pd.DataFrame) -> list:
    """Per framework and variant with population statistics, in sentences made from the final epoch's
    numbers: how many points the running average (EMA) costs, and how much of the train/eval
    disagreement remains with population statistics."""
    if summary.empty or "final_pop_test_acc" not in summary:
        return []
    sentences = []
    for _, row in summary.dropna(subset=["final_pop_test_acc"]).iterrows():
        gain = row.final_pop_gain * 100
        cost = (f"the EMA costs {gain:.2f} points" if gain > 0 else
                f"the EMA is {-gain:.2f} points better" if gain < 0 else "the two are equal")
        text = (f"{who(row, summary)}: final test accuracy {row.final_test_acc:.4f} with the running "
                f"average (EMA), {row.final_pop_test_acc:.4f} with population statistics from "
                f"{int(row.population_images):,} training images: {cost}")
        if not pd.isna(row.get("final_pop_gain_ci_high")):
            low, high = clipped(row.final_pop_gain_ci_low, row.final_pop_gain_ci_high, metric_bounds("final_pop_gain"))
            text += (f" (95% interval over {int(row.final_pop_gain_n)} seeds {low * 100:+.2f} to {high * 100:+.2f}"
                     f"{', beyond seed noise' if low > 0 or high < 0 else ', within seed noise'})")
        ema, pop = row.final_probe_disagreement, row.final_pop_probe_disagreement
        if ema > 0:
            text += (f". Train/eval prediction disagreement on the probe: {ema:.1%} with the EMA, {pop:.1%} with "
                     f"population statistics, so {pop / ema:.0%} of it remains (batch noise) and {1 - pop / ema:.0%} "
                     f"was the EMA's lag.")
        else:
            text += f". Train and eval mode agree on every probe image with the EMA ({pop:.1%} with population statistics)."
        sentences.append(text)
    return sentences


def population_section(t: dict) -> list:
    """report.md's section on population statistics ([] when the run has none)."""
    s = t["summary"]
    answer = population_answer(s)
    if not answer:
        return []
    parts = ["## Population statistics: what the train/eval gap is made of (final epoch)\n",
             "Eval mode with each BN layer's population statistics (every weight fixed, train-mode batches of "
             "the run's batch size over `population_images` training images (`--population-size`, at most "
             "the training split): the mean of the batch means and the exact variance over all their values) beside eval mode with the running average (EMA) each "
             "framework keeps. `final_pop_gain`: population minus EMA test accuracy. The headline accuracies "
             "above stay the EMA's. `population_seconds`: the time to compute them and evaluate with them, "
             "apart from training.\n"]
    parts += [f"- {sentence}" for sentence in answer] + [""]
    parts.append(markdown_table(s.dropna(subset=["final_pop_test_acc"]), POPULATION_SUMMARY_COLUMNS))
    gap = t["bn_gap"]
    if not gap.empty and "lag_mean_gap" in gap:
        last = final_epoch_gaps(gap.dropna(subset=["lag_mean_gap"]))
        parts += ["Per BN layer: `lag_*` is the EMA against the population statistics (the EMA's lag), `noise_*` "
                  "the probe's batch statistics against them (batch noise), in the units of `mean_gap` / "
                  "`var_log_ratio` below (population standard deviations; |log variance ratio|).\n",
                  markdown_table(last, LAG_NOISE_COLUMNS)]
    return parts


MIXED_COLUMNS = ["framework", "variant", "precision", "seeds", "test_acc_mixed", "test_acc_float32",
                 "probe_disagreement_mixed", "probe_disagreement_float32", "param_rel_l2", "running_stats_rel_l2",
                 "probe_pred_agreement", "speed_ratio"]


def mixed_precision_section(t: dict) -> list:
    """The final epoch of each mixed-precision run beside its float32 twin (same seed, initial weights and
    batches), averaged over seeds, with sentences made from the numbers."""
    mixed = t.get("mixed_precision")
    if mixed is None or mixed.empty:
        return []
    last = mixed[mixed.epoch == mixed.groupby(["framework", "config_id"]).epoch.transform("max")]
    rows = []
    for (fw, variant, precision), g in last.groupby(["framework", "variant", "precision"], sort=False):
        rows.append({"framework": fw, "variant": variant, "precision": precision, "seeds": g.seed.nunique(),
                     **g.mean(numeric_only=True).drop(["seed", "epoch"], errors="ignore").to_dict(),
                     "speed_ratio": float((g.train_examples_per_s_mixed / g.train_examples_per_s_float32).median())})
    table = pd.DataFrame(rows)
    sentences = []
    for _, r in table.iterrows():
        sentences.append(
            f"- {r.framework} {r.variant}: final test accuracy {r.test_acc_mixed:.4f} in {r.precision} against "
            f"{r.test_acc_float32:.4f} in float32 ({100 * (r.test_acc_mixed - r.test_acc_float32):+.2f} points); "
            f"train/eval disagreement {100 * r.probe_disagreement_mixed:.1f}% against "
            f"{100 * r.probe_disagreement_float32:.1f}%; the parameters are {r.param_rel_l2:.2g} (relative L2) "
            f"and the running statistics {r.running_stats_rel_l2:.2g} from the float32 run's, and the two "
            f"predict the same class for {100 * r.probe_pred_agreement:.1f}% of the probe images.")
    devices = t["summary"].get("device", pd.Series(dtype=str)).dropna() if "summary" in t else pd.Series(dtype=str)
    cpu = not devices.empty and devices.astype(str).str.startswith("CPU").all()
    speed = ("`speed_ratio` is the mixed run's training throughput over the float32 run's (median over seeds). "
             + ("These ran on a CPU: bfloat16 there is emulated unless the processor has bfloat16 instructions "
                "(AVX512_BF16, AMX), so a ratio below 1 says nothing of a GPU; docs/precision.md gives GPU figures where "
                "one was measured." if cpu else ""))
    return ["## Mixed precision against float32 (final epoch)\n",
            "Each mixed-precision run beside the float32 run of the same seed, initial weights and batches "
            "(parameters, the update and the loss stay float32 in both; common/precision.py), averaged over "
            "seeds. `param_rel_l2` / `running_stats_rel_l2`: relative L2 distance of the trained parameters "
            "and of the BN running statistics from the float32 run's.\n",
            markdown_table(table, MIXED_COLUMNS), *sentences, "", speed + "\n"]


def render_markdown(t: dict, env: dict, plots: list, written: list, problems: list) -> str:
    s = t["summary"]
    parts = [f"# bn-compare report {env.get('run_id', '')}\n"]
    if env.get("interrupted"):
        parts.append(f"**This run was interrupted ({env.get('signal') or 'by a signal'}).** What was measured "
                     f"before that is below; every run it stopped is marked `interrupted`.\n")
    parts += [f"- command: `{env.get('command', '?')}`",
              f"- machine: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores), {env.get('platform', '?')}",
              f"- data: {env.get('data_dir', '?')} (" +
              ("checksums verified" if env.get("data_verified", True) else "**not** the verified Fashion-MNIST") + ")",
              f"- drift reference: {env.get('reference', '?')}; wall time {env.get('seconds', '?')} s\n"]
    if problems:
        parts += ["## Problems reading this run\n"] + [f"- {p}" for p in problems] + [""]
    parts += ["## Summary\n",
              "Test accuracy is measured in eval mode (running statistics) after each epoch; `best_test_acc` is "
              "the best epoch's, averaged over seeds. Throughput is the median epoch's training examples/s over "
              "the timed steps (the first warm-up steps of each epoch excluded, the device synchronised at the "
              "boundaries). A `status` other than complete is in bold, and its accuracies say the last epoch "
              "they come from. `[low, high]`: the 95% t-interval over seeds, clipped to what the metric can be "
              "(accuracies to [0, 1]; the CSV/Parquet tables keep the unclipped `_ci_low`/`_ci_high`).\n",
              markdown_table(s, SUMMARY_COLUMNS), two_seed_note(s, "row")]
    if not s.empty and "best_test_acc_n" in s and (s.best_test_acc_n.fillna(0) <= 1).any():
        one = s[s.best_test_acc_n.fillna(0) <= 1]
        who = "Every row rests" if len(one) == len(s) else f"{len(one)} of {len(s)} rows rest"
        parts.append(f"{who} on one seed (or none): no spread between seeds is measured, so no interval is "
                     f"given; `--seeds 0,1,2` gives one.\n")
    runs = t["runs"]
    unfinished = runs[runs.status != "complete"] if not runs.empty else runs
    if not unfinished.empty:
        parts += ["## Runs that did not complete\n",
                  "`diverged`: the training loss stopped being finite (a result: the epoch and step are given); "
                  "`interrupted`: stopped by a signal; `crashed`: the worker died or raised during training; "
                  "`failed`: an error before training.\n",
                  markdown_table(unfinished, UNFINISHED_COLUMNS)]
    norms = sorted(set(s.norm.dropna())) if "norm" in s else []
    stateless = [n for n in norms if n not in RUNNING_NORMS]
    parts += ["## Train/eval-mode divergence (final epoch)\n",
              "The same probe images through the network in train mode (batch statistics, nothing updated) and "
              "eval mode (running statistics).\n" + (
                  f" {' and '.join(stateless).capitalize()} normalisation keep{'s' if len(stateless) == 1 else ''} no "
                  f"running statistics: train and eval mode are the same computation, so its divergence is 0; it is "
                  f"measured all the same, a check of the harness.\n" if stateless else ""),
              markdown_table(s, DIVERGENCE_COLUMNS)]
    parts += mixed_precision_section(t)
    parts += population_section(t)
    gap = t["bn_gap"]
    if not gap.empty:
        last = final_epoch_gaps(gap)
        parts += ["### Batch vs running statistics per BN layer (final epoch)\n",
                  "`mean_gap`: |batch mean - running mean| in running standard deviations; `var_log_ratio`: "
                  "|log(batch var / running var)|; both averaged over features.\n",
                  markdown_table(last, ["framework", "variant", "layer", "mean_gap", "var_log_ratio"])]
    drift = t["drift"]
    if not drift.empty:
        last = drift[drift.epoch == drift.epoch.max()]
        last = last.groupby(by_run(last), sort=False).mean(numeric_only=True).reset_index()
        parts += [f"## Cross-framework drift from {drift.reference.iloc[0]} (final epoch)\n",
                  "Same initial weights and batches; relative L2 distance of all trainable parameters and of "
                  "the BN running statistics, and the probe logits' distance.\n",
                  markdown_table(last, ["framework", "variant", "param_rel_l2", "running_stats_rel_l2",
                                        "probe_logit_max_abs", "probe_pred_agreement"])]
    parts += ["## Normalisation conventions in effect\n",
              "The normalisation (`--norm`; batch is BN) and the decay and epsilon its layers really used "
              "(builtin-defaults shows each framework's own; no decay: no running statistics).\n",
              markdown_table(s, CONVENTION_COLUMNS)]
    if not t["errors"].empty:
        parts += ["## Errors\n", markdown_table(t["errors"], ["framework", "variant", "seed", "status", "error_type",
                                                              "message"])]
    if plots:
        parts.append("## Plots\n")
        parts += [f"![{p}]({p})\n" for p in plots]
    parts += ["## Files\n", ", ".join(f"`{w}`" for w in written) + "\n"]
    return "\n".join(parts)


def write_tables(t: dict, out_dir: Path) -> list:
    """Each table as NAME.csv and (where pyarrow is there and the table is not empty) NAME.parquet;
    returns the file names written."""
    written = []
    try:
        import pyarrow  # noqa: F401
        parquet = True
    except ImportError:
        parquet = False
    for name, frame in t.items():
        _atomic(out_dir / f"{name}.csv", lambda p: frame.to_csv(p, index=False))
        written.append(f"{name}.csv")
        if parquet and not frame.empty:
            _atomic(out_dir / f"{name}.parquet", lambda p: frame.to_parquet(p, index=False))
            written.append(f"{name}.parquet")
    return written


def load(run_dir: Path, reference: str | None = None) -> tuple:
    """(tables, environment, problems, number of usable records) of a run or study folder; problems are said in its report."""
    run_dir = Path(run_dir)
    env, env_problem = read_environment(run_dir)
    recs, skipped = read_records(run_dir)
    problems = [env_problem] if env_problem and (run_dir / "environment.json").exists() else []
    if skipped:
        problems.append(f"{len(skipped)} line(s) of records.jsonl could not be used and were skipped: " +
                        "; ".join(f"line {n}: {why}" for n, why in skipped[:20]) +
                        (f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""))
    if env_problem:
        print(f"warning: {env_problem}", file=sys.stderr)
    return tables(recs, run_dir, reference or env.get("reference")), env, problems, len(recs)


def build(run_dir, reference: str | None = None) -> tuple:
    """(Re)build every table, plot and report.md in run_dir. Returns (the summary as Markdown, the number
    of usable records)."""
    run_dir = Path(run_dir)
    t, env, problems, usable = load(run_dir, reference)
    written = write_tables(t, run_dir)
    plots = _plots(t, run_dir)
    text = render_markdown(t, env, plots, written + plots, problems)
    _atomic(run_dir / "report.md", lambda p: p.write_text(text))
    return markdown_table(t["summary"], SUMMARY_COLUMNS), usable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compare.report",
                                description="Rebuild the tables, plots and report.md of a run from its records.")
    p.add_argument("run_dir")
    p.add_argument("--reference", help="framework the drift is measured against")
    from . import tracking
    tracking.add_argument(p, "fill (or rebuild) MLflow from the folder's records")
    args = p.parse_args(argv)
    try:
        if args.mlflow is not None:
            tracking.require_mlflow()
            uri = tracking.resolve_uri(args.mlflow, Path(args.run_dir))
        summary, usable = build(args.run_dir, args.reference)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.mlflow is not None and usable:
        env, _ = read_environment(Path(args.run_dir))
        tracker = tracking.rebuild(Path(args.run_dir), uri, bool(env.get("interrupted")))
        print(f"mlflow: {tracker.uri}, experiment {tracker.experiment_name!r}"
              + (" (incomplete: see the warning above)" if tracker.lost else ""), file=sys.stderr)
    print(summary)
    print(f"report: {Path(args.run_dir) / 'report.md'}", file=sys.stderr)
    if not usable:
        print("error: no usable record in records.jsonl; the report is empty", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
