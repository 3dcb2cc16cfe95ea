"""report.md: the tables as Markdown, with intervals and the sentences made from the numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.norms import NORMALISATIONS

from . import metrics
from .stats import clipped, metric_bounds


def interval_text(low, high, column: str, bounds: tuple | None = None) -> str:
    """A 95% interval as [low, high], clipped to what the metric can be (the tables keep it unclipped)."""
    low, high = clipped(float(low), float(high), bounds or metric_bounds(column))
    return f"[{fmt(low, column)}, {fmt(high, column)}]"


def two_seed_note(frame: pd.DataFrame, what: str) -> str:
    """A sentence for the rows whose interval rests on two seeds ('' if none)."""
    ns = [c for c in frame.columns if c.endswith("_n") and f"{c[:-2]}_ci_high" in frame] if not frame.empty else []
    two = frame[(frame[ns] == 2).any(axis=1)] if ns else frame.iloc[:0]
    if two.empty:
        return ""
    who = f"every {what}" if len(two) == len(frame) else f"{len(two)} of {len(frame)} {what}s"
    return (
        f"The intervals of {who} (n=2) rest on two seeds: t(0.975, 1) = 12.71, so they are wide and say "
        f"little; more seeds (`--seeds 0,1,2,3,4`) narrow them.\n"
    )


def fmt(value, column: str) -> str:
    """A table cell: the value as its metric prints (compare.reporting.metrics), Markdown-safe."""
    return metrics.format_value(value, column).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, columns: list | None = None) -> str:
    if frame is None or frame.empty:
        return "_(none)_\n"
    columns = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    if "precision" in frame and "variant" in columns and "precision" not in columns:  # every row says its precision
        columns.insert(columns.index("variant") + 1, "precision")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = [fmt(row[c], c) for c in columns]
        for i, c in enumerate(columns):  # a mean over seeds shows its 95% interval
            high = row.get(f"{c}_ci_high")
            if cells[i] and high is not None and not pd.isna(high):
                cells[i] += " " + interval_text(row[f"{c}_ci_low"], high, c)
        if "status" in row and row["status"] != "complete":  # never read as a finished run
            for i, c in enumerate(columns):
                if c == "status":
                    cells[i] = f"**{cells[i]}**"
                elif c in ("best_test_acc", "final_test_acc") and cells[i] and "final_epoch" in row:
                    cells[i] += f" (to epoch {row['final_epoch']} of {fmt(row.get('epochs'), 'epochs')})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = [
    "framework",
    "variant",
    "status",
    "seeds",
    "epochs",
    "best_test_acc",
    "best_epoch",
    "final_test_acc",
    "train_examples_per_s",
    "first_step_seconds",
    "eval_examples_per_s",
    "execution",
    "device",
]
DIVERGENCE_COLUMNS = [
    "framework",
    "variant",
    "status",
    "final_probe_acc_eval",
    "final_probe_acc_train",
    "final_probe_disagreement",
    "final_probe_logit_mad",
]
CONVENTION_COLUMNS = [
    "framework",
    "variant",
    "norm",
    "data_parallel",
    "replica_statistics",
    "version",
    "bn_decay",
    "bn_epsilon",
]
UNFINISHED_COLUMNS = ["framework", "variant", "seed", "status", "epochs_done", "epochs", "detail"]


POPULATION_SUMMARY_COLUMNS = [
    "framework",
    "variant",
    "status",
    "final_test_acc",
    "final_pop_test_acc",
    "final_pop_gain",
    "final_probe_disagreement",
    "final_pop_probe_disagreement",
    "population_images",
    "population_seconds",
]
LAG_NOISE_COLUMNS = [
    "framework",
    "variant",
    "layer",
    "lag_mean_gap",
    "lag_var_log_ratio",
    "noise_mean_gap",
    "noise_var_log_ratio",
]


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


def said_once(pairs: list) -> list:
    """[(who, what)] as one sentence per distinct `what`, naming every row that says it ('torch scratch and mxnet
    scratch: ...'), in the order the rows came: a report says a thing once, however many rows share it."""
    whos = {}
    for who_, what in pairs:
        whos.setdefault(what, []).append(who_)
    return [
        (", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]) + f": {what}"
        for what, names in whos.items()
    ]


def population_answer(summary: pd.DataFrame) -> list:
    """Per framework and variant with population statistics, in sentences made from the final epoch's
    numbers: how many points the running average (EMA) costs, and how much of the train/eval
    disagreement remains with population statistics."""
    if summary.empty or "final_pop_test_acc" not in summary:
        return []
    pairs = []
    for _, row in summary.dropna(subset=["final_pop_test_acc"]).iterrows():
        gain = row.final_pop_gain * 100
        cost = (
            f"the EMA costs {gain:.2f} points"
            if gain > 0
            else f"the EMA is {-gain:.2f} points better"
            if gain < 0
            else "the two are equal"
        )
        text = (
            f"final test accuracy {row.final_test_acc:.4f} with the running "
            f"average (EMA), {row.final_pop_test_acc:.4f} with population statistics from "
            f"{int(row.population_images):,} training images: {cost}"
        )
        if not pd.isna(row.get("final_pop_gain_ci_high")):
            low, high = clipped(row.final_pop_gain_ci_low, row.final_pop_gain_ci_high, metric_bounds("final_pop_gain"))
            text += (
                f" (95% interval over {int(row.final_pop_gain_n)} seeds {low * 100:+.2f} to {high * 100:+.2f}"
                f"{', beyond seed noise' if low > 0 or high < 0 else ', within seed noise'})"
            )
        ema, pop = row.final_probe_disagreement, row.final_pop_probe_disagreement
        if ema > 0:
            text += (
                f". Train/eval prediction disagreement on the probe: {ema:.1%} with the EMA, {pop:.1%} with "
                f"population statistics, so {pop / ema:.0%} of it remains (batch noise) and {1 - pop / ema:.0%} "
                f"was the EMA's lag."
            )
        else:
            text += (
                f". Train and eval mode agree on every probe image with the EMA ({pop:.1%} with population statistics)."
            )
        pairs.append((who(row, summary), text))
    return said_once(pairs)


def population_section(t: dict) -> list:
    """report.md's section on population statistics ([] when the run has none)."""
    s = t["summary"]
    answer = population_answer(s)
    if not answer:
        return []
    parts = [
        "## Population statistics: what the train/eval gap is made of (final epoch)\n",
        "Eval mode with each BN layer's population statistics (every weight fixed, train-mode batches of "
        "the run's batch size over `population_images` training images (`--population-size`, at most "
        "the training split): the mean of the batch means and the exact variance over all their values) beside "
        "eval mode with the running average (EMA) each "
        "framework keeps. `final_pop_gain`: population minus EMA test accuracy. The headline accuracies "
        "above stay the EMA's. `population_seconds`: the time to compute them and evaluate with them, "
        "apart from training.\n",
    ]
    parts += [f"- {sentence}" for sentence in answer] + [""]
    parts.append(markdown_table(s.dropna(subset=["final_pop_test_acc"]), POPULATION_SUMMARY_COLUMNS))
    gap = t["bn_gap"]
    if not gap.empty and "lag_mean_gap" in gap:
        last = final_epoch_gaps(gap.dropna(subset=["lag_mean_gap"]))
        parts += [
            "Per BN layer: `lag_*` is the EMA against the population statistics (the EMA's lag), `noise_*` "
            "the probe's batch statistics against them (batch noise), in the units of `mean_gap` / "
            "`var_log_ratio` below (population standard deviations; |log variance ratio|).\n",
            markdown_table(last, LAG_NOISE_COLUMNS),
        ]
    return parts


MIXED_COLUMNS = [
    "framework",
    "variant",
    "precision",
    "seeds",
    "test_acc_mixed",
    "test_acc_float32",
    "probe_disagreement_mixed",
    "probe_disagreement_float32",
    "param_rel_l2",
    "running_stats_rel_l2",
    "probe_pred_agreement",
    "speed_ratio",
]


def mixed_precision_section(t: dict) -> list:
    """The final epoch of each mixed-precision run beside its float32 twin (same seed, initial weights and
    batches), averaged over seeds, with sentences made from the numbers."""
    mixed = t.get("mixed_precision")
    if mixed is None or mixed.empty:
        return []
    last = mixed[mixed.epoch == mixed.groupby(["framework", "config_id"]).epoch.transform("max")]
    rows = []
    for (fw, variant, precision), g in last.groupby(["framework", "variant", "precision"], sort=False):
        rows.append(
            {
                "framework": fw,
                "variant": variant,
                "precision": precision,
                "seeds": g.seed.nunique(),
                **g.mean(numeric_only=True).drop(["seed", "epoch"], errors="ignore").to_dict(),
                "speed_ratio": float((g.train_examples_per_s_mixed / g.train_examples_per_s_float32).median()),
            }
        )
    table = pd.DataFrame(rows)
    sentences = []
    for _, r in table.iterrows():
        sentences.append(
            f"- {r.framework} {r.variant}: final test accuracy {r.test_acc_mixed:.4f} in {r.precision} against "
            f"{r.test_acc_float32:.4f} in float32 ({100 * (r.test_acc_mixed - r.test_acc_float32):+.2f} points); "
            f"train/eval disagreement {100 * r.probe_disagreement_mixed:.1f}% against "
            f"{100 * r.probe_disagreement_float32:.1f}%; the parameters are {r.param_rel_l2:.2g} (relative L2) "
            f"and the running statistics {r.running_stats_rel_l2:.2g} from the float32 run's, and the two "
            f"predict the same class for {100 * r.probe_pred_agreement:.1f}% of the probe images."
        )
    devices = t["summary"].get("device", pd.Series(dtype=str)).dropna() if "summary" in t else pd.Series(dtype=str)
    cpu = not devices.empty and devices.astype(str).str.startswith("CPU").all()
    speed = "`speed_ratio` is the mixed run's training throughput over the float32 run's (median over seeds). " + (
        "These ran on a CPU: bfloat16 there is emulated unless the processor has bfloat16 instructions "
        "(AVX512_BF16, AMX), so a ratio below 1 says nothing of a GPU; docs/precision.md gives GPU figures where "
        "one was measured."
        if cpu
        else ""
    )
    return [
        "## Mixed precision against float32 (final epoch)\n",
        "Each mixed-precision run beside the float32 run of the same seed, initial weights and batches "
        "(parameters, the update and the loss stay float32 in both; common/precision.py), averaged over "
        "seeds. `param_rel_l2` / `running_stats_rel_l2`: relative L2 distance of the trained parameters "
        "and of the BN running statistics from the float32 run's.\n",
        markdown_table(table, MIXED_COLUMNS),
        *sentences,
        "",
        speed + "\n",
    ]


CHANCE_LOSS = float(np.log(10))  # the cross-entropy of a uniform guess over the 10 classes


def on_plateau(final_train_loss) -> bool:
    """Whether a run is still on its initial plateau: a training loss within 10% of ln 10, a uniform guess."""
    return bool(
        pd.notna(final_train_loss)
        and np.isfinite(final_train_loss)
        and 0.9 * CHANCE_LOSS <= final_train_loss <= 1.1 * CHANCE_LOSS
    )


def thrown_off(final_train_loss) -> bool:
    """Whether a run's training loss ended finite but above a uniform guess's by more than 10%: its steps threw it
    off (a learning rate too large to diverge outright), which is not the plateau of a network not yet learning."""
    return bool(pd.notna(final_train_loss) and np.isfinite(final_train_loss) and final_train_loss > 1.1 * CHANCE_LOSS)


def plateau_sentences(summary: pd.DataFrame) -> list:
    """One sentence naming every row still on its initial plateau, and, once, why where the reason is the
    textbook's (sigmoid without a normalisation)."""
    if "final_train_loss" not in summary:
        return []
    stuck = summary[[on_plateau(loss) for loss in summary.final_train_loss]]
    if stuck.empty:
        return []
    names = [who(row, summary) for _, row in stuck.iterrows()]
    losses = sorted(f"{loss:.4f}" for loss in stuck.final_train_loss)
    accs = sorted(fmt(a, "best_test_acc") for a in stuck.get("best_test_acc", pd.Series(dtype=float)).dropna())
    loss = losses[0] if losses[0] == losses[-1] else f"{losses[0]}-{losses[-1]}"
    acc = "" if not accs else accs[0] if accs[0] == accs[-1] else f"{accs[0]}-{accs[-1]}"
    one = len(names) == 1
    text = (
        (", ".join(names[:-1]) + f" and {names[-1]}" if not one else names[0])
        + f": still on {'its' if one else 'their'} initial plateau (final training loss {loss}, against ln 10 = "
        f"{CHANCE_LOSS:.4f} for a uniform guess over the 10 classes"
        + (f"; best test accuracy {acc}" if acc else "")
        + f"): {'it has' if one else 'they have'} not learnt yet, so {'its' if one else 'their'} other figures "
        "say little."
    )
    sigmoid = stuck[(stuck.variant == "none") & (stuck.get("activation", "sigmoid") == "sigmoid")]
    if not sigmoid.empty:
        text += (
            " Without a normalisation, each sigmoid scales the gradient by its slope (at most 1/4), so "
            "at this learning rate the first layers barely move; a normalisation keeps each sigmoid's "
            "input near its steep middle. That is the textbook's point of BN-LeNet; `--activation relu` "
            "shows the network without BN training."
        )
    return [text + "\n"]


TRACE_COLUMNS = list(metrics.TRACE_METRICS)  # the runs table's means of a traced run


def trace_section(t: dict) -> list:
    """report.md's section on the --trace-every measures ([] when the run traced nothing)."""
    if "trace_steps" not in t:
        return []
    runs = t["runs"].dropna(subset=["mean_grad_norm"])
    keys = by_run(runs) + [c for c in ("activation", "norm") if c in runs and runs[c].nunique() > 1]
    means = runs.groupby(keys, sort=False)[[*TRACE_COLUMNS, "final_train_loss"]].mean().reset_index()
    steps = t["trace_steps"]
    cost = steps.groupby("framework", sort=False).trace_seconds.agg(["median", "count"])
    plateau = [
        f"{' '.join(str(row[k]) for k in keys)}: still on its initial plateau (final training loss "
        f"{row.final_train_loss:.3f}, ln 10 = 2.303): it is not moving, so its small ICS and flat landscape say "
        f"nothing about smoothness."
        for _, row in means.iterrows()
        if on_plateau(row.final_train_loss)
    ]
    return [
        "## Why BN helps: internal covariate shift and the loss landscape (--trace-every)\n",
        "Every traced step, before the run takes it, on its batch (common.trace; docs/why-bn.md): "
        "`ics_rel_diff` ||G - G'|| / ||G|| and `ics_cos` cos(G, G') of each layer's gradient before and after "
        "the earlier layers' SGD step (layers conv2 ... fc3); along the step's gradient at lr x 0.25 ... 4, "
        "`loss_variation` (max - min of the loss), `grad_predictiveness` (largest gradient change) and "
        "`beta_smoothness` (largest gradient change per distance moved); the gradient's norm. Each is the "
        "mean over the traced steps (and the ICS over the layers), then over seeds; the plots show them over "
        "the steps. None of it is timed as training: each trace took "
        + ", ".join(f"{fw} {row['median']:.2f} s" for fw, row in cost.iterrows())
        + " (median).\n",
        markdown_table(means, keys + TRACE_COLUMNS),
        *[sentence + "\n" for sentence in plateau],
    ]


def stateless_norms(norms) -> list:
    """The normalisations among `norms` (a report's --norm values) that keep no running statistics, whose train and
    eval mode are one computation (the normalisations' table; "none" is no normalisation at all)."""
    return [n for n in norms if n in NORMALISATIONS and not NORMALISATIONS[n].running]


def _header(env: dict) -> list:
    """The report's title and what ran where: command, machine, data, reference, interpreters."""
    parts = [f"# bn-compare report {env.get('run_id', '')}\n"]
    if env.get("interrupted"):
        parts.append(
            f"**This run was interrupted ({env.get('signal') or 'by a signal'}).** What was measured "
            f"before that is below; every run it stopped is marked `interrupted`.\n"
        )
    parts += [
        f"- command: `{env.get('command', '?')}`",
        f"- machine: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores), {env.get('platform', '?')}",
        f"- data: {env.get('data_dir', '?')} ("
        + ("checksums verified" if env.get("data_verified", True) else "**not** the verified Fashion-MNIST")
        + ")",
        f"- drift reference: {env.get('reference', '?')}; wall time {env.get('seconds', '?')} s\n",
    ]
    here = sorted(fw for fw, where in (env.get("interpreter_sources") or {}).items() if where == "this Python")
    if here:  # the conventions table below gives each one's version
        parts.insert(
            -1,
            f"- {', '.join(here)}: from the Python that ran the command, whatever its version (the table of "
            "conventions gives it), not the pinned tox env",
        )
    return parts


def _summary_section(t: dict) -> list:
    """The summary table, the two-seed and one-seed notes, and the rows still on their plateau."""
    s = t["summary"]
    parts = []
    parts += [
        "## Summary\n",
        "Test accuracy is measured in eval mode (running statistics) after each epoch; `best_test_acc` is "
        "the best epoch's, averaged over seeds. Throughput is the median epoch's training examples/s over "
        "the timed steps (the first warm-up steps of each epoch excluded, the device synchronised at the "
        "boundaries). A `status` other than complete is in bold, and its accuracies say the last epoch "
        "they come from. `[low, high]`: the 95% t-interval over seeds, clipped to what the metric can be "
        "(accuracies to [0, 1]; the CSV/Parquet tables keep the unclipped `_ci_low`/`_ci_high`).\n",
        markdown_table(s, SUMMARY_COLUMNS),
        two_seed_note(s, "row"),
        *plateau_sentences(s),
    ]
    if not s.empty and "best_test_acc_n" in s and (s.best_test_acc_n.fillna(0) <= 1).any():
        one = s[s.best_test_acc_n.fillna(0) <= 1]
        who = "Every row rests" if len(one) == len(s) else f"{len(one)} of {len(s)} rows rest"
        parts.append(
            f"{who} on one seed (or none): no spread between seeds is measured, so no interval is "
            f"given; `--seeds 0,1,2` gives one.\n"
        )
    return parts


def _unfinished_section(t: dict) -> list:
    parts = []
    runs = t["runs"]
    unfinished = runs[runs.status != "complete"] if not runs.empty else runs
    if not unfinished.empty:
        parts += [
            "## Runs that did not complete\n",
            "`diverged`: the training loss stopped being finite (a result: the epoch and step are given); "
            "`interrupted`: stopped by a signal; `crashed`: the worker died or raised during training; "
            "`failed`: an error before training.\n",
            markdown_table(unfinished, UNFINISHED_COLUMNS),
        ]
    return parts


def _divergence_section(t: dict) -> list:
    """Train/eval-mode divergence, with the normalisations whose divergence is 0 by construction said once."""
    s = t["summary"]
    parts = []
    norms = sorted(set(s.norm.dropna())) if "norm" in s else []
    stateless = stateless_norms(norms)
    parts += [
        "## Train/eval-mode divergence (final epoch)\n",
        "The same probe images through the network in train mode (batch statistics, nothing updated) and "
        "eval mode (running statistics).\n"
        + (
            f" {' and '.join(stateless).capitalize()} normalisation keep{'s' if len(stateless) == 1 else ''} no "
            f"running statistics: train and eval mode are the same computation, so its divergence is 0; it is "
            f"measured all the same, a check of the harness.\n"
            if stateless
            else ""
        ),
        markdown_table(s, DIVERGENCE_COLUMNS),
    ]
    return parts


def _layers_section(t: dict) -> list:
    """Per layer: batch against running statistics, and how white or uniform the research transforms' output is."""
    parts = []
    gap = t["bn_gap"]
    if not gap.empty:
        last = final_epoch_gaps(gap)
        parts += [
            "### Batch vs running statistics per BN layer (final epoch)\n",
            "`mean_gap`: |batch mean - running mean| in running standard deviations; `var_log_ratio`: "
            "|log(batch var / running var)|; both averaged over features.\n",
            markdown_table(last, ["framework", "variant", "layer", "mean_gap", "var_log_ratio"]),
        ]
        shape = [c for c in ("whiteness", "ks_uniform") if c in last and last[c].notna().any()]
        if shape:
            parts += [
                "### How white or uniform the research transforms' output is (final epoch)\n",
                "On the probe images in train mode, before gamma and beta (common.reference.output_departure). "
                "`whiteness`: whiten's output covariance's relative Frobenius distance from I per whitening group "
                "(0: white; Newton-Schulz's few iterations leave some); `ks_uniform`: the PITs' Kolmogorov-"
                "Smirnov distance from U(0, 1) per channel (pit: 0 only where the layer's input is Gaussian; "
                "pit-rank: 1/(2m) by construction, more with ties).\n",
                markdown_table(last.dropna(subset=shape, how="all"), ["framework", "variant", "layer", *shape]),
            ]
    return parts


def _drift_section(t: dict) -> list:
    """Cross-framework drift, or why it was not measured."""
    parts = []
    drift = t["drift"]
    if not drift.empty:
        last = drift[drift.epoch == drift.epoch.max()]
        last = last.groupby(by_run(last), sort=False).mean(numeric_only=True).reset_index()
        parts += [
            f"## Cross-framework drift from {drift.reference.iloc[0]} (final epoch)\n",
            "Same initial weights and batches; relative L2 distance of all trainable parameters and of "
            "the BN running statistics, and the probe logits' distance.\n",
            markdown_table(
                last,
                [
                    "framework",
                    "variant",
                    "param_rel_l2",
                    "running_stats_rel_l2",
                    "probe_logit_max_abs",
                    "probe_pred_agreement",
                ],
            ),
        ]
    elif not t["epochs"].empty:  # say why the section is missing
        ran = list(dict.fromkeys(t["epochs"].framework))
        parts += [
            "## Cross-framework drift\n",
            (
                f"Not measured: only {ran[0]} ran, and drift is one framework's distance from another's on the "
                f"same seed and configuration; run two or more (`--frameworks torch,mxnet`)."
                if len(ran) == 1
                else "Not measured: no epoch of one framework has a snapshot beside the reference's for the "
                "same seed and configuration (each framework's epochs ended apart, or kept no snapshot)."
            )
            + "\n",
        ]
    return parts


def render_markdown(t: dict, env: dict, plots: list, written: list, problems: list) -> str:
    """report.md of a run: its header, then each section of its tables, the plots and the files."""
    parts = _header(env)
    if problems:
        parts += ["## Problems reading this run\n"] + [f"- {p}" for p in problems] + [""]
    parts += _summary_section(t) + _unfinished_section(t) + _divergence_section(t)
    parts += mixed_precision_section(t)
    parts += population_section(t)
    parts += trace_section(t)
    parts += _layers_section(t) + _drift_section(t)
    parts += [
        "## Normalisation conventions in effect\n",
        "The normalisation (`--norm`; batch is BN) and the decay and epsilon its layers really used "
        "(builtin-defaults shows each framework's own; no decay: no running statistics); under --replicas or "
        "--ghost-batch, how the batch statistics were split and which running statistics eval mode used "
        "(docs/data-parallel.md).\n",
        markdown_table(t["summary"], CONVENTION_COLUMNS),
    ]
    if not t["errors"].empty:
        parts += [
            "## Errors\n",
            markdown_table(t["errors"], ["framework", "variant", "seed", "status", "error_type", "message"]),
        ]
    if plots:
        parts.append("## Plots\n")
        parts += [f"![{p}]({p})\n" for p in plots]
    parts += ["## Files\n", ", ".join(f"`{w}`" for w in written) + "\n"]
    return "\n".join(parts)
