"""Studies run for real: a tiny study end to end, resumption after a kill and after Ctrl-C, the progress line, and
(in tox -e torch) every shipped study with --quick."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from common import records
from compare.studies import spec
from compare.study import main as study_main
from tests.helpers import make_idx_dir, write
from tests.made import TINY

ROOT = Path(__file__).resolve().parent.parent


def _study(framework, path, data, out, run_id, *extra):
    return [
        sys.executable,
        "-m",
        "compare.study",
        str(path),
        "--data-dir",
        str(data),
        "--no-verify-data",
        "--out",
        str(out),
        "--run-id",
        run_id,
        "--python",
        f"{framework}={sys.executable}",
        "--no-progress",
        *extra,
    ]


def _records(study_dir):
    return [json.loads(line) for line in (study_dir / "records.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def torch_only(framework):
    if framework != "torch":
        pytest.skip("real studies run their workers in tox -e torch")


def test_tiny_study_end_to_end(torch_only, tmp_path):
    data = make_idx_dir(tmp_path / "data", 320, 100)
    path = write(tmp_path, TINY, "tiny.toml")
    assert study_main(_study("torch", path, data, tmp_path / "out", "a", "--jobs", "2")[3:]) == 0
    study_dir = tmp_path / "out" / "tiny" / "a"
    cells = pd.read_csv(study_dir / "study.csv")
    assert cells[["framework", "variant", "lr", "seeds", "complete", "best_test_acc_n"]].values.tolist() == [
        ["torch", "scratch", 0.1, 2, 2, 2],
        ["torch", "scratch", 1.0, 2, 2, 2],
    ]
    runs = pd.read_csv(study_dir / "runs.csv")
    assert len(runs) == 4 and set(runs.lr) == {0.1, 1.0} and (runs.status == "complete").all()
    comparison = pd.read_csv(study_dir / "comparisons.csv").iloc[0]
    text = (study_dir / "study.md").read_text()
    assert text.startswith("# Study: tiny\n\n**Question.** Does a larger learning rate help here?")
    # the answer is made from the numbers in the tables
    assert (
        f"lr=1 vs lr=0.1 (torch, scratch): best test accuracy {comparison.arm_mean:.4f} vs "
        f"{comparison.baseline_mean:.4f}, "
        f"difference {comparison.difference:+.4f} (2 paired seeds"
    ) in text
    assert "2 worker(s) at once, 1 thread(s) each" in text and (study_dir / "study.png").is_file()
    snapshots = sorted(p.name for p in (study_dir / "snapshots").iterdir())
    assert len(snapshots) == 4 and all(name.endswith("_e002.npz") for name in snapshots)  # the final epoch's only
    # started again: nothing to run, the same answer
    before = _records(study_dir)
    assert study_main(_study("torch", path, data, tmp_path / "out", "a")[3:]) == 0
    assert _records(study_dir) == before
    # started again with another study file under the same id: refused, nothing written
    path.write_text(TINY.replace("[0.1, 1.0]", "[0.1, 3.0]"))
    assert study_main(_study("torch", path, data, tmp_path / "out", "a")[3:]) == 2
    assert _records(study_dir) == before


def test_killed_study_resumes_without_rerunning(torch_only, tmp_path):
    """The runner and its worker are killed outright (as a machine would be) after the first runs end;
    started again with the same --run-id, only the runs without a result run."""
    data = make_idx_dir(tmp_path / "data", 640, 100)
    path = write(tmp_path, TINY.replace("epochs = 2", "epochs = 3"), "tiny.toml")
    study_dir = tmp_path / "out" / "tiny" / "k"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        _study("torch", path, data, tmp_path / "out", "k", "--jobs", "1"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            recs = _records(study_dir) if (study_dir / "records.jsonl").exists() else []
            if sum(r["kind"] == "run_end" for r in recs) >= 2 and any(r["kind"] == "epoch" for r in recs[-3:]):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the study did not reach its third run in time")
        worker = next(r["pid"] for r in recs if r["kind"] == "worker")
        proc.kill()
        os.kill(worker, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    killed = _records(study_dir)
    ended = {r["config_id"] for r in killed if r["kind"] == "run_end"}
    assert len(ended) >= 2 and len(ended) < 4
    assert study_main(_study("torch", path, data, tmp_path / "out", "k")[3:]) == 0
    after = _records(study_dir)
    assert after[: len(killed)] == killed  # nothing measured was lost
    starts = pd.Series([r["config_id"] for r in after if r["kind"] == "run_start"]).value_counts()
    assert all(starts[c] == 1 for c in ended)  # a run with a result is not run again
    assert len(starts) == 4
    runs = pd.read_csv(study_dir / "runs.csv")
    assert len(runs) == 4 and (runs.status == "complete").all()
    epochs = pd.read_csv(study_dir / "epochs.csv")
    assert len(epochs) == 4 * 3  # the killed run's partial epochs are superseded, not counted twice


def test_ctrl_c_in_the_first_run_leaves_a_study_md_that_says_so(torch_only, tmp_path):
    """SIGINT while the first run trains (no run has ended) to a study answered with best = true (whose answer
    once raised on an empty comparison): study.md is written, says that no run completed, exit 130."""
    data = make_idx_dir(tmp_path / "data", 320, 100)
    text = TINY.replace("epochs = 2", "epochs = 500").replace("baseline = 0.1", "baseline = 0.1\nbest = true")
    path = write(tmp_path, text, "tiny.toml")
    study_dir = tmp_path / "out" / "tiny" / "c"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        _study("torch", path, data, tmp_path / "out", "c", "--jobs", "1"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            recs = _records(study_dir) if (study_dir / "records.jsonl").exists() else []
            if any(r["kind"] == "epoch" for r in recs):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the study's first run did not reach an epoch in time")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert not any(r["kind"] == "run_end" and r["status"] == "complete" for r in _records(study_dir))
    text = (study_dir / "study.md").read_text()
    assert "- torch, scratch: no arm has a complete run: no best arm." in text
    assert "No run completed (4 without a result): nothing to compare." in text
    assert "**No run has a complete result**" in text and "**This study was interrupted (SIGINT).**" in text
    assert json.loads((study_dir / "environment.json").read_text())["interrupted"] is True


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """IDX files of 1,024 training and 256 test images: one batch of the largest size a shipped study uses (1,024),
    and its population statistics (one batch); the smallest data every shipped study runs on, since this test
    asks only that each one runs and answers (the studies' figures come from docs/measured)."""
    return make_idx_dir(tmp_path_factory.mktemp("study-data"), 1024, 256)


@pytest.mark.parametrize("name", spec.shipped())
def test_every_shipped_study_runs_quick(torch_only, study_data, tmp_path, name):
    """Each file in studies/ with its --quick budget (capped by the small data), one seed, PyTorch: none rots."""
    code = study_main(
        [
            name,
            "--quick",
            "--data-dir",
            str(study_data),
            "--no-verify-data",
            "--frameworks",
            "torch",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
            "--run-id",
            "q",
            "--python",
            f"torch={sys.executable}",
            "--no-progress",
        ]
    )
    study_dir = tmp_path / name / "q"
    assert code == 0
    cells = pd.read_csv(study_dir / "study.csv")
    study = spec.load(spec.find(name))
    configs, _ = study.cells(quick=True, seeds=(0,))
    assert cells.seeds.sum() == len(configs)
    assert cells.missing.sum() == 0
    text = (study_dir / "study.md").read_text()
    answer = text.split("## Answer (measured)\n\n", 1)[1].split("\n\n", 1)[0]
    assert answer.startswith("- ") and "n/a" not in answer
    assert "**Every cell rests on one seed**" in text


def test_progress_counts_runs_failures_and_eta():
    """The study's progress (tqdm on a terminal, lines otherwise): runs ended / planned, the problems so
    far, elapsed time and an ETA; a line for each run that did not complete."""
    import io

    from compare.execution.progress import Progress

    ident = dict(framework="torch", variant="none", config_id="c1")
    ends = [
        records.make("run_end", **ident, seed=0, status="complete", epochs_done=2),
        records.make(
            "run_end",
            **ident,
            seed=1,
            status="diverged",
            epochs_done=0,
            message="the training loss stopped being finite",
        ),
        records.make("error", **ident, seed=2, status="failed", error_type="BackendUnavailable", message="no torch"),
    ]
    plain = io.StringIO()
    progress = Progress(live=False, total=4, stream=plain, labels={"c1": "lr=3"}, epoch_lines=False)
    for record in ends:
        progress.record(record)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("[1/4 runs]      torch none             seed 0 lr=3 complete; elapsed 0:00:00, ETA")
    assert lines[1] == ("     torch none             seed 1 lr=3 DIVERGED: the training loss stopped being finite")
    assert lines[2].startswith("[2/4 runs]      torch none             seed 1 lr=3 diverged (1 diverged); elapsed")
    assert lines[4].startswith("[3/4 runs]") and "(1 diverged, 1 failed)" in lines[4]
    assert progress.errors == 1
    live = io.StringIO()
    progress = Progress(live=True, total=4, stream=live, labels={"c1": "lr=3"}, epoch_lines=False)
    progress.update(
        {
            "framework": "torch",
            "variant": "none",
            "seed": 0,
            "config_id": "c1",
            "epoch": 1,
            "epochs": 2,
            "step": 5,
            "steps": 10,
            "time": 0.0,
        }
    )
    [bar] = progress._bars.values()
    assert (bar.n, bar.total) == (5, 10)  # the worker's bar (tqdm redraws it at most every 0.1 s)
    for record in ends:
        progress.record(record)
    progress.close()
    text = live.getvalue()
    assert "torch none             seed 0 lr=3 epoch 1/2" in text
    assert "3/4" in text and "1 diverged, 1 failed" in text  # the study's bar
    assert "seed 1 lr=3 DIVERGED" in text
