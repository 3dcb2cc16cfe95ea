"""Runs and studies mirrored into MLflow (compare.reporting.tracking), read back with MLflow's own client and compared
with records.jsonl: every run, parameter, epoch metric, status, the parent/child structure, the artifacts.

Against MLflow's embedded SQLite store and against a real `mlflow server` that the tests start on
127.0.0.1 (a free port of their own) and stop. `tox -e tracking` (MLflow is in the orchestrator's envs
only); the workers run in the torch env, found or created as compare.run does.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from common import records
from compare.report import main as report_main
from compare.reporting import tracking
from compare.reporting.tables import latest_attempts
from compare.run import main as run_main
from compare.study import main as study_main
from tests.helpers import make_idx_dir, write
from tests.made import TINY, epoch_record

pytestmark = pytest.mark.tracking
ROOT = Path(__file__).resolve().parent.parent
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
SERVER_START_SECONDS = 90
BACKEND = {
    "framework": "torch",
    "version": "2.13.0",
    "device": "cpu",
    "device_name": "CPU",
    "execution": "eager",
    "bn_decay": 0.9,
    "bn_epsilon": 1e-5,
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory, framework):
    from mlflow.tracking import MlflowClient  # noqa: F401  (with --tracking, MLflow must be here)

    if framework != "torch":
        pytest.skip("the tracking tests run PyTorch workers (tox -e tracking)")
    return make_idx_dir(tmp_path_factory.mktemp("data"), 320, 100)


def _python():
    torch_env = ROOT / ".tox" / "torch" / "bin" / "python"
    return ["--python", f"torch={torch_env}"] if torch_env.exists() else []


def _run_args(data, out, run_id, *extra):
    return [
        "--frameworks",
        "torch",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--probe-size",
        "32",
        "--population-size",
        "64",
        "--data-dir",
        str(data),
        "--no-verify-data",
        "--out",
        str(out),
        "--run-id",
        run_id,
        "--no-progress",
        *_python(),
        *extra,
    ]


def _records(folder):
    lines = (Path(folder) / "records.jsonl").read_text().splitlines()
    return latest_attempts([json.loads(line) for line in lines if line.strip()])


def check_mirror(uri, folder, experiment):
    """Everything records.jsonl says of each run is in MLflow, and nothing else is: one child run per
    suite run, its parameters, every epoch's metrics at its step, its status; the parent's files."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(tracking.KEY_TAG) == tracking.PARENT_KEY]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags[tracking.KEY_TAG]: r for r in runs if r is not parent}
    recs = _records(folder)
    plans = {f"{r['framework']}/{r['config_id']}": r for r in recs if r["kind"] == "plan"}
    assert sorted(children) == sorted(plans) and len(runs) == len(plans) + 1, "one MLflow run per suite run"
    ends = {f"{r['framework']}/{r['config_id']}": r for r in recs if r["kind"] in ("run_end", "error")}
    for key, plan in plans.items():
        run = children[key]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for field in ("framework", "variant", "config_id"):
            assert run.data.tags[field] == str(plan[field])
        assert run.data.tags["seed"] == str(plan["seed"])
        for name, value in (plan.get("coords") or {}).items():
            assert run.data.tags[f"coord.{name}"] == str(value)
        want = {"framework": plan["framework"], **tracking.flatten(plan["config"])}
        assert {k: v for k, v in run.data.params.items() if not k.startswith("backend.")} == want
        starts = [r for r in recs if r["kind"] == "run_start" and f"{r['framework']}/{r['config_id']}" == key]
        for k, v in (starts[-1]["backend"] if starts else {}).items():
            assert run.data.params[f"backend.{k}"] == str(v)
        epochs = [r for r in recs if r["kind"] == "epoch" and f"{r['framework']}/{r['config_id']}" == key]
        for name in tracking.epoch_metrics(epochs[0]) if epochs else {}:
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
            assert history == {e["epoch"]: pytest.approx(tracking.epoch_metrics(e)[name]) for e in epochs}, (
                f"{key} {name}"
            )
        end = ends.get(key)
        status = end["status"] if end else "interrupted"  # as the reports read a run without an end record
        assert run.data.tags["status"] == status and run.info.status == tracking.STATUS[status], key
        if end and end.get("message"):
            assert run.data.tags["message"] == end["message"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    files = {p.name for p in Path(folder).iterdir() if p.suffix in (".csv", ".png") or p.name in tracking.REPORT_FILES}
    assert artifacts == files and {"runs.csv", "epochs.csv"} <= artifacts and artifacts & {"report.md", "study.md"}
    return client, parent, children


def test_a_run_in_the_embedded_store(data, tmp_path):
    assert run_main(_run_args(data, tmp_path, "r", "--variants", "scratch,none", "--mlflow")) == 0
    folder = tmp_path / "r"
    uri = tracking.embedded_uri(folder)
    client, parent, children = check_mirror(uri, folder, "r")
    assert parent.info.status == "FINISHED" and len(children) == 2
    scratch = next(r for r in children.values() if r.data.tags["variant"] == "scratch")
    names = set(scratch.data.metrics)
    # the records' own names, as a programmatic user filters on them (no `1 test_acc` to quote)
    assert set(tracking.HEADLINE) | {"bn1.lag_mean_gap", "test_loss"} <= names
    assert not any(name[0].isdigit() for name in names)
    found = client.search_runs([client.get_experiment_by_name("r").experiment_id], "metrics.test_acc > 0")
    assert {r.info.run_id for r in found} == {r.info.run_id for r in children.values()}
    assert client.get_experiment_by_name("r").tags["mlflow.experimentKind"] == "custom_model_development"


def _status_records(folder):
    """A run folder whose records hold every status: complete, diverged, interrupted (no end record, and
    an interrupted end), crashed, failed."""
    from common.config import RunConfig

    out = []
    for seed, status in enumerate(["complete", "diverged", "interrupted", "crashed", "failed", None]):
        config = RunConfig(seed=seed, epochs=2)
        ident = dict(framework="torch", variant="scratch", seed=seed, config_id=config.config_id)
        out.append(records.make("plan", **ident, epochs=2, config=config.to_dict()))
        if status != "failed":
            out.append(records.make("run_start", **ident, config=config.to_dict(), backend=BACKEND))
            out.append(epoch_record(seed=seed, epoch=1, config_id=config.config_id, test_acc=0.1 * seed))
        if status in ("complete", "diverged", "interrupted"):
            out.append(
                records.make(
                    "run_end",
                    **ident,
                    status=status,
                    epochs_done=1,
                    **({"message": "the training loss stopped being finite"} if status == "diverged" else {}),
                )
            )
        elif status:
            out.append(
                records.make(
                    "error", **ident, status=status, error_type="WorkerCrashed", message=f"{status} for the test"
                )
            )
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return folder


def test_statuses_and_a_rebuild_that_never_duplicates(tmp_path):
    folder = _status_records(tmp_path / "s")
    assert report_main([str(folder), "--mlflow"]) == 0
    uri = tracking.embedded_uri(folder)
    client, _, children = check_mirror(uri, folder, "s")
    by_seed = {r.data.tags["seed"]: r for r in children.values()}
    assert {s: (r.info.status, r.data.tags.get("status")) for s, r in by_seed.items()} == {
        "0": ("FINISHED", "complete"),
        "1": ("FINISHED", "diverged"),
        "2": ("KILLED", "interrupted"),
        "3": ("FAILED", "crashed"),
        "4": ("FAILED", "failed"),
        "5": ("KILLED", "interrupted"),
    }
    assert by_seed["3"].data.tags["message"] == "crashed for the test"
    assert by_seed["5"].data.tags["message"] == tracking.NO_END
    assert report_main([str(folder), "--mlflow"]) == 0  # again: the same runs, replaced, not added
    _, _, again = check_mirror(uri, folder, "s")
    assert len(again) == 6


@pytest.fixture
def server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 (its own free port), stopped at the end; returns
    (uri, start, stop) so a test can stop it and start it again on the same store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "server"
    store.mkdir()
    procs = []

    def start():
        proc = subprocess.Popen(
            [
                MLFLOW,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{store / 'mlflow.db'}",
                "--artifacts-destination",
                str(store / "artifacts"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(store / "server.log", "ab"),
            start_new_session=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
            if proc.poll() is not None:
                break
        stop()
        pytest.fail(f"mlflow server did not start: {(store / 'server.log').read_text()[-2000:]}")

    def stop():
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(20)

    start()
    try:
        yield f"http://127.0.0.1:{port}", start, stop
    finally:
        stop()


def test_a_study_on_a_tracking_server(data, tmp_path, server):
    uri, _, _ = server
    path = write(tmp_path, TINY, "tiny.toml")
    assert (
        study_main(
            [
                str(path),
                "--data-dir",
                str(data),
                "--no-verify-data",
                "--out",
                str(tmp_path / "out"),
                "--run-id",
                "a",
                "--no-progress",
                "--jobs",
                "1",
                *_python(),
                "--mlflow",
                uri,
            ]
        )
        == 0
    )
    folder = tmp_path / "out" / "tiny" / "a"
    client, parent, children = check_mirror(uri, folder, "tiny study a")
    assert len(children) == 4 and {r.data.tags["coord.lr"] for r in children.values()} == {"0.1", "1.0"}
    assert "study.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # started again with the same run id: nothing runs, nothing is added
    assert (
        study_main(
            [
                str(path),
                "--data-dir",
                str(data),
                "--no-verify-data",
                "--out",
                str(tmp_path / "out"),
                "--run-id",
                "a",
                "--no-progress",
                *_python(),
                "--mlflow",
                uri,
            ]
        )
        == 0
    )
    _, _, again = check_mirror(uri, folder, "tiny study a")
    assert {k: r.info.run_id for k, r in again.items()} == {k: r.info.run_id for k, r in children.items()}


def test_a_tracker_that_stops_mid_run_costs_no_record(data, tmp_path, server):
    """The server is stopped after the first epoch: the run completes with every record, says what was
    not logged, and the folder fills the tracker afterwards."""
    uri, start, stop = server
    argv = [
        sys.executable,
        "-m",
        "compare.run",
        *_run_args(data, tmp_path, "o", "--variants", "scratch,builtin", "--epochs", "4", "--mlflow", uri),
    ]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    folder = tmp_path / "o"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (folder / "records.jsonl").exists() and '"kind": "epoch"' in (folder / "records.jsonl").read_text():
                break
            time.sleep(0.05)
        stop()
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    recs = _records(folder)
    assert sum(r["kind"] == "epoch" for r in recs) == 8 and sum(r["kind"] == "run_end" for r in recs) == 2
    assert "did not take" in err and "python -m compare.report" in err and "epoch" in err.split("did not take")[1]
    start()
    assert report_main([str(folder), "--mlflow", uri]) == 0
    check_mirror(uri, folder, "o")


def test_mlflow_options_are_checked_before_anything_runs(tmp_path, capsys):
    assert (
        run_main(["--frameworks", "torch", "--out", str(tmp_path), "--run-id", "x", "--mlflow", "ftp://nowhere"]) == 2
    )
    assert "--mlflow 'ftp://nowhere': give a tracking server" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
