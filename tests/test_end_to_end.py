"""compare.run on small IDX files, through real worker subprocesses."""

import json
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from common.records import EPOCH_KEYS
from compare import report
from compare.reporting import tables
from compare.run import main as run_main
from tests.helpers import make_idx_dir
from tests.made import TIMING

FILES = ["records.jsonl", "environment.json", "report.md", "curves.png", "divergence.png", "throughput.png"] + [
    f"{t}.csv" for t in tables.TABLES
]


def _run(framework, data, out, run_id, *extra):
    return run_main(
        [
            "--frameworks",
            framework,
            "--variants",
            "scratch,builtin,none",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--out",
            str(out),
            "--run-id",
            run_id,
            "--python",
            f"{framework}={sys.executable}",
            "--probe-size",
            "64",
            "--no-progress",
            "--trace-steps",
            "3",
            *extra,
        ]
    )


def _records(path):
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


def test_run_writes_every_report_and_repeats_exactly(framework, tmp_path):
    data = make_idx_dir(tmp_path / "data", 1200, 400)
    before_run = datetime.now(timezone.utc)
    assert _run(framework, data, tmp_path / "out", "a") == 0
    after_run = datetime.now(timezone.utc)
    run_dir = tmp_path / "out" / "a"
    for name in FILES:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "epochs.parquet").is_file() and (run_dir / "summary.parquet").is_file()
    epochs = pd.read_csv(run_dir / "epochs.csv")
    assert set(EPOCH_KEYS) - {"bn_gap", "step_losses"} <= set(epochs.columns)
    assert len(epochs) == 3 * 2 and set(epochs.variant) == {"scratch", "builtin", "none"}
    bn = epochs[epochs.variant != "none"]
    assert (bn.test_acc > 0.5).all(), "BN-LeNet should learn the synthetic bands in two epochs"
    assert (epochs.train_examples_per_s > 0).all() and (epochs.eval_examples_per_s > 0).all()
    assert epochs.probe_disagreement.between(0, 1).all() and (epochs.timed_steps == 18 - 5).all()
    gap = pd.read_csv(run_dir / "bn_gap.csv")
    assert set(gap.layer) == {"bn1", "bn2", "bn3", "bn4"} and (gap.mean_gap >= 0).all()
    summary = pd.read_csv(run_dir / "summary.csv")
    assert list(summary.variant) == ["scratch", "builtin", "none"]
    np.testing.assert_allclose(summary.best_test_acc, epochs.groupby("variant", sort=False).test_acc.max())
    text = (run_dir / "report.md").read_text()
    assert "## Summary" in text and "## Train/eval-mode divergence" in text and "![curves.png]" in text
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["frameworks"] == [framework] and env["data_verified"] is False
    # started: when the runs began, not when the report was written after them
    started = datetime.fromisoformat(env["started"])
    assert before_run <= started and started + timedelta(seconds=env["seconds"] - 1) <= after_run, env
    records = _records(run_dir)
    assert all(len(r["step_losses"]) == 3 for r in records if r["kind"] == "epoch")

    # the same seed again: identical records apart from timings
    assert _run(framework, data, tmp_path / "out", "b") == 0
    strip = [{k: v for k, v in r.items() if k not in TIMING | {"backend", "pid"}} for r in records]
    again = [
        {k: v for k, v in r.items() if k not in TIMING | {"backend", "pid"}} for r in _records(tmp_path / "out" / "b")
    ]
    assert strip == again

    # the reports rebuild from the raw records alone
    before = (run_dir / "summary.csv").read_text()
    for name in FILES[2:]:
        (run_dir / name).unlink()
    assert report.main([str(run_dir)]) == 0
    assert (run_dir / "summary.csv").read_text() == before and (run_dir / "report.md").is_file()


def test_a_broken_framework_costs_only_its_rows(tmp_path, capsys):
    data = make_idx_dir(tmp_path / "data", 200, 100)
    code = run_main(
        [
            "--frameworks",
            "mxnet",
            "--variants",
            "scratch",
            "--epochs",
            "1",
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--out",
            str(tmp_path / "out"),
            "--run-id",
            "x",
            "--python",
            f"mxnet={tmp_path / 'no-such-python'}",
            "--no-progress",
        ]
    )
    assert code == 1
    errors = pd.read_csv(tmp_path / "out" / "x" / "errors.csv")
    assert list(errors.framework) == ["mxnet"] and "no such interpreter" in errors.message[0]
    assert "## Errors" in (tmp_path / "out" / "x" / "report.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frameworks", "torch,paddle"], "unknown framework 'paddle'"),
        (["--variants", "fancy"], "unknown variant"),
        (["--seeds", "a"], "--seeds takes comma-separated integers"),
        (["--lr", "-1"], "lr (--lr) must be a positive"),
        (["--data-dir", "/no/such/dir"], "does not exist"),
        (["--python", "torch"], "--python takes FW=PATH"),
    ],
)
def test_bad_command_lines(argv, message, capsys, tmp_path):
    assert run_main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may be written for a rejected command line"


def test_a_framework_from_this_python_is_named_with_its_version(fw, framework, tmp_path, capsys):
    """Without --python, a framework this Python imports runs here (not in its tox env): the log says so with its
    version, and the report names it as from this Python (its version in the conventions table)."""
    data = make_idx_dir(tmp_path / "data", 64, 32)
    args = ["--frameworks", framework, "--variants", "scratch", "--epochs", "1", "--batch-size", "32"]
    args += ["--data-dir", str(data), "--no-verify-data", "--out", str(tmp_path), "--run-id", "here", "--no-progress"]
    assert run_main(args) == 0
    err = capsys.readouterr().err
    assert f"[{framework}] this Python ({sys.executable}) has " in err and "not in the pinned tox env" in err, err
    env = json.loads((tmp_path / "here" / "environment.json").read_text())
    assert env["interpreter_sources"] == {framework: "this Python"}
    report_text = (tmp_path / "here" / "report.md").read_text()
    assert f"- {framework}: from the Python that ran the command, whatever its version" in report_text
