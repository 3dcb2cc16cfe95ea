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

from common.config import VARIANTS
from common.registry import FRAMEWORKS

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


def read_records(run_dir: Path) -> list:
    path = Path(run_dir) / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a bn-compare run directory?")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}:{number} is not valid JSON (a line cut by a crash?); skipped",
                  file=sys.stderr)
    return out


def _fw_order(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "framework" not in frame:
        return frame
    orders = {"framework": {n: i for i, n in enumerate(FRAMEWORKS)},
              "variant": {n: i for i, n in enumerate(VARIANTS)}}
    return frame.sort_values(by=[c for c in ["framework", "variant", "seed", "epoch", "layer"] if c in frame],
                             key=lambda s: s.map(orders[s.name]) if s.name in orders else s,
                             kind="stable").reset_index(drop=True)


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
        mine, ref = run_dir / row.snapshot, run_dir / ref_rows.loc[key, "snapshot"]
        if not (mine.is_file() and ref.is_file()):
            continue
        with np.load(mine) as a, np.load(ref) as b:
            a, b = dict(a), dict(b)
        trainable = [k for k in b if k.startswith("param/") and not k.endswith(("running_mean", "running_var"))]
        running = [k for k in b if k.endswith(("running_mean", "running_var"))]

        def rel(keys):
            if not keys:
                return np.nan
            diff = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in keys)
            norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in keys)
            return np.sqrt(diff / norm) if norm else np.nan

        logits = np.abs(a["probe/logits_eval"].astype(np.float64) - b["probe/logits_eval"].astype(np.float64))
        same_pred = np.mean(a["probe/logits_eval"].argmax(1) == b["probe/logits_eval"].argmax(1))
        rows.append({"framework": row.framework, "reference": reference, "variant": row.variant,
                     "seed": row.seed, "config_id": row.config_id, "epoch": row.epoch,
                     "param_rel_l2": rel(trainable), "running_stats_rel_l2": rel(running),
                     "param_max_abs": max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
                                          for k in trainable),
                     "probe_logit_max_abs": float(logits.max()), "probe_logit_mad": float(logits.mean()),
                     "probe_pred_agreement": float(same_pred)})
    return pd.DataFrame(rows)


def tables(records: list, run_dir: Path, reference: str | None = None) -> dict:
    epochs = pd.DataFrame([r for r in records if r.get("kind") == "epoch"])
    starts = [r for r in records if r.get("kind") == "run_start"]
    runs = pd.DataFrame([{**{k: r[k] for k in RUN_INDEX}, **{f"backend_{k}": v for k, v in r["backend"].items()},
                          "data_verified": r.get("data_verified"), "train_examples": r.get("train_examples"),
                          "test_examples": r.get("test_examples")} for r in starts])
    errors = pd.DataFrame([{k: r.get(k) for k in ("framework", "variant", "seed", "config_id", "error_type", "message")}
                           for r in records if r.get("kind") == "error"])
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
    summary = _summary(epochs, runs, errors, drift)
    return {name: _fw_order(frame) for name, frame in
            dict(epochs=epochs, bn_gap=bn_gap, drift=drift, summary=summary, runs=runs, errors=errors).items()}


def _summary(epochs, runs, errors, drift) -> pd.DataFrame:
    if epochs.empty:
        return pd.DataFrame()
    rows = []
    for (fw, variant), group in _fw_order(epochs).groupby(["framework", "variant"], sort=False):
        per_seed = group.sort_values("epoch").groupby("seed")
        last = per_seed.tail(1)
        curve = group.groupby("epoch").test_acc.mean()
        info = runs[(runs.framework == fw) & (runs.variant == variant)].head(1) if not runs.empty else runs
        row = {
            "framework": fw, "variant": variant, "seeds": group.seed.nunique(),
            "epochs": int(group.epoch.max()),
            "final_test_acc": last.test_acc.mean(),
            "best_test_acc": per_seed.test_acc.max().mean(),
            "best_epoch": int(curve.idxmax()),
            "final_train_loss": last.train_loss.mean(),
            "train_examples_per_s": group.train_examples_per_s.median(),
            "warmup_examples_per_s": group.warmup_examples_per_s.median(),
            "eval_examples_per_s": group.eval_examples_per_s.median(),
            "final_probe_acc_eval": last.probe_acc_eval.mean(),
            "final_probe_acc_train": last.probe_acc_train.mean(),
            "final_probe_disagreement": last.probe_disagreement.mean(),
            "final_probe_logit_mad": last.probe_logit_mad.mean(),
        }
        if not info.empty:
            row.update(device=info.backend_device_name.iloc[0], version=info.backend_version.iloc[0],
                       execution=info.backend_execution.iloc[0], bn_decay=info.backend_bn_decay.iloc[0],
                       bn_epsilon=info.backend_bn_epsilon.iloc[0])
        if not drift.empty and fw in set(drift.framework):
            d = drift[(drift.framework == fw) & (drift.variant == variant)]
            d = d[d.epoch == d.epoch.max()]
            row.update(final_param_rel_l2=d.param_rel_l2.mean(), final_probe_logit_max_abs=d.probe_logit_max_abs.mean())
        if not errors.empty:
            row["errors"] = int(((errors.framework == fw) & (errors.variant == variant)).sum())
        rows.append(row)
    return pd.DataFrame(rows)


# Markdown ----------------------------------------------------------------------
def _fmt(value, column: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        if column.endswith("_per_s"):
            return f"{value:,.0f}"
        if column.endswith(("_acc", "_acc_eval", "_acc_train", "disagreement", "agreement")):
            return f"{value:.4f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, columns: list | None = None) -> str:
    if frame is None or frame.empty:
        return "_(none)_\n"
    columns = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], c) for c in columns) + " |")
    return "\n".join(lines) + "\n"


# Plots -------------------------------------------------------------------------
def _plots(t: dict, run_dir: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = t["epochs"]
    made = []
    if epochs.empty:
        return made
    variants = list(dict.fromkeys(epochs.variant))
    mean = epochs.groupby(["framework", "variant", "epoch"], sort=False).mean(numeric_only=True).reset_index()

    def per_variant(name, metrics, title, frame=mean, ylabels=None):
        fig, axes = plt.subplots(len(metrics), len(variants), figsize=(3.6 * len(variants), 2.8 * len(metrics)),
                                 squeeze=False, sharex=True)
        for i, metric in enumerate(metrics):
            for j, variant in enumerate(variants):
                ax = axes[i][j]
                for fw, g in frame[frame.variant == variant].groupby("framework", sort=False):
                    ax.plot(g.epoch, g[metric], marker="o", ms=3, label=fw)
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

    per_variant("curves.png", ["train_loss", "train_acc", "test_acc"],
                "Training curves (mean over seeds; test in eval mode)")
    per_variant("divergence.png", ["probe_logit_mad", "probe_disagreement"],
                "Train-mode vs eval-mode BN on the probe set",
                ylabels=["mean |logit diff|", "prediction disagreement"])
    if not t["drift"].empty:
        drift = t["drift"].groupby(["framework", "variant", "epoch"], sort=False).mean(numeric_only=True).reset_index()
        ref = t["drift"].reference.iloc[0]
        per_variant("drift.png", ["param_rel_l2", "probe_logit_max_abs"], f"Drift from {ref}", frame=drift,
                    ylabels=["param rel. L2", "max |logit diff|"])
    summary = t["summary"]
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


SUMMARY_COLUMNS = ["framework", "variant", "seeds", "epochs", "best_test_acc", "best_epoch", "final_test_acc",
                   "train_examples_per_s", "eval_examples_per_s", "execution", "device"]
DIVERGENCE_COLUMNS = ["framework", "variant", "final_probe_acc_eval", "final_probe_acc_train",
                      "final_probe_disagreement", "final_probe_logit_mad"]
CONVENTION_COLUMNS = ["framework", "variant", "version", "bn_decay", "bn_epsilon"]


def render_markdown(t: dict, env: dict, plots: list, written: list) -> str:
    s = t["summary"]
    parts = [f"# bn-compare report {env.get('run_id', '')}\n",
             f"- command: `{env.get('command', '?')}`",
             f"- machine: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores), {env.get('platform', '?')}",
             f"- data: {env.get('data_dir', '?')} (" +
             ("checksums verified" if env.get("data_verified", True) else "**not** the verified Fashion-MNIST") + ")",
             f"- drift reference: {env.get('reference', '?')}; wall time {env.get('seconds', '?')} s\n",
             "## Summary\n",
             "Test accuracy is measured in eval mode (running statistics) after each epoch; `best_test_acc` is "
             "the best epoch's, averaged over seeds. Throughput is the median epoch's training examples/s over "
             "the timed steps (the first warm-up steps of each epoch excluded, the device synchronised at the "
             "boundaries).\n",
             markdown_table(s, SUMMARY_COLUMNS),
             "## Train/eval-mode divergence (final epoch)\n",
             "The same probe images through the network in train mode (batch statistics, nothing updated) and "
             "eval mode (running statistics).\n",
             markdown_table(s, DIVERGENCE_COLUMNS)]
    gap = t["bn_gap"]
    if not gap.empty:
        last = gap[gap.epoch == gap.groupby(["framework", "variant"]).epoch.transform("max")]
        last = last.groupby(["framework", "variant", "layer"], sort=False).mean(numeric_only=True).reset_index()
        parts += ["### Batch vs running statistics per BN layer (final epoch)\n",
                  "`mean_gap`: |batch mean - running mean| in running standard deviations; `var_log_ratio`: "
                  "|log(batch var / running var)|; both averaged over features.\n",
                  markdown_table(last, ["framework", "variant", "layer", "mean_gap", "var_log_ratio"])]
    drift = t["drift"]
    if not drift.empty:
        last = drift[drift.epoch == drift.epoch.max()]
        last = last.groupby(["framework", "variant"], sort=False).mean(numeric_only=True).reset_index()
        parts += [f"## Cross-framework drift from {drift.reference.iloc[0]} (final epoch)\n",
                  "Same initial weights and batches; relative L2 distance of all trainable parameters and of "
                  "the BN running statistics, and the probe logits' distance.\n",
                  markdown_table(last, ["framework", "variant", "param_rel_l2", "running_stats_rel_l2",
                                        "probe_logit_max_abs", "probe_pred_agreement"])]
    parts += ["## BN conventions in effect\n",
              "Decay and epsilon the BN layers really used (builtin-defaults shows each framework's own).\n",
              markdown_table(s, CONVENTION_COLUMNS)]
    if not t["errors"].empty:
        parts += ["## Errors\n", markdown_table(t["errors"], ["framework", "variant", "seed", "error_type", "message"])]
    if plots:
        parts.append("## Plots\n")
        parts += [f"![{p}]({p})\n" for p in plots]
    parts += ["## Files\n", ", ".join(f"`{w}`" for w in written) + "\n"]
    return "\n".join(parts)


def build(run_dir, reference: str | None = None) -> str:
    """(Re)build every table, plot and report.md in run_dir; returns the summary as Markdown."""
    run_dir = Path(run_dir)
    env_path = run_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    t = tables(read_records(run_dir), run_dir, reference or env.get("reference"))
    written = []
    try:
        import pyarrow  # noqa: F401
        parquet = True
    except ImportError:
        parquet = False
    for name in TABLES:
        frame = t[name]
        _atomic(run_dir / f"{name}.csv", lambda p: frame.to_csv(p, index=False))
        written.append(f"{name}.csv")
        if parquet and not frame.empty:
            _atomic(run_dir / f"{name}.parquet", lambda p: frame.to_parquet(p, index=False))
            written.append(f"{name}.parquet")
    plots = _plots(t, run_dir)
    text = render_markdown(t, env, plots, written + plots)
    _atomic(run_dir / "report.md", lambda p: p.write_text(text))
    return markdown_table(t["summary"], SUMMARY_COLUMNS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compare.report",
                                description="Rebuild the tables, plots and report.md of a run from its records.")
    p.add_argument("run_dir")
    p.add_argument("--reference", help="framework the drift is measured against")
    args = p.parse_args(argv)
    try:
        print(build(args.run_dir, args.reference))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {Path(args.run_dir) / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
