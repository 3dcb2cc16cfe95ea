"""compare.bench and each framework's bare and textbook loops, on tiny data.

Speed itself is never asserted here (benchmarks print their figures); these check
that the benchmark measures what it says: the bare loop does exactly the suite's
training work, the ratios are the paired ratios of the figures it recorded, and
bad options are refused before anything runs.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import records
from common.config import ModelSpec, RunConfig
from common.data import load_fashion_mnist
from common.flops import training_flops
from common.loop import run as run_loop
from common.registry import load_backend_module
from common.roofline import memory_rates, norm_bytes, norm_input_shapes, triad_bytes
from compare.bench import main as bench_main
from compare.execution.worker import variant_label
from compare.reporting.benchmark import COLUMNS, row
from compare.reporting.excerpt import excerpt
from compare.reporting.layer import layer_row, scratch_over_builtin
from compare.reporting.stats import median_interval, paired_ratio
from tests.conventions import EXECUTION_NAMES
from tests.helpers import make_idx_dir

ROOT = Path(__file__).resolve().parent.parent


def test_median_interval_follows_the_binomial_order_statistics():
    # n = 5: (min, max) covers 1 - 2 / 2**5 = 0.9375 < 0.95, so no interval
    assert median_interval(5) is None
    # n = 6: (min, max) covers 1 - 2 / 64 = 0.96875
    assert median_interval(6) == (1, pytest.approx(1 - 2 / 64))
    # n = 9: k = 2 covers 1 - 2 * (1 + 9) / 512 = 0.9609; k = 3 would cover 1 - 2 * 46 / 512 = 0.82
    assert median_interval(9) == (2, pytest.approx(1 - 20 / 512))


def test_paired_ratio_is_the_median_of_each_repeats_ratio():
    equal = paired_ratio([100.0, 300.0, 50.0, 80.0, 60.0, 90.0], [50.0, 150.0, 25.0, 40.0, 30.0, 45.0])
    assert equal == {"": 2.0, "_low": 2.0, "_high": 2.0}  # each repeat 2x, whatever the drift between repeats
    # one repeat slowed to 0.5 by a neighbour moves the median only to the next ratio
    ratios = [1.1, 0.9, 1.0, 1.2, 0.5, 1.05]
    got = paired_ratio(ratios, [1.0] * 6)
    assert got[""] == pytest.approx((1.0 + 1.05) / 2)
    assert (got["_low"], got["_high"]) == (0.5, 1.2)  # n = 6: (min, max)
    few = paired_ratio([120.0, 90.0], [100.0, 100.0])
    assert few[""] == pytest.approx(1.05) and math.isnan(few["_low"]) and math.isnan(few["_high"])


def test_row_keeps_each_loops_median_and_spread():
    record = {
        "framework": "torch",
        "variant": "builtin",
        "execution": "compiled",
        "execution_name": "eager",
        "batch_size": 256,
        "device_name": "CPU",
        "suite_all": [10.0, 30.0, 20.0],
        "suite_first_step_seconds": [9.0, 0.5, 0.25],
        "bare_all": [20.0, 60.0, 40.0],  # twice the suite's: every figure below must be the suite's own
        "textbook_all": [5.0, 15.0, 10.0],
    }
    r = row(record)
    assert set(r) == set(COLUMNS)
    assert (r["suite_examples_per_s"], r["textbook_examples_per_s"]) == (20.0, 10.0)
    assert r["suite_spread"] == pytest.approx(1.0)  # (30 - 10) / 20
    assert r["suite_over_bare"] == 0.5 and r["suite_over_textbook"] == 2.0
    assert r["repeats"] == 3
    assert (r["first_step_seconds"], r["first_step_seconds_later"]) == (9.0, 0.375)  # the first; median of the rest
    # a record from before the peak was measured: the arithmetic rate, and no fraction of a peak
    assert r["image_size"] == 28 and r["suite_gflops_per_s"] == 20.0 * training_flops(ModelSpec()) / 1e9
    assert np.isnan(r["peak_gflops_per_s"]) and np.isnan(r["suite_of_peak"])
    r = row({**record, "image_size": 96, "peak_gflops_per_s": 50.0})
    assert r["suite_gflops_per_s"] == 20.0 * training_flops(ModelSpec(image_size=96)) / 1e9
    assert r["suite_of_peak"] == r["suite_gflops_per_s"] / 50.0
    assert np.isnan(r["population_share"]) and r["population_size"] == 0  # not measured
    # the population pass: each run's second epoch against that epoch, the median of the ratios 0.1, 0.25, 0.3
    # (not the ratio of the medians, 0.4 / 2.0)
    r = row(
        {
            **record,
            "population_size": 512,
            "population_seconds": [[9.0, 0.4], [9.0, 0.5], [9.0, 0.3]],
            "population_epoch_seconds": [[5.0, 4.0], [5.0, 2.0], [5.0, 1.0]],
            "population_all": [5.0, 15.0, 60.0],  # against suite_all: 0.5, 0.5, 3.0 (the other way: 2, 2, 1/3)
        }
    )
    assert (r["population_first_seconds"], r["population_seconds"], r["epoch_seconds"]) == (9.0, 0.4, 2.0)
    # the pass's seconds over the epoch's (not the epoch's over the pass's: 4.0), training with the pass over
    # training without it (not the other way: 2.0)
    assert (r["population_share"], r["population_over_suite"]) == (0.25, 0.5)


def test_the_scratch_layer_over_the_built_in_is_paired_where_the_cells_took_turns(tmp_path):
    """A benchmark's excerpt sets the scratch cell against the built-in cell of its mode. Cells that took turns
    within each repeat (interleaved): the median of the six repeats' own ratios, 0.5 0.6 0.7 1.6 1.8 2.0, is 1.15
    with the interval [0.50, 2.00] (not the ratio of the medians, 75 / 75); older records, whose cells ran one
    after the other: the ratio of the medians, said so."""
    scratch = {"variant": "scratch", "suite_all": [50.0, 60.0, 70.0, 80.0, 90.0, 100.0]}
    builtin = {"variant": "builtin", "suite_all": [100.0, 100.0, 100.0, 50.0, 50.0, 50.0]}
    said = {
        interleaved: _excerpt_of(tmp_path / str(interleaved), [scratch, builtin], interleaved)
        for interleaved in (True, False)
    }
    assert (
        "per mode: tensorflow XLA (`default`) 1.15x [0.50, 2.00]. Each is the median of the repeats' own" in said[True]
    )
    assert "per mode: tensorflow XLA (`default`) 1.00x. Each is a ratio of two cells' medians" in said[False]


def _excerpt_of(folder, cells: list, interleaved: bool) -> str:
    """The excerpt of a benchmark folder holding these TensorFlow XLA cells (variant and suite examples/s per repeat),
    taken in turns within each repeat or not."""
    base = {
        "framework": "tensorflow",
        "execution": "default",
        "execution_name": "XLA",
        "batch_size": 32,
        "bare_all": [100.0] * 6,
        "textbook_all": [100.0] * 6,
        "suite_first_step_seconds": [1.0] * 6,
    }
    machine = {"command": "python -m compare.bench --frameworks tensorflow", "cpu": "CPU", "cpu_count": 2}
    folder.mkdir()
    measured = [{**base, **cell, **({"interleaved": True} if interleaved else {})} for cell in cells]
    (folder / "bench.json").write_text(json.dumps({"machine": machine, "measured": measured}))
    return excerpt(folder)


def test_the_normalisations_share_of_the_step_is_measured_against_the_network_without_it(tmp_path):
    """With the `none` cell beside it at 100 examples/s every repeat: the scratch cell's 50 to 100 examples/s make
    the normalisation 1 - 50/100 = 50% to 0% of its step, the median 25% with the interval [0%, 50%] from six
    repeats; the built-in's 80 every repeat, 20%. Cells that did not take turns: nothing said."""
    none = {"variant": "none", "suite_all": [100.0] * 6}
    scratch = {"variant": "scratch", "suite_all": [50.0, 60.0, 70.0, 80.0, 90.0, 100.0]}
    builtin = {"variant": "builtin", "suite_all": [80.0] * 6}
    said = _excerpt_of(tmp_path / "turns", [scratch, builtin, none], True)
    assert (
        "tensorflow XLA (`default`) scratch 25% [0%, 50%]; tensorflow XLA (`default`) builtin 20% [20%, 20%]." in said
    )
    assert "share of the training step" not in _excerpt_of(tmp_path / "apart", [scratch, builtin, none], False)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--variants", "scratch,bogus", "unknown variant ['bogus']; choose from scratch"),
        ("--variants", "scratch,scratch", "variant scratch listed twice"),
        ("--norms", "batch,weight", "unknown normalisation ['weight']; choose from batch"),
        ("--executions", "jit", "unknown execution ['jit']; choose from default"),
        ("--batch-sizes", "64,x", "--batch-sizes takes integers"),
        ("--train-limit", "1000", "leaves no timed step at batch size 256"),
        ("--repeats", "0", "--repeats must be at least 1"),
        ("--population-size", "100", "--population-size 100 holds no batch of 256 images"),
        ("--population-size", "-1", "--population-size -1 holds no batch"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(tmp_path, capsys, option, value, message):
    out = tmp_path / "bench"
    code = bench_main([option, value, "--out", str(out), "--data-dir", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bench_writes_the_three_loops_side_by_side(framework, tmp_path, capsys):
    data = make_idx_dir(tmp_path / "data", 640, 100)
    out = tmp_path / "bench"
    code = bench_main(
        [
            "--frameworks",
            framework,
            "--variants",
            "scratch,none",
            "--norms",
            "renorm",
            "--repeats",
            "2",
            "--batch-sizes",
            "64",
            "--train-limit",
            "640",
            "--population-size",
            "128",
            "--device",
            "cpu",
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--python",
            f"{framework}={sys.executable}",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "rows.json"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frame = pd.read_csv(out / "bench.csv")
    assert list(frame.columns) == COLUMNS
    assert sorted(zip(frame["norm"], frame["variant"])) == [("renorm", "none"), ("renorm", "scratch")]
    assert set(frame["framework"]) == {framework}
    saved = json.loads((out / "bench.json").read_text())
    assert saved["machine"]["cpu_count"] and json.loads((tmp_path / "rows.json").read_text()) == saved["rows"]
    for r in saved["rows"]:
        for loop in ("suite", "bare", "textbook"):
            assert r[f"{loop}_examples_per_s"] > 0
        assert r["repeats"] == 2 and r["suite_over_bare"] > 0 and r["suite_over_bare_low"] is None  # < 6 repeats
        # the peak: the framework's own matrix product, positive and finite, one figure for all of its cells
        assert (
            0 < r["peak_gflops_per_s"] < float("inf")
            and r["peak_gflops_per_s"] == saved["rows"][0]["peak_gflops_per_s"]
        )
        assert r["suite_of_peak"] == pytest.approx(r["suite_gflops_per_s"] / r["peak_gflops_per_s"])
        # the population pass: measured where the model keeps running statistics, against an epoch without it
        if r["variant"] == "none":
            assert r["population_share"] is None and r["population_seconds"] is None
        else:
            assert 0 < r["population_seconds"] and 0 < r["population_share"] < 10
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "bench.md").read_text()
    assert (
        "| framework | norm | variant | execution | batch | image | suite | bare | textbook | suite/bare "
        "| suite/textbook | GFLOP/s | of peak | first step s | population |" in text
    )
    assert f"- {framework} bare loop:" in text and f"- {framework} textbook loop:" in text
    assert f"{framework:>10} renorm   scratch" in captured.out and f"{framework:>10} renorm   none" in captured.out
    # the cells take turns within each repeat: both cells' first repeats before either's second
    said = [line for line in captured.err.splitlines() if " repeat " in line and framework in line]
    assert [(" scratch " in line, line.split(" repeat ")[1][0]) for line in said] == [
        (True, "1"),
        (False, "1"),
        (True, "2"),
        (False, "2"),
    ], said
    assert all(m["interleaved"] for m in saved["measured"])
    # the per-repeat figures are kept, and the rows computed from them again are the rows written (docs/measured)
    assert [records.clean([row(m)])[0] for m in saved["measured"]] == saved["rows"]
    quoted = excerpt(out)
    assert f"Fraction of peak per framework: {framework} " in quoted
    assert (
        "The population pass (--population-size 128;" in quoted
        and f"in its one cell, the largest {framework} scratch" in quoted
    )
    for r in saved["rows"]:
        assert f"| {framework} | {r['variant']} | " in quoted and f"{r['suite_examples_per_s']:,.0f}" in quoted


def test_ctrl_c_stops_the_benchmark_and_its_worker_and_writes_nothing(framework, tmp_path):
    """SIGINT to the command's process group, twice, as a terminal's Ctrl-C under tox: compare.bench stops its
    worker (which runs in a session of its own and gets neither), waits for it, says so and exits 130, with no
    traceback and nothing written. compare.bench's own behaviour, whatever its worker runs: in the torch env only
    (in TensorFlow's a first round of 50 repeats' cells took minutes before the signal could be sent)."""
    if framework != "torch":
        pytest.skip("compare.bench's handling of Ctrl-C, the same for every worker: run in tox -e torch")
    data = make_idx_dir(tmp_path / "data", 640, 100)
    out = tmp_path / "bench"
    argv = ["--frameworks", framework, "--variants", "scratch", "--repeats", "50", "--batch-sizes", "64"]
    argv += ["--train-limit", "640", "--device", "cpu", "--data-dir", str(data), "--no-verify-data"]
    argv += ["--python", f"{framework}={sys.executable}", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "compare.bench", *argv],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for text in proc.stderr:  # the first round's progress: the worker is timing
            lines.append(text)
            if "repeat 1:" in text:
                break
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children, "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; its worker is stopped and nothing was written" in err and "Traceback" not in err, err
    for child in map(int, children):  # no worker left behind
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    assert not out.exists()


def test_a_mode_the_framework_lacks_skips_only_its_cells(framework, tmp_path, capsys):
    """--executions eager,xla,default: a framework without XLA (PyTorch, MXNet) says so for the xla cell and still
    benchmarks eager; one with it benchmarks both; default, another name for a mode measured already (every
    framework's default is eager or XLA except MXNet's, hybridized), is skipped saying which."""
    data = make_idx_dir(tmp_path / "data", 384, 100)
    out = tmp_path / "bench"
    code = bench_main(
        [
            "--frameworks",
            framework,
            "--variants",
            "none",
            "--executions",
            "eager,xla,default",
            "--repeats",
            "1",
            "--batch-sizes",
            "64",
            "--train-limit",
            "384",
            "--device",
            "cpu",
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--python",
            f"{framework}={sys.executable}",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    executions = list(pd.read_csv(out / "bench.csv")["execution"])
    names = EXECUTION_NAMES[framework]
    default = [] if names["default"] in (names["eager"], names["xla"]) else ["default"]
    if names["xla"] is None:
        assert executions == ["eager", *default]
        assert f"{framework} none xla batch 64 skipped: --execution xla is not a mode of this framework" in captured.err
    else:
        assert executions == ["eager", "xla", *default]
    if not default:
        same = "eager" if names["default"] == names["eager"] else "xla"
        assert (
            f"{framework} none default batch 64 skipped: it runs {names['default']}, measured above as "
            in (captured.err)
            and f"--execution {same}" in captured.err
        )


@pytest.mark.parametrize("variant, norm", [("scratch", "batch"), ("builtin", "batch"), ("scratch", "renorm")])
def test_the_bare_loop_trains_exactly_as_the_suite(fw, framework, variant, norm, tmp_path):
    """Same init, batches and SGD: after one float64 epoch the bare loop's parameters (running statistics
    included, and renorm's steps) are the suite's, so suite/bare compares the same work. lr 0.5: Keras's SGD keeps
    its learning rate in float32, so the TensorFlow bare loop steps with float32(lr), equal to lr only where lr is
    exact."""
    data = load_fashion_mnist(make_idx_dir(tmp_path / "data", 320, 100), verify=False, dtype="float64")
    config = RunConfig(
        model=ModelSpec(variant=variant, norm=norm, renorm_warmup=3),
        dtype="float64",
        epochs=1,
        batch_size=32,
        lr=0.5,
        device="cpu",
        test_limit=100,
        probe_size=16,
    )
    suite = []
    run_loop(
        fw.BACKEND,
        config,
        data,
        lambda record, arrays=None: suite.append(arrays) if record["kind"] == "epoch" else None,
    )
    examples_per_s, backend = load_backend_module(framework, "bare").epoch(config, data)
    assert examples_per_s > 0
    bare = backend.get_params()
    for name, value in bare.items():
        np.testing.assert_allclose(value, suite[0][f"param/{name}"], rtol=1e-10, atol=1e-12, err_msg=name)


def test_the_layers_traffic_and_fraction_of_roofline_by_hand():
    """common.roofline and compare.reporting.layer against hand-worked values: the inputs of bn1 and bn2, the
    minimal traffic (5 N + 9 C values), the triad's (3 values per element), the faster memory kernel per round,
    and the fraction of the roofline as the median of the rounds' own ratios."""
    assert norm_input_shapes(ModelSpec(image_size=28), 256) == {"bn1": (256, 6, 24, 24), "bn2": (256, 16, 8, 8)}
    assert norm_input_shapes(ModelSpec(image_size=96), 32) == {"bn1": (32, 6, 92, 92), "bn2": (32, 16, 42, 42)}
    # (2, 3, 4, 5): N = 120 values, C = 3 channels: (600 + 27) values of 4 bytes, or of 8
    assert norm_bytes((2, 3, 4, 5), "float32") == 2508 and norm_bytes((2, 3, 4, 5), "float64") == 5016
    assert triad_bytes(120, "float32") == 1440
    assert memory_rates(100, [1.0, 4.0], [2.0, 2.0]) == [100.0, 50.0]  # per round, the faster kernel
    record = {
        "framework": "torch",
        "norm": "batch",
        "variant": "scratch",
        "execution": "default",
        "execution_name": "eager",
        "batch_size": 2,
        "image_size": 28,
        "layer": "bn1",
        "dtype": "float32",
        "device_name": "CPU",
        "shape": [2, 3, 4, 5],
        "layer_bytes": 2508,
        "triad_bytes": 1440,
        # the layer: 2508 bytes in 1 us (2.508 GB/s) in every round but the last (2 us); the memory: the triad
        # 1440 bytes in 0.5 us (2.88 GB/s) or numpy's add in 0.4 us (3.6 GB/s), whichever is faster per round
        "seconds_all": [1e-6] * 6 + [2e-6],
        "triad_seconds_all": [0.5e-6] * 7,
        "add_seconds_all": [0.4e-6] * 3 + [1e-6] * 4,
    }
    r = layer_row(record)
    assert r["shape"] == "2x3x4x5" and r["rounds"] == 7 and r["microseconds"] == pytest.approx(1.0)
    assert r["layer_gb_per_s"] == pytest.approx(2.508) and r["memory_gb_per_s"] == pytest.approx(2.88)
    # rounds' ratios: 2.508/3.6 = 0.6967 (x3), 2.508/2.88 = 0.8708 (x3), 1.254/2.88 = 0.4354: median 0.6967
    assert r["of_roofline"] == pytest.approx(2.508 / 3.6)
    assert r["of_roofline_low"] == pytest.approx(1.254 / 2.88) and r["of_roofline_high"] == pytest.approx(2.508 / 2.88)
    builtin = layer_row({**record, "variant": "builtin", "seconds_all": [2e-6] * 7})
    closed = layer_row({**record, "variant": "scratch, closed-form", "seconds_all": [4e-6] * 7})
    ratios = scratch_over_builtin([r, builtin, closed])
    # each scratch form against the built-in: builtin's 2 us over scratch's 1 us, and over closed-form's 4 us
    assert list(ratios.variant) == ["scratch", "scratch, closed-form"]
    assert list(ratios.scratch_speed) == pytest.approx([2.0, 0.5])
    assert variant_label(ModelSpec(norm_backward="closed-form")) == "scratch, closed-form"
    assert variant_label(ModelSpec(variant="builtin", norm_backward="closed-form")) == "builtin"


def test_the_layer_benchmark_times_each_variant_and_mode(framework, tmp_path, capsys):
    """compare.bench --layer in this framework on a tiny batch, in its default mode: a row per variant and layer,
    every figure positive, the scratch layer paired with the built-in one, the report written; --variants none
    is refused (it has no layer). (A mode skipped as another's name: compare.execution.worker._cell_mode, tested
    with the loops above.)"""
    out = tmp_path / "layer"
    argv = ["--layer", "--frameworks", framework, "--batch-sizes", "2", "--repeats", "2", "--device", "cpu"]
    argv += ["--python", f"{framework}={sys.executable}", "--out", str(out)]
    assert bench_main([*argv, "--variants", "scratch,none"]) == 2
    assert "--variants none has none" in capsys.readouterr().err
    code = bench_main([*argv, "--variants", "scratch,builtin"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frame = pd.read_csv(out / "layer.csv")
    assert list(frame.execution_name.unique()) == [EXECUTION_NAMES[framework]["default"]]
    assert sorted(zip(frame.variant, frame["shape"])) == [
        ("builtin", "2x16x8x8"),
        ("builtin", "2x6x24x24"),
        ("scratch", "2x16x8x8"),
        ("scratch", "2x6x24x24"),
    ]
    assert (frame[["microseconds", "layer_gb_per_s", "memory_gb_per_s", "of_roofline"]] > 0).all().all()
    text = (out / "layer.md").read_text()
    assert "## Scratch against built-in" in text and text.count(f"| {framework} | ") == 4 + 2
    assert excerpt(out) == text  # computed again from every round's figures, as docs/measured quotes it
