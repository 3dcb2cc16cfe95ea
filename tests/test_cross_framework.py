"""Cross-framework parity through the real runner: every framework in its own env.

Same seed, same initial weights, same batches, float64: the first K SGD steps
give the same losses step by step, and the parameters stay together.
Run with `tox -e cross` (it needs every framework's tox env; the runner finds
or creates them).
"""

import json

import numpy as np
import pandas as pd
import pytest

from common.registry import FRAMEWORKS
from compare.run import main as run_main
from tests.conventions import DATA_PARALLEL
from tests.helpers import make_idx_dir

pytestmark = pytest.mark.cross
STEPS = 12
# two frameworks' workers at once (the machine's two cores, one thread each): no figure here depends on time, and
# each worker's start-up (the framework's import, its compiles) is most of a small run's time
TWO_WORKERS = ("--jobs", "2")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross")
    data = make_idx_dir(tmp / "data", 1024, 256)
    code = run_main(
        [
            "--frameworks",
            ",".join(FRAMEWORKS),
            "--variants",
            "scratch,builtin",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--lr",
            "0.5",
            "--dtype",
            "float64",
            "--device",
            "cpu",
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--out",
            str(tmp),
            "--run-id",
            "cross",
            "--probe-size",
            "64",
            "--trace-steps",
            str(STEPS),
            "--trace-every",
            "10",
            "--no-progress",
            *TWO_WORKERS,
        ]
    )
    assert code == 0, "a framework failed: see the errors table of the run"
    return tmp / "cross"


def _epochs(run_dir):
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


@pytest.mark.parametrize("variant", ["scratch", "builtin"])
def test_first_steps_give_the_same_losses(run_dir, variant):
    epochs = [r for r in _epochs(run_dir) if r["variant"] == variant and r["epoch"] == 1]
    losses = {r["framework"]: np.array(r["step_losses"]) for r in epochs}
    assert sorted(losses) == sorted(FRAMEWORKS)
    reference = losses["torch"]
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for framework, got in losses.items():
        # every step, not just the last; float64 leaves only summation-order noise
        np.testing.assert_allclose(
            got, reference, rtol=1e-10, atol=0, err_msg=f"{framework} vs torch, {variant}: per-step losses"
        )


def _flat(value, path=""):
    """{path: number} of every number in a nested trace record (seconds left out: time is no parity figure)."""
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() if key != "seconds" for k, v in _flat(item, f"{path}/{key}").items()
        }
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{path}/{i}").items()}
    return {path: value}


@pytest.mark.parametrize("variant", ["scratch", "builtin"])
def test_trace_measures_agree(run_dir, variant):
    """--trace-every 10: the activation percentiles, ICS and landscape figures of every traced step agree in all
    four frameworks to 1e-8 relative (float64; common.trace computes them once from each framework's gradient)."""
    traces = {}
    for r in _epochs(run_dir):
        if r["variant"] == variant:
            traces.setdefault(r["framework"], []).extend(r["trace"])
    reference = _flat(traces["torch"])
    assert len(traces["torch"]) == 4 and len(reference) > 100  # steps 0, 10, 20, 30 of 32
    for framework, got in traces.items():
        got = _flat(got)
        assert sorted(got) == sorted(reference), framework
        for key, value in reference.items():
            assert got[key] == pytest.approx(value, rel=1e-8, abs=1e-12), f"{framework} vs torch, {variant}: {key}"


def test_parameters_stay_together_and_drift_is_reported(run_dir):
    drift = pd.read_csv(run_dir / "drift.csv")
    assert set(drift.framework) == set(FRAMEWORKS) - {"torch"} and set(drift.reference) == {"torch"}
    scratch = drift[drift.variant == "scratch"]
    assert (scratch.param_rel_l2 < 1e-9).all(), scratch
    assert (scratch.probe_pred_agreement == 1.0).all()
    # builtin: PyTorch's unbiased running variance makes the running statistics differ, measurably,
    # while the trained parameters (which see only batch statistics) do not
    builtin = drift[drift.variant == "builtin"]
    assert (builtin.param_rel_l2 < 1e-9).all()
    assert (builtin.running_stats_rel_l2 > 1e-4).all()


def test_a_float64_port_between_any_two_frameworks_is_exact(run_dir, tmp_path):
    """compare.port on the float64 run: each framework's scratch and built-in model loaded into every framework's
    scratch and built-in model gives the model's logits to 1e-10 (PyTorch's built-in model carries its unbiased
    running variance across, and every target divides by the variance it is given); a mistake asked for has a
    row for every built-in model in every framework, and one not asked for has none. (What each mistake computes
    is tested in each framework's env, tests/test_port.py; momentum's fine-tuning is the costly one.)"""
    from compare.port import main as port_main

    out = ["--out", str(tmp_path), "--run-id", "port", "--repeats", "1", "--no-verify-data", "--mistakes", "gamma"]
    out += ["--no-onnx"]  # each framework's export is tested in its env (tests/test_port.py)
    data = ["--data-dir", str(run_dir.parent / "data")]
    assert port_main([str(run_dir), "--frameworks", ",".join(FRAMEWORKS), *data, *out]) == 0
    port = json.loads((tmp_path / "port" / "port.json").read_text())
    rows = pd.DataFrame(port["ports"])
    assert len(rows) == 8 * 8 - 8  # every model into every model but itself
    assert (rows.max_logit_diff <= 1e-10).all() and (rows.agreement == 1.0).all(), rows
    mistakes = pd.DataFrame(port["mistakes"])
    assert len(mistakes) == 4 * 4 and set(mistakes.mistake) == {"gamma"}, mistakes


@pytest.mark.parametrize("variant", ["scratch", "builtin"])
def test_population_statistics_agree(run_dir, variant):
    """float64: every framework's population statistics (kept in each epoch's snapshot) and its eval-mode
    test loss and accuracy with them agree with PyTorch's to 1e-10 relative. For the built-in layers too:
    population statistics come from batch statistics only, so PyTorch's unbiased running variance, which
    sets its running statistics apart, does not reach them."""
    epochs = [r for r in _epochs(run_dir) if r["variant"] == variant]
    by = {(r["framework"], r["epoch"]): r for r in epochs}
    assert sorted({f for f, _ in by}) == sorted(FRAMEWORKS)
    for (framework, epoch), record in by.items():
        ref = by[("torch", epoch)]
        assert record["population_images"] == ref["population_images"] > 0
        np.testing.assert_allclose(
            record["pop_test_loss"],
            ref["pop_test_loss"],
            rtol=1e-10,
            err_msg=f"{framework} vs torch, {variant}, epoch {epoch}: population test loss",
        )
        assert record["pop_test_acc"] == ref["pop_test_acc"]
        mine, theirs = np.load(run_dir / record["snapshot"]), np.load(run_dir / ref["snapshot"])
        names = sorted(k for k in theirs.files if k.startswith("population/"))
        assert len(names) == 8 and sorted(k for k in mine.files if k.startswith("population/")) == names
        for name in names:
            np.testing.assert_allclose(
                mine[name],
                theirs[name],
                rtol=1e-10,
                atol=1e-14,
                err_msg=f"{framework} vs torch, {variant}, epoch {epoch}: {name}",
            )


def scratch_epochs(tmp_path, run_id, frameworks, *args) -> list:
    """The epoch records of one float64 run of the scratch variant (one epoch of 512 images, batch 32) through the
    real runner, with `args` added; every framework must complete."""
    data = make_idx_dir(tmp_path / "data", 512, 128)
    code = run_main(
        [
            "--frameworks",
            ",".join(frameworks),
            "--variants",
            "scratch",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--lr",
            "0.5",
            "--dtype",
            "float64",
            "--device",
            "cpu",
            *args,
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--out",
            str(tmp_path),
            "--run-id",
            run_id,
            "--probe-size",
            "32",
            "--population-size",
            "0",  # population statistics are compared in run_dir's run; here each would cost a pass and a compile
            "--trace-steps",
            str(STEPS),
            "--no-progress",
            *TWO_WORKERS,
        ]
    )
    assert code == 0, "a framework failed: see the errors table of the run"
    return _epochs(tmp_path / run_id)


NORM_ARGS = {
    "layer": [],
    "group": ["--groups", "2"],
    "instance": ["--norm-positions", "conv1,conv2"],
    "renorm": ["--renorm-warmup", "4"],
    # noisy BN: the same draws in every framework (common.norms.draw_noise), and traced with them
    "batch-noise": ["--norm-noise", "--trace-every", "7"],
    # the paper's form: each example its own draw
    "batch-noise-example": ["--norm", "batch", "--norm-noise", "--noise-form", "example"],
    # ghost batches (docs/data-parallel.md): BN's statistics per 8-image slice of the 32-image batch
    "batch-ghost": ["--ghost-batch", "8"],
    # the research exercise's transforms: whitening in groups of 4 (conv1's 6 channels: 4 and a last group of 2)
    # with 3 Newton-Schulz iterations; the empirical PIT after a ReLU, so that its ranks have ties (the zeros)
    "whiten": ["--whiten-group", "4", "--whiten-iterations", "3"],
    # and converged: 30 iterations of the coupled form, which IterNorm's uncoupled form did not survive
    "whiten-converged": ["--norm", "whiten", "--whiten-group", "6", "--whiten-iterations", "30"],
    "pit": [],
    # the PIT standardised to BN's scale, sqrt(12) (u - 1/2)
    "pit-standard": ["--norm", "pit", "--pit-scale", "standard"],
    "pit-rank": ["--activation", "relu", "--norm-placement", "after_activation"],
}


@pytest.mark.parametrize("norm", list(NORM_ARGS))
def test_every_norm_gives_the_same_losses_step_by_step(tmp_path, norm):
    """Each scratch normalisation: same initial weights and batches in float64, the same per-step losses in
    every framework (renorm with a short warm-up, so r and d act within the traced steps; noisy BN with its
    traces, which agree too)."""
    name = norm.removesuffix("-noise").removesuffix("-ghost")
    args = NORM_ARGS[norm] if "--norm" in NORM_ARGS[norm] else ["--norm", name, *NORM_ARGS[norm]]
    epochs = scratch_epochs(tmp_path, norm, FRAMEWORKS, *args)
    losses = {r["framework"]: np.array(r["step_losses"]) for r in epochs}
    assert sorted(losses) == sorted(FRAMEWORKS)
    for framework, got in losses.items():
        np.testing.assert_allclose(
            got, losses["torch"], rtol=1e-10, atol=0, err_msg=f"{framework} vs torch, --norm {norm}: per-step losses"
        )
    for r in epochs:  # only the norms with running statistics differ between the modes
        running = norm not in ("layer", "group", "instance")
        assert (r["probe_logit_mad"] > 0) == running, (r["framework"], r["probe_logit_mad"])
    if norm == "batch-noise":
        traces = {r["framework"]: _flat(r["trace"]) for r in epochs}
        assert len(epochs[0]["trace"]) == 3  # steps 0, 7, 14 of 16
        for framework, got in traces.items():
            for key, value in traces["torch"].items():
                assert got[key] == pytest.approx(value, rel=1e-8, abs=1e-12), f"{framework} vs torch, noisy BN: {key}"


def test_the_closed_form_backward_takes_autodiffs_steps(tmp_path):
    """--norm-backward closed-form (BN's backward written out) in PyTorch, TensorFlow and JAX, the frameworks that
    have it: float64 per-step losses of the autodiff run's, to 1e-10."""
    closed = ["torch", "tensorflow", "jax"]
    got, want = (
        {r["framework"]: np.array(r["step_losses"]) for r in scratch_epochs(tmp_path, *run)}
        for run in (("closed", closed, "--norm-backward", "closed-form"), ("autodiff", ["torch"]))
    )
    assert sorted(got) == sorted(closed) and list(want) == ["torch"]
    for framework, losses in got.items():
        np.testing.assert_allclose(
            losses, want["torch"], rtol=1e-10, atol=0, err_msg=f"{framework} closed-form vs torch autodiff"
        )


# Bound on how far the frameworks' mixed-precision per-step losses may part from PyTorch's over the traced
# steps: measured at most 1.4e-2 (12 steps, scratch and builtin). Every framework computes the convolutions and
# dense layers in bfloat16, but each rounds at its own places (activations, pooling, where the casts sit),
# about 2^-8 relative each time.
MIXED_RTOL = 2e-2
# The float32 runs beside them: each framework's kernels sum in their own order, chosen by the CPU (oneDNN, XLA
# and Eigen pick by instruction set), and training amplifies that round-off from step to step. Measured: within
# 1e-5 on one EPYC, 1.03e-5 (JAX's builtin, third step) on an AVX-512 one. 1e-4 still sits 200 times below
# MIXED_RTOL, so a float32 run that computed in bfloat16 fails it.
FLOAT32_RTOL = 1e-4


def test_mixed_precision_runs_agree_within_bfloat16s_precision(tmp_path):
    """--precision mixed-bfloat16 in every framework that has it, with the float32 runs beside: the float32
    runs agree to float32 precision, the mixed ones within MIXED_RTOL of PyTorch's step by step, and MXNet's
    mixed runs fail before training with the reason while its float32 runs complete."""
    data = make_idx_dir(tmp_path / "data", 512, 128)
    code = run_main(
        [
            "--frameworks",
            ",".join(FRAMEWORKS),
            "--variants",
            "scratch,builtin",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--lr",
            "0.5",
            "--precision",
            "mixed-bfloat16",
            "--device",
            "cpu",
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--out",
            str(tmp_path),
            "--run-id",
            "mixed",
            "--probe-size",
            "32",
            "--population-size",
            "0",
            "--trace-steps",
            str(STEPS),
            "--no-progress",
            *TWO_WORKERS,
        ]
    )
    assert code == 1  # MXNet's mixed runs failed, the rest completed
    records = [json.loads(line) for line in (tmp_path / "mixed" / "records.jsonl").read_text().splitlines()]
    ends = {(r["framework"], r["variant"], r["config_id"]): r for r in records if r["kind"] in ("run_end", "error")}
    configs = {r["config_id"]: r["config"] for r in records if r["kind"] == "plan"}
    for (framework, variant, cid), end in ends.items():
        mixed = configs[cid]["mixed"] != "off"
        if framework == "mxnet" and mixed:
            assert end["status"] == "failed" and "amp.init" in end["message"], end
        else:
            assert end["status"] == "complete", end
    losses = {}
    for r in records:
        if r["kind"] == "epoch":
            losses[(r["framework"], r["variant"], configs[r["config_id"]]["mixed"])] = np.array(r["step_losses"])
    for (framework, variant, mixed), got in losses.items():
        want = losses[("torch", variant, mixed)]
        np.testing.assert_allclose(
            got,
            want,
            rtol=FLOAT32_RTOL if mixed == "off" else MIXED_RTOL,
            atol=0,
            err_msg=f"{framework} vs torch, {variant}, mixed={mixed}: per-step losses",
        )
    for label, is_mixed in (("mixed-precision", True), ("float32", False)):
        gap = max(
            np.max(np.abs(got / losses[("torch", v, m)] - 1))
            for (f, v, m), got in losses.items()
            if (m != "off") == is_mixed
        )
        print(f"largest {label} per-step loss gap from PyTorch: {gap:.2e}")


@pytest.mark.parametrize("sync", ["global", "local"])
def test_data_parallel_runs_agree_with_their_one_process_equivalent(tmp_path, sync):
    """--replicas 2 through the real runner in every framework (PyTorch's processes, JAX's and TensorFlow's devices,
    set up by the worker, MXNet's contexts; MXNet under local sync only), against PyTorch's one-process equivalent:
    the batch-B run for global sync, --ghost-batch B/2 for local; the same per-step losses to 1e-10 in float64. (That
    the four frameworks' one-process ghost-batch runs agree is test_every_norm_gives_the_same_losses_step_by_step's
    batch-ghost case.)"""
    # MXNet refuses global sync (frameworks/mxnet/backend.py says why; tests/test_data_parallel.py checks it)
    parallel = [f for f in FRAMEWORKS if f in DATA_PARALLEL and not (f == "mxnet" and sync == "global")]
    got, want = (
        {r["framework"]: np.array(r["step_losses"]) for r in scratch_epochs(tmp_path, *run)}
        for run in (
            ("replicas", parallel, "--replicas", "2", "--bn-sync", sync),
            ("one", ["torch"], *(["--ghost-batch", "16"] if sync == "local" else [])),
        )
    )
    assert sorted(got) == sorted(parallel) and list(want) == ["torch"]
    for framework, losses in got.items():
        np.testing.assert_allclose(
            losses, want["torch"], rtol=1e-10, atol=0, err_msg=f"{framework} vs one-process torch, {sync} sync"
        )


def test_the_96x96_configuration_takes_the_same_steps_everywhere(tmp_path, monkeypatch):
    """--image-size 96 (the textbook's second configuration; its batch 32): every framework resizes nothing itself
    (common.data does, once) and its first dense layer follows from the size; scratch and built-in BN give the
    same per-step losses in float64 on a few images."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the workers' resize cache, kept here
    args = ("--image-size", "96", "--variants", "scratch,builtin", "--train-limit", "128", "--test-limit", "64")
    epochs = scratch_epochs(tmp_path, "96", FRAMEWORKS, *args)
    assert list((tmp_path / "cache" / "bn-compare" / "resized").glob("*-96x96.npz"))
    for variant in ("scratch", "builtin"):
        losses = {r["framework"]: np.array(r["step_losses"]) for r in epochs if r["variant"] == variant}
        assert sorted(losses) == sorted(FRAMEWORKS) and len(losses["torch"]) == 4
        for framework, got in losses.items():
            np.testing.assert_allclose(
                got, losses["torch"], rtol=1e-10, atol=0, err_msg=f"{framework} vs torch, 96x96, {variant}"
            )
