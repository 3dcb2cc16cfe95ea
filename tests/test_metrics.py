"""One registry of metrics (compare.reporting.metrics): every metric a report or study prints is in it, and
what it says (bounds, format, which way is better) is what the tables, intervals and answers use."""

import json
import math

import numpy as np
import pytest

from common import records
from common.config import ModelSpec, RunConfig
from common.registry import FRAMEWORKS
from compare import report
from compare.reporting import markdown, metrics, stats, tables, tracking
from compare.studies import answers, render, spec, summary
from tests.helpers import runs_frame, write
from tests.made import BASE_LR, drift_run, epoch_record, population_records, summary_records, write_snapshot

# Columns a report or study prints that are not metrics: identities, counts of runs, labels, coordinates.
NOT_METRICS = {framework.label for framework in FRAMEWORKS.values()} | {
    "framework",
    "variant",
    "status",
    "seeds",
    "epochs",
    "execution",
    "device",
    "layer",
    "norm",
    "version",
    "precision",
    "seed",
    "epochs_done",
    "detail",
    "arm",
    "baseline",
    "metric",
    "verdict",
    "paired_seeds",
    "complete",
    "diverged",
    "missing",
    "failed",
    "note",
    "reference",
    "lr",
    "errors",
    # a comparison's figures, printed in the format of the row's metric
    "arm_mean",
    "baseline_mean",
    "difference",
}


def headers(text: str) -> set:
    """The column names of every Markdown table in text (a header line is followed by |---|)."""
    lines = text.splitlines()
    return {
        cell.strip()
        for line, below in zip(lines, lines[1:])
        if below.startswith("|---")
        for cell in line.strip().strip("|").split("|")
    }


def mixed_records(run_dir):
    float32 = RunConfig(model=ModelSpec(), dtype="float32", device="cpu", epochs=1)
    out = []
    for config, value in ((float32, 1.0), (float32.replace(mixed="bfloat16"), 2.0)):
        ident = dict(framework="torch", variant="scratch", seed=0, config_id=config.config_id)
        epoch = epoch_record(config_id=config.config_id, snapshot=f"snapshots/{config.config_id}.npz")
        write_snapshot(
            run_dir,
            epoch,
            **{
                "param/conv1.weight": np.full(4, value),
                "param/bn1.running_var": np.full(4, value),
                "probe/logits_eval": np.eye(2) * value,
            },
        )
        out += [
            records.make("plan", **ident, epochs=1, config=config.to_dict()),
            epoch,
            records.make("run_end", **ident, status="complete", epochs_done=1),
        ]
    return out


@pytest.mark.parametrize("make", ["summary", "drift", "population", "mixed"])
def test_every_metric_a_report_prints_is_in_the_registry(tmp_path, make):
    recs = {
        "summary": summary_records,
        "drift": lambda: drift_run(tmp_path),
        "population": population_records,
        "mixed": lambda: mixed_records(tmp_path),
    }[make]()
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert report.main([str(tmp_path)]) == 0
    printed = headers((tmp_path / "report.md").read_text())
    assert printed, "report.md has tables"
    unknown = sorted(c for c in printed - NOT_METRICS if metrics.get(c) is None)
    assert not unknown, f"printed but not in the registry: {unknown}"


@pytest.mark.parametrize("kind", ["largest-stable", "compare", "trend"])
def test_every_metric_a_study_prints_is_in_the_registry(tmp_path, kind):
    answer = {
        "largest-stable": 'kind = "largest-stable"\nx = "lr"',
        "compare": 'kind = "compare"\naxis = "lr"\nbaseline = 0.1\nbest = true\nalso = ["final_pop_gain"]',
        "trend": 'kind = "trend"\nx = "lr"\nmetric = "final_probe_logit_mad"',
    }[kind]
    study = spec.load(
        write(
            tmp_path,
            BASE_LR.replace('kind = "largest-stable"\nx = "lr"', answer)
            + '\n[plot]\nx = "lr"\nmetrics = ["best_test_acc", "final_train_loss", '
            '"train_examples_per_s"]\n',
        )
    )
    runs = runs_frame(
        [
            {
                "lr": lr,
                "seed": s,
                "best_test_acc": 0.5 + s / 10,
                "final_pop_gain": 0.01 * s,
                "final_probe_logit_mad": 0.2 + s,
                "final_train_loss": 1.0,
                "train_examples_per_s": 900.0,
            }
            for lr in (0.1, 1.0)
            for s in (0, 1, 2)
        ]
    )
    sentences, frames = answers.analyse(runs, study)
    text = render.render(
        study,
        summary.summarise(runs, study, frames),
        sentences,
        frames,
        {"seeds": [0, 1, 2]},
        [],
        [],
        runs.iloc[:0],
        [],
    )
    printed = {c for c in headers(text) if not c.startswith(("largest_stable_", "smallest_failing_"))}
    unknown = sorted(c for c in printed - NOT_METRICS if metrics.get(c) is None)
    assert not unknown, f"printed but not in the registry: {unknown}"


def test_what_the_reports_read_comes_from_the_registry():
    """Bounds, formats, labels and which way is better, read through the registry by every consumer."""
    assert set(tables.RUN_METRICS) == set(metrics.RUN_METRICS)
    assert set(spec.METRICS) == set(metrics.RUN_METRICS) | set(metrics.TRACE_METRICS)  # a study answers with both
    assert all(metrics.get(m) is not None for m in tracking.HEADLINE)
    for name, metric in metrics.REGISTRY.items():
        assert stats.metric_bounds(name) == metric.bounds
        assert metric.better in ("higher", "lower", None) and metric.label
    assert stats.metric_bounds("framework") == (-math.inf, math.inf)
    assert markdown.fmt(0.123456, "final_pop_gain") == "0.1235" and markdown.fmt(2048.0, "population_images") == "2,048"
    assert (
        markdown.fmt(12345.6, "train_examples_per_s") == "12,346" and markdown.fmt(0.000123, "mean_gap") == "0.000123"
    )
    assert markdown.fmt("a|b", "detail") == "a\\|b"


def test_a_bounded_metrics_interval_is_clipped_through_the_registry(monkeypatch):
    """An accuracy's interval past 1 prints as 1.0000; make the registry say the metric is unbounded and the
    same interval prints unclipped: the clipping reads the registry, not a rule of its own."""
    assert markdown.interval_text(0.9, 1.2, "test_acc") == "[0.9000, 1.0000]"
    assert markdown.interval_text(-0.5, 0.2, "final_train_loss") == "[0, 0.2]"
    unbounded = metrics.Metric("test_acc", "test accuracy", "real", "higher")
    monkeypatch.setitem(metrics.REGISTRY, "test_acc", unbounded)
    assert markdown.interval_text(0.9, 1.2, "test_acc") == "[0.9, 1.2]"
