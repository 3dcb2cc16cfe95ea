"""The Ray executor on a real two-node Ray cluster started here (tox -e ray; the workers run in the
torch env, found or created as compare.run does).

`ray start --head` and a second `ray start` node, both on this machine, inside a network namespace
whose only interface is loopback (tests/loopback.py; Ray's servers listen on every interface), for
at most a few minutes, and stopped at the end. Against it: a study gives the same records as the
local executor; workers killed mid-run are retried and the study completes; with no retries left,
their runs are crashed and every other run's rows are kept; Ctrl-C leaves records a resume finishes.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from compare.study import main as study_main
from tests.helpers import make_idx_dir
from tests.loopback import loopback_only
from tests.made import TIMING, TINY

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT = 120


def _stop_ray():
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(framework):
    """The address of a two-node local Ray cluster (1 CPU each), stopped at the end."""
    import ray  # noqa: F401  (with --ray, Ray must be here: an import error is a failure, not a skip)

    if framework != "torch":
        pytest.skip("the Ray tests run PyTorch workers (tox -e ray)")
    why = os.environ.get("BN_LOOPBACK_UNAVAILABLE")
    if why:
        pytest.skip(
            f"Ray cannot start here with loopback-only servers ({why}); Ray's servers listen on "
            f"every interface, so the tests run it in a network namespace of its own"
        )
    if not loopback_only():
        pytest.skip(
            "Ray's servers listen on every interface: run these tests with loopback as the only "
            "network, `python tests/loopback.py python -m pytest tests/test_ray.py` (tox -e ray does)"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    # token authentication with a token of this test's own, seen by the nodes, the driver and the workers
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    try:
        for command in (
            [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            [RAY, "start", f"--address=127.0.0.1:{port}", *common],
        ):
            proc = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT)
            assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
        yield f"127.0.0.1:{port}"
    finally:
        _stop_ray()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _study_args(path, data, out, run_id, *extra):
    return [
        str(path),
        "--data-dir",
        str(data),
        "--no-verify-data",
        "--out",
        str(out),
        "--run-id",
        run_id,
        "--no-progress",
        *extra,
    ]


def _records(study_dir):
    return [json.loads(line) for line in (study_dir / "records.jsonl").read_text().splitlines() if line.strip()]


def _measured(recs):
    """(config_id, epoch) -> the epoch record without its timing figures."""
    return {
        (r["config_id"], r["epoch"]): {k: v for k, v in r.items() if k not in TIMING}
        for r in recs
        if r["kind"] == "epoch"
    }


def test_ray_gives_the_same_study_as_local(cluster, tmp_path):
    data = make_idx_dir(tmp_path / "data", 320, 100)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    assert study_main(_study_args(path, data, tmp_path / "out", "local", "--jobs", "2")) == 0
    assert (
        _run(_study_args(path, data, tmp_path / "out", "ray", "--executor", "ray", "--address", cluster), tmp_path) == 0
    ), (tmp_path / "driver.log").read_text()
    local, remote = tmp_path / "out" / "tiny" / "local", tmp_path / "out" / "tiny" / "ray"
    a, b = _measured(_records(local)), _measured(_records(remote))
    assert len(a) == 4 * 2 and a == b  # every loss, accuracy and divergence figure, bit for bit
    for snapshot in sorted((local / "snapshots").iterdir()):  # the final snapshots came back from the nodes
        with np.load(snapshot) as x, np.load(remote / "snapshots" / snapshot.name) as y:
            assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)
    throughput = [c for c in pd.read_csv(local / "study.csv").columns if "per_s" in c]
    pd.testing.assert_frame_equal(
        pd.read_csv(local / "study.csv").drop(columns=throughput),
        pd.read_csv(remote / "study.csv").drop(columns=throughput),
    )
    env = json.loads((remote / "environment.json").read_text())
    assert (env["executor"], env["ray_nodes"], env["ray_cpus"], env["jobs"]) == ("ray", 2, 2, 2)
    assert "attempt 1 on node 127.0.0.1" in "".join(p.read_text() for p in (remote / "logs").iterdir())


def _run(args, tmp_path) -> int:
    """compare.study in a process of its own (as a user runs it: Ray reads its settings on import)."""
    proc = _start(args, tmp_path)
    try:
        return proc.wait(300)
    finally:
        proc.kill()
        proc.wait()


def _start(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "compare.study", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "driver.log", "w"),
    )


def _wait_for(study_dir, ready, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = _records(study_dir) if (study_dir / "records.jsonl").exists() else []
        if ready(recs):
            return recs
        assert proc.poll() is None, "the study ended before the test could act"
        time.sleep(0.05)
    pytest.fail("the study did not get there in time")


def _kill_the_workers_mid_run(cluster, tmp_path, retries):
    """Start a study on the cluster; once one run has ended and another is under way, kill every worker
    (as a lost node would); let the study end. Returns (study dir, runs ended before the kill, exit)."""
    data = make_idx_dir(tmp_path / "data", 640, 100)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace("epochs = 2", "epochs = 3"))
    study_dir = tmp_path / "out" / "tiny" / "k"
    proc = _start(
        _study_args(
            path, data, tmp_path / "out", "k", "--executor", "ray", "--address", cluster, "--retries", str(retries)
        ),
        tmp_path,
    )

    def midway(recs):
        ended = {r["config_id"] for r in recs if r["kind"] == "run_end"}
        return ended and any(r["kind"] == "epoch" and r["config_id"] not in ended for r in recs)

    try:
        recs = _wait_for(study_dir, midway, proc)
        for worker in (r["pid"] for r in recs if r["kind"] == "worker"):
            os.kill(worker, signal.SIGKILL)
        ended = {r["config_id"] for r in _records(study_dir) if r["kind"] == "run_end"}
        code = proc.wait(240)
    finally:
        proc.kill()
        proc.wait()
    return study_dir, ended, code


def test_killed_workers_are_retried_and_the_study_completes(cluster, tmp_path):
    study_dir, ended, code = _kill_the_workers_mid_run(cluster, tmp_path, retries=1)
    assert code == 0, (tmp_path / "driver.log").read_text()
    runs = pd.read_csv(study_dir / "runs.csv").set_index("config_id")
    assert len(runs) == 4 and (runs.status == "complete").all()
    assert (runs.loc[sorted(ended), "attempts"] == 1).all()  # a run with a result is not run again
    retried = runs[runs.attempts == 2].index
    assert len(retried) >= 1 and set(retried).isdisjoint(ended)
    for config_id in retried:
        plans = [r for r in _records(study_dir) if r["kind"] == "plan" and r["config_id"] == config_id]
        assert [p.get("attempt", 1) for p in plans] == [1, 2]
    assert len(pd.read_csv(study_dir / "epochs.csv")) == 4 * 3  # the lost attempt's epochs are superseded
    assert "## Runs tried again" in (study_dir / "study.md").read_text()
    assert "retrying (attempt 2 of 2)" in (tmp_path / "driver.log").read_text()


def test_with_no_retries_left_the_lost_runs_crash_and_the_rest_is_kept(cluster, tmp_path):
    study_dir, ended, code = _kill_the_workers_mid_run(cluster, tmp_path, retries=0)
    assert code == 1
    runs = pd.read_csv(study_dir / "runs.csv").set_index("config_id")
    assert (runs.loc[sorted(ended), "status"] == "complete").all()  # what ended before is kept
    crashed = runs[runs.status == "crashed"]
    assert len(crashed) >= 1 and set(runs.status) <= {"complete", "crashed"}
    assert crashed.detail.str.contains("lost 1 time(s) (retries exhausted)", regex=False).all()
    epochs = pd.read_csv(study_dir / "epochs.csv")
    assert set(runs[runs.status == "complete"].index) <= set(epochs.config_id)
    assert "## Runs without a complete result" in (study_dir / "study.md").read_text()


def test_ctrl_c_cancels_the_tasks_and_a_resume_finishes(cluster, tmp_path):
    data = make_idx_dir(tmp_path / "data", 640, 100)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace("epochs = 2", "epochs = 3"))
    args = _study_args(path, data, tmp_path / "out", "c", "--executor", "ray", "--address", cluster)
    study_dir = tmp_path / "out" / "tiny" / "c"
    proc = _start(args, tmp_path)
    try:
        recs = _wait_for(study_dir, lambda recs: any(r["kind"] == "epoch" for r in recs), proc)
        workers = [r["pid"] for r in recs if r["kind"] == "worker"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130, (tmp_path / "driver.log").read_text()
    finally:
        proc.kill()
        proc.wait()
    for pid in workers:  # the cancelled tasks stopped their workers
        deadline = time.time() + 30
        while (
            time.time() < deadline
            and Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        ):
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    runs = pd.read_csv(study_dir / "runs.csv")
    assert "interrupted" in set(runs.status) and set(runs.status) <= {"complete", "interrupted"}
    done = set(runs[runs.status == "complete"].config_id)
    assert _run(args, tmp_path) == 0, (tmp_path / "driver.log").read_text()
    after = _records(study_dir)
    starts = pd.Series([r["config_id"] for r in after if r["kind"] == "run_start"]).value_counts()
    assert all(starts[c] == 1 for c in done)
    assert (pd.read_csv(study_dir / "runs.csv").status == "complete").all()


def test_a_node_without_the_framework_env_fails_those_runs_naming_the_node(cluster, tmp_path):
    data = make_idx_dir(tmp_path / "data", 320, 100)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    args = _study_args(
        path,
        data,
        tmp_path / "out",
        "n",
        "--executor",
        "ray",
        "--address",
        cluster,
        "--python",
        "torch=/nonexistent/bin/python",
    )
    assert _run(args, tmp_path) == 1
    runs = pd.read_csv(tmp_path / "out" / "tiny" / "n" / "runs.csv")
    assert (runs.status == "failed").all() and len(runs) == 4
    assert runs.detail.str.startswith(
        "node 127.0.0.1 has no environment for torch: --python torch=/nonexistent/bin/python: no such interpreter"
    ).all()
