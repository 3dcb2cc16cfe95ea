"""PyTorch's data-parallel replicas over two machines (docs/clusters.md), as two network namespaces joined by a
veth pair and nothing else (tests/loopback.two_hosts): host a runs the comparison with --replica-nodes 2 and two
of the four replicas, host b `python -m frameworks.torch.follower serve` and the other two. The run must take the
one-machine run's steps: the same per-step losses and final parameters, in float64, under global sync (the BN
statistics pooled across the machines as well as the gradients).

Needs root and iproute2 (the test skips, saying so, elsewhere); every process is bounded in time and stopped, and
the namespaces are deleted, by the test.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compare.run import main as run_main
from tests.helpers import make_idx_dir
from tests.loopback import two_hosts

FRAMEWORK = "torch"
ROOT = Path(__file__).resolve().parent.parent
PORT = 29517
TIMEOUT_S = 240
ARGS = [
    "--frameworks", "torch", "--variants", "scratch", "--epochs", "1", "--batch-size", "32", "--lr", "0.5",
    "--dtype", "float64", "--device", "cpu", "--replicas", "4", "--bn-sync", "global", "--probe-size", "32",
    "--population-size", "64", "--trace-steps", "16", "--no-verify-data", "--no-progress",
]  # fmt: skip


def _run(run_dir: Path) -> tuple:
    """The epoch's per-step losses and the final snapshot's arrays of a run."""
    (epoch,) = [r for r in map(json.loads, (run_dir / "records.jsonl").open()) if r.get("kind") == "epoch"]
    (snapshot,) = (run_dir / "snapshots").glob("*.npz")
    with np.load(snapshot) as arrays:
        return np.array(epoch["step_losses"]), {name: arrays[name] for name in arrays.files}


def _stop(process) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_two_machines_take_the_one_machine_steps(native, tmp_path):
    data = make_idx_dir(tmp_path / "data", 512, 128)
    common = [*ARGS, "--data-dir", str(data), "--out", str(tmp_path)]
    assert run_main([*common, "--run-id", "one"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with contextlib.ExitStack() as stack:
        try:
            (a_ns, a_if, a_address), (b_ns, b_if, _) = stack.enter_context(two_hosts("bn"))
        except OSError as exc:
            pytest.skip(f"two machines as network namespaces: {exc}")
        address = f"{a_address}:{PORT}"
        with (tmp_path / "agent.log").open("w") as log:
            agent = subprocess.Popen(
                # gloo picks the interface that reaches the other machine from GLOO_SOCKET_IFNAME (docs/clusters.md)
                ["ip", "netns", "exec", b_ns, "env", f"GLOO_SOCKET_IFNAME={b_if}", sys.executable, "-m",
                 "frameworks.torch.follower", "serve", "--address", address, "--runs", "1"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        stack.callback(_stop, agent)
        head = subprocess.run(
            ["ip", "netns", "exec", a_ns, "env", f"GLOO_SOCKET_IFNAME={a_if}", sys.executable, "-m",
             "compare.run", *common, "--run-id", "two", "--replica-nodes", "2", "--replica-address", address],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        served = agent.wait(timeout=60)
    log = (tmp_path / "agent.log").read_text()
    assert head.returncode == 0, head.stderr[-3000:]
    assert served == 0 and "replicas 2..3 exited [0, 0]" in log, log[-3000:]
    (one_losses, one_arrays), (two_losses, two_arrays) = _run(tmp_path / "one"), _run(tmp_path / "two")
    assert len(two_losses) == 16 and sorted(two_arrays) == sorted(one_arrays)
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-10, atol=0, err_msg="per-step losses")
    for name, want in one_arrays.items():
        np.testing.assert_allclose(two_arrays[name], want, rtol=1e-10, atol=1e-14, err_msg=name)
