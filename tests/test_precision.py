"""Mixed precision (--precision mixed-bfloat16): BN's numerics under each framework's own mechanism.

The spec of the scratch layers in mixed precision (common.precision): the batch statistics and the
running-statistics blend in float32 from the bfloat16 input, the normalisation in float32, the output in
the input's dtype. Tests here: that spec against the float64 reference within a bound derived from
bfloat16's precision (8 bits: a relative rounding error of at most 2^-9 per rounding), the naive form
(statistics computed in bfloat16) failing by orders of magnitude more on inputs far from zero, each
framework's built-in BN pinned (what it keeps in float32), and a mixed run through the loop.
"""

import numpy as np
import pytest

from common.config import ModelSpec, RunConfig
from common.data import load_fashion_mnist
from common.errors import BackendUnavailable
from common.loop import run as run_loop
from common.precision import BFLOAT16_EPS, to_bfloat16
from common.reference import batch_norm_backward, batch_norm_forward
from tests.conventions import BUILTIN, MIXED_BUILTIN
from tests.helpers import make_idx_dir


def naive_bfloat16_batch_norm(x, epsilon=1e-5):
    """BN with every statistic rounded to bfloat16 and the variance as E[x^2] - E[x]^2 (what the spec avoids):
    per channel over (N, H, W) of NCHW x, gamma 1, beta 0. Sums accumulate in float32 (as every framework's
    reductions do); each result is rounded to bfloat16."""
    x = to_bfloat16(x).astype(np.float32)
    axes = (0, 2, 3)
    mean = to_bfloat16(x.mean(axis=axes, keepdims=True))
    square = to_bfloat16(to_bfloat16(x * x).mean(axis=axes, keepdims=True))
    var = to_bfloat16(square - to_bfloat16(mean * mean))
    inv = to_bfloat16(1.0 / np.sqrt(np.maximum(var, 0) + epsilon))
    return to_bfloat16(to_bfloat16(x - mean) * inv)


def spec_mixed_batch_norm(x, epsilon=1e-5):
    """The spec: float32 statistics (two passes) from the bfloat16 input, the output rounded to bfloat16."""
    x = to_bfloat16(x).astype(np.float32)
    mean = x.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float32)
    var = np.square(x - mean).mean(axis=(0, 2, 3), keepdims=True, dtype=np.float32)
    return to_bfloat16((x - mean) / np.sqrt(var + np.float32(epsilon)))


def reference(x, epsilon=1e-5):
    x = to_bfloat16(x).astype(np.float64)  # what the layer is given
    y, _, _, _ = batch_norm_forward(
        x,
        np.ones(x.shape[1]),
        np.zeros(x.shape[1]),
        np.zeros(x.shape[1]),
        np.ones(x.shape[1]),
        training=True,
        epsilon=epsilon,
    )
    return y


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_statistics_in_bfloat16_cancel_far_from_zero_and_the_spec_does_not(offset):
    x = np.random.RandomState(0).normal(offset, 1.0, (32, 3, 4, 4)).astype(np.float32)
    want = reference(x)
    spec_error = np.max(np.abs(spec_mixed_batch_norm(x) - want))
    naive_error = np.max(np.abs(naive_bfloat16_batch_norm(x) - want))
    # the spec: only the output's own rounding (half a bfloat16 ulp of |y| <= 4) plus float32 statistics
    assert spec_error <= BFLOAT16_EPS * np.max(np.abs(want)), spec_error
    if offset:
        # E[x^2] = 1e6 has a bfloat16 ulp of 4096: the variance (about 1) cancels to 0 or to thousands
        assert naive_error > 100 * spec_error, (naive_error, spec_error)
    else:
        assert naive_error < 10 * BFLOAT16_EPS * np.max(np.abs(want))  # centred data: both forms are fine


# Per framework -----------------------------------------------------------------------------------------
def bn_case(shape, offset, seed=0):
    rng = np.random.RandomState(seed)
    c = shape[1]
    x = to_bfloat16(rng.normal(offset, 1.0, shape)).astype(np.float64)  # what a bfloat16 layer is given
    dy = to_bfloat16(rng.normal(0, 1, shape)).astype(np.float64)
    state = {
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.normal(0, 0.5, c),
        "running_mean": np.full(c, offset) + rng.normal(0, 1, c),
        "running_var": rng.uniform(0.5, 2, c),
    }
    return x, dy, {k: v.astype(np.float32).astype(np.float64) for k, v in state.items()}


def skip_without_mixed(harness, framework):
    if MIXED_BUILTIN[framework] is None:
        with pytest.raises(BackendUnavailable, match="mixed precision"):
            harness.run_norm(
                ModelSpec(),
                np.zeros((4, 2)),
                {"gamma": np.ones(2), "beta": np.zeros(2), "running_mean": np.zeros(2), "running_var": np.ones(2)},
                np.zeros((4, 2)),
                training=True,
                dtype="mixed-bfloat16",
            )
        pytest.skip(f"{framework} runs no mixed precision (its refusal is checked above)")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(16, 5), (8, 3, 4, 4)], ids=["2d", "4d"])
@pytest.mark.parametrize("offset", [0.0, 1000.0], ids=["centred", "far-from-zero"])
def test_scratch_bn_in_mixed_precision_follows_the_spec(fw, harness, framework, shape, training, offset):
    """Against the float64 reference on the same bfloat16 input: y and dx within one bfloat16 rounding of
    their size (the output is bfloat16; the statistics are float32), gamma/beta gradients and the running
    statistics to float32 precision, every array but y kept in float32."""
    skip_without_mixed(harness, framework)
    x, dy, state = bn_case(shape, offset)
    got = harness.run_norm(ModelSpec(), x, state, dy, training=training, dtype="mixed-bfloat16")
    y, mean, var, cache = batch_norm_forward(
        x, state["gamma"], state["beta"], state["running_mean"], state["running_var"], training=training
    )
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    assert got["dtypes"] == {
        "y": "bfloat16",
        "gamma": "float32",
        "beta": "float32",
        "running_mean": "float32",
        "running_var": "float32",
    }
    for name, want in (("y", y), ("dx", dx)):
        np.testing.assert_allclose(
            got[name], want, rtol=0, atol=BFLOAT16_EPS * np.max(np.abs(want)), err_msg=f"{framework} {name}"
        )
    for name, want in (("dgamma", dgamma), ("dbeta", dbeta)):  # float32 sums of bfloat16 products
        np.testing.assert_allclose(
            got[name], want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)), err_msg=f"{framework} {name}"
        )
    np.testing.assert_allclose(got["state"]["running_mean"], mean, rtol=1e-6, err_msg=f"{framework} running mean")
    np.testing.assert_allclose(got["state"]["running_var"], var, rtol=1e-5, err_msg=f"{framework} running var")


def test_builtin_bn_in_mixed_precision_is_pinned(fw, harness, framework):
    """What the framework's own BN keeps in float32 under its mixed-precision mechanism (MIXED_BUILTIN)."""
    skip_without_mixed(harness, framework)
    pinned = MIXED_BUILTIN[framework]
    x, dy, state = bn_case((64, 3, 4, 4), 1000.0, seed=1)
    got = harness.run_norm(ModelSpec(variant="builtin"), x, state, dy, training=True, dtype="mixed-bfloat16")
    assert (got["dtypes"]["y"], got["dtypes"]["gamma"], got["dtypes"]["running_mean"]) == (
        pinned["output"],
        pinned["gamma"],
        pinned["running"],
    )
    _, mean, var, _ = batch_norm_forward(
        x, state["gamma"], state["beta"], state["running_mean"], state["running_var"], training=True
    )
    mean_error = np.max(np.abs(got["state"]["running_mean"] / mean - 1))
    var_error = np.max(np.abs(got["state"]["running_var"] / var - 1))
    if BUILTIN[framework]["running_var"] == "unbiased":  # PyTorch folds n/(n-1) x the batch variance in
        n = x.size // x.shape[1]
        batch_var = (var - 0.9 * state["running_var"]) / 0.1
        var_error = np.max(
            np.abs(got["state"]["running_var"] / (0.9 * state["running_var"] + 0.1 * batch_var * n / (n - 1)) - 1)
        )
    assert mean_error < 1e-6  # the mean: float32 in every framework (bfloat16 would be ~1e-3 off)
    measured = "float32" if var_error < 1e-4 else "float32 E[x^2]-E[x]^2" if var_error < 0.2 else "bfloat16"
    assert measured == pinned["statistics"], (var_error, measured)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_idx_dir(tmp_path_factory.mktemp("idx"), 128, 64)
    return load_fashion_mnist(path, verify=False)


def test_a_mixed_run_keeps_float32_parameters_and_trains_beside_float32(fw, framework, tiny):
    """Through the loop: the parameters and running statistics stay float32, and the first steps' losses
    follow the float32 run's within bfloat16's precision (the same initial weights and batches)."""
    config = RunConfig(epochs=1, batch_size=32, lr=0.5, device="cpu", probe_size=16, trace_steps=4, population_size=0)
    if MIXED_BUILTIN[framework] is None:
        with pytest.raises(BackendUnavailable, match="mixed precision"):
            fw.BACKEND(config.replace(mixed="bfloat16"))
        return
    runs = {}
    for mixed in ("off", "bfloat16"):
        got = []
        run_loop(fw.BACKEND, config.replace(mixed=mixed), tiny, lambda r, arrays=None: got.append((r, arrays)))
        runs[mixed] = [(r, a) for r, a in got if r["kind"] == "epoch"][0]
    (mixed, arrays), (full, _) = runs["bfloat16"], runs["off"]
    assert all(a.dtype == np.float32 for k, a in arrays.items() if k.startswith("param/"))
    np.testing.assert_allclose(
        mixed["step_losses"], full["step_losses"], rtol=0.02, err_msg=f"{framework}: mixed vs float32 per-step losses"
    )
    assert mixed["step_losses"] != full["step_losses"]  # it really ran in bfloat16


def test_a_mixed_run_is_reported_beside_its_float32_twin(fw, framework, tmp_path):
    """compare.run --precision mixed-bfloat16 runs float32 beside it; the report pairs them: mixed_precision.csv
    per epoch, the report's section, a precision column in every row, and each run's running-statistics drift
    from its twin (0 for the float32 run). MXNet's mixed runs fail with the reason, its float32 runs go on."""
    import sys

    import pandas as pd

    from compare.run import main as run_main

    data = make_idx_dir(tmp_path / "data", 128, 64)
    code = run_main(
        [
            "--frameworks",
            framework,
            "--variants",
            "scratch",
            "--epochs",
            "2",
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
            "m",
            "--probe-size",
            "16",
            "--population-size",
            "0",
            "--python",
            f"{framework}={sys.executable}",
            "--no-progress",
        ]
    )
    run_dir = tmp_path / "m"
    runs = pd.read_csv(run_dir / "runs.csv").set_index("precision")
    assert sorted(runs.index) == ["float32", "mixed-bfloat16"]
    text = (run_dir / "report.md").read_text()
    assert f"| {framework} | scratch | float32 |" in text
    if MIXED_BUILTIN[framework] is None:
        assert code == 1 and runs.loc["mixed-bfloat16", "status"] == "failed"
        assert "amp.init" in runs.loc["mixed-bfloat16", "detail"] and not (run_dir / "mixed_precision.csv").exists()
        return
    assert code == 0 and set(runs.status) == {"complete"}
    mixed = pd.read_csv(run_dir / "mixed_precision.csv")
    assert list(mixed.epoch) == [1, 2] and (mixed.running_stats_rel_l2 > 0).all() and (mixed.param_rel_l2 > 0).all()
    assert runs.loc["float32", "final_running_stats_drift"] == 0
    assert runs.loc["mixed-bfloat16", "final_running_stats_drift"] == mixed.running_stats_rel_l2.iloc[-1]
    assert "## Mixed precision against float32 (final epoch)" in text and "emulated" in text
