"""Every run has an honest status: complete, diverged, interrupted, crashed or failed.

Framework-free here: the report's robustness to bad records, the statuses it
derives, the command-line checks, and divergence through the real loop with a
scripted backend. With the PyTorch worker (tox -e torch): SIGINT and SIGTERM
to a real runner mid-run, and a real diverging configuration.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import ModelSpec, RunConfig
from common.data import Dataset
from common.interface import ProbeResult
from common.loop import divergence_message
from common.loop import run as run_loop
from compare import report
from compare.reporting import files, tables
from compare.run import main as run_main
from tests.helpers import make_idx_dir
from tests.made import epoch_record, run_records
from tests.scripted_backend import Script, scripted_backend

ROOT = Path(__file__).resolve().parent.parent


def write_run(run_dir, lines, env=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "records.jsonl").write_bytes(
        b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    )
    if env is not None:
        (run_dir / "environment.json").write_bytes(env)
    return run_dir


# Statuses the report derives ---------------------------------------------------
def test_each_status_reaches_runs_summary_and_report(tmp_path):
    lines = []
    lines += run_records(variant="scratch", seed=0)  # complete after 3 epochs
    lines += [epoch_record(variant="scratch", seed=0, epoch=e, test_acc=0.7) for e in (1, 2, 3)]
    plan, end = run_records(
        variant="builtin",
        seed=0,
        status="diverged",
        epochs_done=1,
        diverged_epoch=2,
        diverged_step=7,
        message="the training loss stopped being finite",
    )
    lines += [plan, epoch_record(variant="builtin", seed=0, epoch=1, test_acc=0.6), end]
    lines += [
        run_records(variant="none", seed=0)[0],  # planned, one epoch, then nothing: the runner died
        epoch_record(variant="none", seed=0, epoch=1, test_acc=0.3),
    ]
    lines += run_records(
        variant="builtin-defaults",
        seed=0,
        status="crashed",
        error_type="WorkerCrashed",
        exit_status=-9,
        message="the worker exited with status -9",
    )
    lines += run_records(
        framework="mxnet",
        variant="scratch",
        seed=0,
        status="failed",
        error_type="BackendUnavailable",
        message="cannot import MXNet",
    )
    run_dir = write_run(tmp_path / "run", lines)
    assert report.main([str(run_dir)]) == 0
    runs = pd.read_csv(run_dir / "runs.csv").set_index(["framework", "variant"])
    assert runs.status.to_dict() == {
        ("torch", "scratch"): "complete",
        ("torch", "builtin"): "diverged",
        ("torch", "none"): "interrupted",
        ("torch", "builtin-defaults"): "crashed",
        ("mxnet", "scratch"): "failed",
    }
    assert (
        runs.loc[("torch", "builtin"), "diverged_epoch"] == 2 and runs.loc[("torch", "builtin"), "diverged_step"] == 7
    )
    assert runs.loc[("torch", "none"), "epochs_done"] == 1 and files.NO_END in runs.loc[("torch", "none"), "detail"]
    assert runs.loc[("torch", "builtin-defaults"), "exit_status"] == -9
    summary = pd.read_csv(run_dir / "summary.csv").set_index(["framework", "variant"])
    assert summary.loc[("torch", "builtin"), "status"] == "diverged"
    assert str(summary.loc[("torch", "builtin"), "final_epoch"]) == "1"  # the epoch its accuracy comes from
    assert summary.loc[("mxnet", "scratch"), "status"] == "failed"  # a run with no epoch still has its row
    assert summary.loc[("torch", "builtin-defaults"), "errors"] == 1
    epochs = pd.read_csv(run_dir / "epochs.csv")
    assert set(zip(epochs.variant, epochs.status)) == {
        ("scratch", "complete"),
        ("builtin", "diverged"),
        ("none", "interrupted"),
    }
    text = (run_dir / "report.md").read_text()
    assert "| torch | builtin | **diverged** |" in text
    assert "0.6000 (to epoch 1 of 3)" in text and "| torch | none | **interrupted** |" in text
    assert "## Runs that did not complete" in text


def test_status_summary_counts_mixed_seeds():
    assert tables.status_summary(["complete", "complete"]) == "complete"
    assert tables.status_summary(["diverged", "complete", "complete"]) == "2 complete, 1 diverged"


# A robust report -----------------------------------------------------------------
def test_report_skips_and_names_every_unusable_line(tmp_path):
    good = run_records() + (epoch_record(epoch=1, test_acc=0.5),)
    lacking = {k: v for k, v in epoch_record(epoch=2).items() if k != "test_acc"}
    lines = [
        good[0],
        b"42",
        b"null",
        lacking,
        b"\xff\xfe not utf-8",
        b'{"kind": "epoch", cut',
        good[2],
        good[1],
        {"kind": "mystery"},
    ]
    run_dir = write_run(tmp_path / "run", lines, env=b"{ not json")
    assert report.main([str(run_dir)]) == 0
    text = (run_dir / "report.md").read_text()
    for number, reason in (
        (2, "not a record (a JSON int)"),
        (3, "not a record (a JSON NoneType)"),
        (4, "epoch record lacks test_acc"),
        (5, "not UTF-8"),
        (6, "not valid JSON"),
        (9, "unknown record kind 'mystery'"),
    ):
        assert f"line {number}: {reason}" in text, (number, reason)
    assert "6 line(s) of records.jsonl could not be used" in text
    assert "environment.json is corrupt" in text
    summary = pd.read_csv(run_dir / "summary.csv")
    assert list(summary.status) == ["complete"] and summary.best_test_acc[0] == 0.5


def test_report_exit_status(tmp_path, capsys):
    assert report.main([str(tmp_path / "nothing-here")]) == 2
    assert "records.jsonl not found" in capsys.readouterr().err
    write_run(tmp_path / "junk", [b"42", b"garbage"])
    assert report.main([str(tmp_path / "junk")]) == 1  # nothing could be read
    assert "no usable record" in capsys.readouterr().err


# Command-line checks before anything runs ----------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,0"], "seed 0 listed twice"),
        (["--variants", "scratch,scratch"], "variant scratch listed twice"),
        (["--run-id", "a/b"], "--run-id 'a/b' must be a plain folder name"),
        (["--run-id", ".."], "must be a plain folder name"),
        # BN's backward written out: plain BN only, one process
        (["--norm", "layer", "--norm-backward", "closed-form"], "--norm-backward closed-form is BN's own backward"),
        (["--variants", "scratch", "--norm-backward", "closed-form", "--ghost-batch", "8"], "without --ghost-batch"),
        (["--variants", "scratch", "--norm-backward", "closed-form", "--replicas", "2"], "closed-form with --replicas"),
        # PyTorch's replicas over several machines (docs/clusters.md)
        (["--replica-nodes", "2"], "--replica-nodes 2 needs --replica-address HOST:PORT"),
        (["--replica-nodes", "0", "--replica-address", "h:1"], "--replica-nodes must be at least 1, got 0"),
        (["--replica-address", "10.0.0.1:29500"], "--replica-address is for --replica-nodes 2 or more"),
        (["--replica-nodes", "2", "--replica-address", "10.0.0.1"], "--replica-address must be HOST:PORT"),
        (["--replica-nodes", "2", "--replica-address", "h:99999"], "--replica-address must be HOST:PORT"),
        (
            ["--replica-nodes", "2", "--replica-address", "h:1", "--replicas", "2", "--frameworks", "torch,jax"],
            "--replica-nodes spreads PyTorch's replicas only; jax run(s) theirs on one machine",
        ),
        (
            [
                "--replica-nodes",
                "2",
                "--replica-address",
                "h:1",
                "--frameworks",
                "torch",
                "--replicas",
                "3",
                "--batch-size",
                "6",
            ],
            "--replicas 3 over --replica-nodes 2: every machine runs an equal share",
        ),
        (
            ["--replica-nodes", "2", "--replica-address", "h:1", "--executor", "ray"],
            "--replica-nodes runs with the local executor",
        ),
    ],
)
def test_bad_run_options(argv, message, tmp_path, capsys):
    data = make_idx_dir(tmp_path / "data", 20, 20)
    out = tmp_path / "out"
    assert run_main(argv + ["--data-dir", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err
    assert not out.exists()


def test_out_that_is_a_file(tmp_path, capsys):
    data = make_idx_dir(tmp_path / "data", 20, 20)
    (tmp_path / "file").write_text("x")
    assert run_main(["--data-dir", str(data), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert run_main(["--data-dir", str(data), "--out", str(tmp_path / "file" / "below")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_a_python_without_the_report_packages_fails_before_any_worker_starts(tmp_path):
    """python -m compare.run from a Python that cannot import pandas (here: sys.modules["pandas"] = None, which
    makes every import of it raise as a missing package does) exits 2 within seconds with the line that installs
    requirements/compare.txt, before any worker starts or anything is written, instead of after the training."""
    data = make_idx_dir(tmp_path / "data", 20, 20)
    out = tmp_path / "out"
    code = (
        "import runpy, sys; sys.modules['pandas'] = None; "
        f"sys.argv = ['compare.run', '--frameworks', 'torch', '--quick', '--data-dir', {str(data)!r}, "
        f"'--out', {str(out)!r}]; runpy.run_module('compare.run', run_name='__main__')"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 20, "the check came late"
    assert "cannot import pandas" in proc.stderr and "-m pip install -r" in proc.stderr, proc.stderr
    assert "requirements/compare.txt" in proc.stderr, proc.stderr
    assert not out.exists(), "something was written before the check"


# Divergence through the real loop ------------------------------------------------
def test_divergence_is_a_result_with_its_epoch_and_step():
    nan_from = (2, 3)  # epoch 2, step index 3 (the 4th step)

    def stats(epoch, step):
        return (np.nan if (epoch, step) >= nan_from else 1.0, 2.0)

    script = Script(
        step_seconds=lambda e, s: 0.1,
        step_stats=stats,
        eval_stats=(1.0, 2.0),
        probe=ProbeResult(np.eye(4), np.eye(4), {}),
        bn_epsilon=1e-5,
    )
    data = Dataset(
        np.zeros((40, 1, 28, 28), np.float32),
        np.zeros(40, np.int64),
        np.zeros((4, 1, 28, 28), np.float32),
        np.arange(4),
        "scripted",
        False,
    )
    config = RunConfig(model=ModelSpec(variant="none"), lr=3.0, batch_size=4, epochs=4, probe_size=4, device="cpu")
    out = []
    run_loop(scripted_backend(script), config, data, lambda record, arrays=None: out.append(record), clock=script.clock)
    assert [r["kind"] for r in out] == ["run_start", "epoch", "run_end"]
    end = out[-1]
    assert (end["status"], end["diverged_epoch"], end["diverged_step"], end["epochs_done"]) == ("diverged", 2, 4, 1)
    assert "epoch 2, step 4 of 10" in end["message"] and "variant none, lr 3" in end["message"]
    assert "add BN" in end["message"]


def test_divergence_message_fits_the_variant():
    bn = divergence_message(RunConfig(lr=30.0), 1, 5, 10)
    assert "lr 30" in bn and "variant scratch" in bn and "already has BN" in bn and "add BN" not in bn
    partial = divergence_message(RunConfig(model=ModelSpec(norm_positions=("fc1",), freeze_gamma_beta=True)), 1, 1, 9)
    assert "--norm-positions" in partial and "gamma and beta are frozen" in partial
    none = divergence_message(RunConfig(model=ModelSpec(variant="none"), lr=1000.0), 3, 2, 9)
    assert "add BN (--variants scratch or builtin)" in none and "lr 1000" in none


# With the PyTorch worker ---------------------------------------------------------
FRAMEWORK = "torch"


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines() if line.strip()]


def _start_runner(tmp_path, *extra):
    data = make_idx_dir(tmp_path / "data", 640, 200)
    argv = [
        sys.executable,
        "-m",
        "compare.run",
        "--frameworks",
        "torch",
        "--variants",
        "scratch,builtin,none",
        "--epochs",
        "10",
        "--batch-size",
        "64",
        "--data-dir",
        str(data),
        "--no-verify-data",
        "--out",
        str(tmp_path / "out"),
        "--run-id",
        "r",
        "--python",
        f"torch={sys.executable}",
        "--probe-size",
        "64",
        "--no-progress",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(run_dir, predicate, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (run_dir / "records.jsonl").exists() and predicate(_records(run_dir)):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"the run never reached the point to signal it: {proc.communicate()[1][-2000:]}")


SECOND_SIGNAL = """
import os, signal, time
from compare.execution.executor import Signals

class Worker:  # what Signals needs of a worker; its first signal brings a second at once, as under tox -q
    def __init__(self):
        self.got, self.alive = [], True
    def poll(self):
        return None if self.alive else 0
    def send_signal(self, signum):
        self.got.append(signal.Signals(signum).name)
        os.kill(os.getpid(), signal.SIGINT)  # tox forwards the terminal's SIGINT to its command again
    def kill(self):
        self.got.append("kill")
        self.alive = False

muted = []
signals = Signals(on_signal=lambda: muted.append(True))
worker = Worker()
signals.add(worker)
os.kill(os.getpid(), signal.SIGINT)
deadline = time.monotonic() + 10
while worker.alive and time.monotonic() < deadline:
    time.sleep(0.01)
signals.restore()
print(worker.got, muted)
"""


def test_a_second_signal_during_the_first_is_forwarded_not_deadlocked():
    """Under `tox -q -e run`, Ctrl-C reaches the runner twice within a fraction of a second (the terminal's
    SIGINT, then tox's). A handler that held a lock while forwarding the first was re-entered by the second
    and waited on its own lock forever: no report. The first signal is forwarded to the worker, the second
    kills it, and the progress display is muted once."""
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['SIGINT', 'kill'] [True]"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_leaves_an_honest_report(native, tmp_path, signum):
    proc = _start_runner(tmp_path)
    run_dir = tmp_path / "out" / "r"
    try:
        # signal in the second variant: scratch has ended, builtin has at least one epoch
        _wait_for(run_dir, lambda rs: any(r["kind"] == "epoch" and r["variant"] == "builtin" for r in rs), proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "interrupted by " + signal.Signals(signum).name in err and "report: " in err
    worker = next(r for r in _records(run_dir) if r["kind"] == "worker")
    with pytest.raises(ProcessLookupError):  # no worker left behind
        os.kill(worker["pid"], 0)
    runs = pd.read_csv(run_dir / "runs.csv").set_index("variant")
    assert runs.status.to_dict() == {"scratch": "complete", "builtin": "interrupted", "none": "interrupted"}
    assert 1 <= runs.epochs_done["builtin"] < 10 and runs.epochs_done["none"] == 0
    assert runs.epochs_done["scratch"] == 10
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["interrupted"] is True and env["signal"] == signal.Signals(signum).name
    text = (run_dir / "report.md").read_text()
    assert "This run was interrupted" in text and "| torch | builtin | float32 | **interrupted** |" in text


def test_a_diverging_run_does_not_stop_the_others(native, tmp_path):
    """relu, lr 300, seed 0 on the CPU: scratch BN diverges in its first epoch (measured with PyTorch
    2.13; the run repeats bit for bit), the network without BN does not."""
    data = make_idx_dir(tmp_path / "data", 640, 200)
    code = run_main(
        [
            "--frameworks",
            "torch",
            "--variants",
            "scratch,none",
            "--activation",
            "relu",
            "--lr",
            "300",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--out",
            str(tmp_path / "out"),
            "--run-id",
            "d",
            "--python",
            f"torch={sys.executable}",
            "--probe-size",
            "64",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, "a diverged run is a result, not an error"
    runs = pd.read_csv(tmp_path / "out" / "d" / "runs.csv").set_index("variant")
    assert runs.status.to_dict() == {"scratch": "diverged", "none": "complete"}
    assert runs.diverged_epoch["scratch"] == 1 and runs.epochs_done["scratch"] == 0
    assert "lr 300" in runs.detail["scratch"] and runs.epochs_done["none"] == 2


def test_a_killed_worker_is_crashed_with_its_exit_status(native, tmp_path):
    proc = _start_runner(tmp_path)
    run_dir = tmp_path / "out" / "r"
    try:
        _wait_for(run_dir, lambda rs: any(r["kind"] == "epoch" and r["variant"] == "builtin" for r in rs), proc)
        worker = next(r for r in _records(run_dir) if r["kind"] == "worker")
        os.kill(worker["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-2000:]
    runs = pd.read_csv(run_dir / "runs.csv").set_index("variant")
    assert runs.status.to_dict() == {"scratch": "complete", "builtin": "crashed", "none": "crashed"}
    assert (runs.exit_status[["builtin", "none"]] == -signal.SIGKILL).all()
    assert runs.epochs_done["builtin"] >= 1 and "status -9" in runs.detail["builtin"]
    assert isinstance(runs.log_tail["builtin"], str)  # the real end of the worker's log
