"""The numbers the reports are read for, checked against values computed by hand.

The real common.loop.run drives a scripted backend (tests/scripted_backend.py)
whose clock, step results, logits and BN statistics the test decides; the real
compare.report tables are built from hand-made records and snapshots. Every
expected figure below is worked out in the comment beside it, so a swapped or
misplaced term in any formula fails here, framework-free.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from common import records
from common.config import ModelSpec, RunConfig
from common.data import Dataset
from common.interface import ProbeResult
from common.loop import run as run_loop
from compare import report
from compare.reporting import files, markdown, tables
from tests.made import drift_run, epoch_record, summary_records, write_snapshot
from tests.scripted_backend import Script, scripted_backend

# 5 test images; the probe takes 4 of them (probe_indices(5, 4) = 0, 2, 3, 4, pinned below), labels 0, 1, 2, 3.
TEST_LABELS = [0, 9, 1, 2, 3]
LOGITS_EVAL = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]], dtype=np.float64)  # predicts 0 1 2 0
LOGITS_TRAIN = np.array([[3, 0, 0], [0, 1, 3], [0, 0, 3], [2, 1, 0]], dtype=np.float64)  # predicts 0 2 2 0
BN = {
    # epsilon 1 (from describe()): running std = sqrt(running_var + 1) = 2, 3
    "bn1": {
        "batch_mean": np.array([1.0, 6.0]),
        "batch_var": np.array([3.0, 26.0]),
        "running_mean": np.array([0.0, 0.0]),
        "running_var": np.array([3.0, 8.0]),
    },
    # running std sqrt(0 + 1) = 1
    "bn2": {
        "batch_mean": np.array([-2.0]),
        "batch_var": np.array([0.0]),
        "running_mean": np.array([1.0]),
        "running_var": np.array([0.0]),
    },
}


def step_seconds(epoch, step):
    # epoch 1: a slow first (compiling) step, two more warm-up steps, then 0.25 s a step;
    # epoch 2: 0.5 s a step throughout
    if epoch == 1:
        return {0: 5.0, 1: 1.0, 2: 1.0}.get(step, 0.25)
    return 0.5


def step_stats(epoch, step):
    return (step + 1.0, 2.0 if epoch == 1 else 3.0)  # (loss_sum, correct) of a batch of 4


def scripted_run(
    warmup_steps=3,
    epochs=2,
    trace_steps=3,
    population_size=2048,
    population_stats=None,
    trace_every=0,
    gradient_seconds=0.0,
):
    script = Script(
        step_seconds=step_seconds,
        step_stats=step_stats,
        eval_seconds=0.5,
        eval_stats=(2.0, 3.0),
        probe=ProbeResult(LOGITS_EVAL, LOGITS_TRAIN, BN),
        bn_epsilon=1.0,
        population_stats=population_stats,
        gradient_seconds=gradient_seconds,
    )
    data = Dataset(
        np.zeros((40, 1, 28, 28), np.float32),
        np.zeros(40, np.int64),
        np.zeros((5, 1, 28, 28), np.float32),
        np.array(TEST_LABELS, np.int64),
        "scripted",
        False,
    )
    config = RunConfig(
        model=ModelSpec(),
        batch_size=4,
        epochs=epochs,
        warmup_steps=warmup_steps,
        probe_size=4,
        trace_steps=trace_steps,
        device="cpu",
        population_size=population_size,
        trace_every=trace_every,
    )
    out = []
    run_loop(
        scripted_backend(script),
        config,
        data,
        lambda record, arrays=None: out.append((record, arrays)),
        clock=script.clock,
    )
    return [r for r, _ in out if r["kind"] == "epoch"], [a for _, a in out if a is not None], script


def test_throughput_counts_only_the_timed_steps():
    epochs, _, _ = scripted_run()
    first, second = epochs
    # 40 examples / batch 4 = 10 steps; warm-up = steps 0-2 (7 s), timed = steps 3-9 (7 x 0.25 s)
    assert first["warmup_steps"] == 3 and first["timed_steps"] == 7, "timed_steps / warmup_steps"
    assert first["train_examples_per_s"] == pytest.approx(7 * 4 / 1.75), "train_examples_per_s: 28 ex / 1.75 s"
    assert first["warmup_examples_per_s"] == pytest.approx(3 * 4 / 7.0), "warmup_examples_per_s: 12 ex / 7 s"
    assert first["warmup_seconds"] == pytest.approx(7.0), "warmup_seconds"
    assert first["first_step_seconds"] == pytest.approx(5.0), "first_step_seconds: step 0 alone (compiling)"
    assert second["first_step_seconds"] == pytest.approx(0.5), "first_step_seconds, epoch 2"
    assert first["train_seconds"] == pytest.approx(8.75), "train_seconds: the whole epoch, warm-up included"
    # epoch 2: every step 0.5 s
    assert second["train_examples_per_s"] == pytest.approx(8.0), "train_examples_per_s, epoch 2"
    assert second["warmup_examples_per_s"] == pytest.approx(8.0), "warmup_examples_per_s, epoch 2"
    # evaluation: 5 test images in 0.5 s
    assert first["eval_examples_per_s"] == pytest.approx(10.0) and first["eval_seconds"] == pytest.approx(0.5), (
        "eval_examples_per_s"
    )


def test_traces_are_timed_apart_from_training():
    """--trace-every 3 with 0.1 s per gradient (11 a trace): steps 0, 3, 6, 9 of epoch 1 (step 0 in the warm-up)
    and 12, 15, 18 of the run in epoch 2 are traced, and every training figure is the untraced run's; had the
    traces' 1.1 s each entered the timed region, the throughput would be 28 examples in 4.05 s, not 1.75 s."""
    plain, _, _ = scripted_run()
    (first, second), _, script = scripted_run(trace_every=3, gradient_seconds=0.1)
    for key in (
        "train_examples_per_s",
        "warmup_examples_per_s",
        "warmup_seconds",
        "first_step_seconds",
        "train_seconds",
    ):
        assert first[key] == pytest.approx(plain[0][key]) and second[key] == pytest.approx(plain[1][key]), key
    assert [t["step"] for t in first["trace"]] == [0, 3, 6, 9] and [t["step"] for t in second["trace"]] == [12, 15, 18]
    assert first["trace_seconds"] == pytest.approx(4 * 11 * 0.1) and second["trace_seconds"] == pytest.approx(3.3)
    assert [c for c in script.calls if c[0] == "gradient"][:2] == [("gradient", 1, 4), ("gradient", 1, 4)]


@pytest.mark.parametrize(
    "warmup_steps, timed, rate, warm_rate",
    [
        (0, 10, 40 / 8.75, None),  # nothing timed apart: the whole epoch
        (50, 1, 4 / 0.25, 36 / 8.5),  # more warm-up steps than the epoch has: the last step stays timed
    ],
)
def test_warmup_edge_cases(warmup_steps, timed, rate, warm_rate):
    first = scripted_run(warmup_steps=warmup_steps, epochs=1)[0][0]
    assert first["timed_steps"] == timed
    # the first step is timed apart only inside the warm-up (a wait in the timed region would cost throughput)
    assert first["first_step_seconds"] == (None if warmup_steps == 0 else pytest.approx(5.0))
    assert first["train_examples_per_s"] == pytest.approx(rate), "train_examples_per_s"
    if warm_rate is None:
        assert first["warmup_examples_per_s"] is None
    else:
        assert first["warmup_examples_per_s"] == pytest.approx(warm_rate), "warmup_examples_per_s"


def test_losses_and_accuracies():
    (first, second), _, _ = scripted_run()
    # epoch 1: loss sums 1..10 = 55 over 40 examples, 2 correct of 4 per step; epoch 2: 3 of 4
    assert first["train_loss"] == pytest.approx(55 / 40) and first["train_acc"] == pytest.approx(0.5), "train"
    assert second["train_acc"] == pytest.approx(0.75), "train_acc, epoch 2"
    # evaluate: loss sum 2 and 3 correct over 5 test images
    assert first["test_loss"] == pytest.approx(0.4) and first["test_acc"] == pytest.approx(0.6), "test"
    # per-step losses of the first 3 steps: loss_sum / batch
    assert first["step_losses"] == pytest.approx([0.25, 0.5, 0.75]), "step_losses"


def test_divergence_figures():
    (first, _), arrays, _ = scripted_run()
    # eval predicts 0 1 2 0, train predicts 0 2 2 0; labels 0 1 2 3
    assert first["probe_acc_eval"] == pytest.approx(0.75), "probe_acc_eval: 3 of 4"
    assert first["probe_acc_train"] == pytest.approx(0.5), "probe_acc_train: 2 of 4"
    assert first["probe_disagreement"] == pytest.approx(0.25), "probe_disagreement: the predictions differ on 1 of 4"
    # |train - eval| summed: 0 + (0 + 2 + 3) + 0 + (1 + 1 + 0) = 7 over 12 logits
    assert first["probe_logit_mad"] == pytest.approx(7 / 12), "probe_logit_mad"
    gaps = {g["layer"]: g for g in first["bn_gap"]}
    # bn1: |1 - 0| / 2 and |6 - 0| / 3 -> mean(0.5, 2); |log(4 / 4)| and |log(27 / 9)| -> mean(0, log 3)
    assert gaps["bn1"]["mean_gap"] == pytest.approx(1.25), "mean_gap bn1"
    assert gaps["bn1"]["var_log_ratio"] == pytest.approx(math.log(3) / 2), "var_log_ratio bn1"
    # bn2: |-2 - 1| / 1; |log(1 / 1)|
    assert gaps["bn2"]["mean_gap"] == pytest.approx(3.0) and gaps["bn2"]["var_log_ratio"] == 0.0, "bn2 gap"
    np.testing.assert_array_equal(arrays[0]["probe/logits_eval"], LOGITS_EVAL)
    np.testing.assert_array_equal(arrays[0]["probe/logits_train"], LOGITS_TRAIN)


def test_the_probe_and_evaluation_come_after_the_timed_steps():
    _, _, script = scripted_run(epochs=1)
    kinds = [c[0] for c in script.calls]
    # then the population statistics (on by default): the train-mode moments of each of the 40 / 4 = 10 batches,
    # then eval mode with them (evaluate, and the probe's eval-mode logits), all after the timed steps
    assert kinds == ["train_step"] * 10 + ["evaluate", "probe"] + ["norm_moments"] * 10 + ["evaluate", "predict"], kinds


def population_batch(i):
    """Population batch i's statistics: bn1's first channel has batch means 0 and 2 in turn, so the population's
    variance holds their spread (var 3 + 1); bn2's batches all agree."""
    return {"bn1": (np.array([2.0 * (i % 2), 6.0]), np.array([3.0, 26.0])), "bn2": (np.array([0.0]), np.array([3.0]))}


def test_the_gap_splits_into_the_emas_lag_and_batch_noise_by_hand():
    """Population statistics (2 batches): bn1 mean (1, 6), var (3 + 1, 26); bn2 mean 0, var 3. The lag is the
    running statistics against them, the noise the probe batch's statistics against them, in the population's
    units (epsilon 1). Swapping the two, or measuring the lag in the running average's units, fails here."""
    (first,), arrays, script = scripted_run(epochs=1, population_size=10, population_stats=population_batch)
    gaps = {g["layer"]: g for g in first["bn_gap"]}
    # bn1 lag: mean(|0 - 1| / sqrt(4 + 1), |0 - 6| / sqrt(26 + 1)) = mean(0.4472136, 1.1547005);
    #          mean(|log((3 + 1) / (4 + 1))|, |log((8 + 1) / (26 + 1))|) = mean(log 1.25, log 3)
    # (in the running average's units instead: mean(1 / 2, 6 / 3) = 1.25)
    assert gaps["bn1"]["lag_mean_gap"] == pytest.approx((1 / math.sqrt(5) + 6 / math.sqrt(27)) / 2), "bn1 lag"
    assert gaps["bn1"]["lag_var_log_ratio"] == pytest.approx((math.log(1.25) + math.log(3)) / 2), "bn1 lag var"
    # bn1 noise: the probe batch (mean (1, 6), var (3, 26)) against the population: 0; mean(log 1.25, 0)
    assert gaps["bn1"]["noise_mean_gap"] == 0.0, "bn1 noise"
    assert gaps["bn1"]["noise_var_log_ratio"] == pytest.approx(math.log(1.25) / 2), "bn1 noise var"
    # bn2 lag: |1 - 0| / sqrt(3 + 1) = 0.5 (in the running average's units: 1); |log(1 / 4)|
    # bn2 noise: |-2 - 0| / 2 = 1; |log(1 / 4)|
    assert (gaps["bn2"]["lag_mean_gap"], gaps["bn2"]["noise_mean_gap"]) == (pytest.approx(0.5), pytest.approx(1.0))
    assert gaps["bn2"]["lag_var_log_ratio"] == pytest.approx(math.log(4)) == gaps["bn2"]["noise_var_log_ratio"]
    # the train/eval gap itself is still the probe batch against the running average (test_divergence_figures)
    assert gaps["bn1"]["mean_gap"] == pytest.approx(1.25)
    # the images used: --population-size 10 at batch 4 is two whole batches, 8 images (the partial one dropped)
    assert ("batch_statistics", 1, [4, 4]) in script.calls
    assert first["population_images"] == 8, "population_images: the images used, not the 10 asked for"
    np.testing.assert_allclose(arrays[0]["population/bn1.running_var"], [4.0, 26.0])


def test_population_images_are_capped_by_the_training_set():
    """--population-size 2048 (the default) on 40 training images at batch 4: all 40, ten batches."""
    (first,), _, script = scripted_run(epochs=1, population_stats=population_batch)
    assert ("batch_statistics", 1, [4] * 10) in script.calls
    assert first["population_images"] == 40, "population_images: capped by the 40 training images"


def test_summary_best_final_and_medians(tmp_path):
    t = tables.tables(summary_records(), tmp_path)
    row = t["summary"].iloc[0]
    assert row.seeds == 3 and row.epochs == 3 and row.status == "complete" and row.final_epoch == "3"
    # best: the mean over seeds of each seed's best epoch, (0.8 + 0.75 + 0.9) / 3
    assert row.best_test_acc == pytest.approx(2.45 / 3), "best_test_acc: mean of each seed's best"
    # final: the mean of the last epochs, (0.7 + 0.75 + 0.6) / 3
    assert row.final_test_acc == pytest.approx(2.05 / 3), "final_test_acc"
    # best epoch: of the mean curve 0.5, 0.8, 0.6833
    assert row.best_epoch == 2, "best_epoch"
    # final train loss: seed + 3 for seeds 0, 1, 2
    assert row.final_train_loss == pytest.approx(4.0), "final_train_loss"
    # throughput: the median epoch of 100..800 and 10000, not the mean (1,444)
    assert row.train_examples_per_s == pytest.approx(500), "train_examples_per_s: median epoch"
    assert row.eval_examples_per_s == pytest.approx(100), "eval_examples_per_s: median of 50, 100, 150 x 3"
    assert row.final_probe_disagreement == pytest.approx(0.1), "final_probe_disagreement: mean of 0, 0.1, 0.2"
    assert row.final_probe_acc_eval == pytest.approx(0.6), "final_probe_acc_eval"


def test_bn_gap_table(tmp_path):
    gap = tables.tables(summary_records(), tmp_path)["bn_gap"]
    assert len(gap) == 9 and set(gap.layer) == {"bn1"}
    row = gap[(gap.seed == 2) & (gap.epoch == 3)].iloc[0]
    assert row.mean_gap == 2.5 and row.var_log_ratio == 0.75, "bn_gap keeps each record's values"


def test_drift_from_made_up_snapshots(tmp_path):
    drift = tables.tables(drift_run(tmp_path), tmp_path)["drift"]
    assert len(drift) == 1
    row = drift.iloc[0]
    assert (row.framework, row.reference) == ("mxnet", "torch")
    # parameters: |(0, 0.5)| / |(3, 4)| = 0.1; running statistics: |(0, 0, 0, 1)| / |(1, 1, 1, 1)| = 0.5
    assert row.param_rel_l2 == pytest.approx(0.1), "param_rel_l2"
    assert row.running_stats_rel_l2 == pytest.approx(0.5), "running_stats_rel_l2"
    assert row.param_max_abs == pytest.approx(0.5), "param_max_abs"
    # logits: |diff| = 0, 0.25, 2, 0 -> max 2, mean 0.5625; predictions 0 1 vs 0 0 -> agreement 0.5
    assert row.probe_logit_max_abs == 2.0 and row.probe_logit_mad == pytest.approx(0.5625), "probe logit distance"
    assert row.probe_pred_agreement == 0.5, "probe_pred_agreement"


def test_a_whitening_runs_running_covariance_is_drift_of_its_running_statistics(tmp_path):
    """whiten's running_cov (and running_mean) are running statistics, renorm's steps a counter in neither figure:
    the table of normalisations (common.norms) decides, not the arrays' names."""
    arrays = {
        "torch": {
            "param/conv1.weight": np.array([3.0, 4.0]),
            "param/bn1.gamma": np.array([1.0, 1.0]),
            "param/bn1.running_mean": np.array([0.0, 0.0]),
            "param/bn1.running_cov": np.array([[1.0, 0.0], [0.0, 1.0]]),
            "param/bn1.steps": np.array([10.0]),
        },
        "jax": {
            "param/conv1.weight": np.array([3.0, 4.0]),
            "param/bn1.gamma": np.array([1.0, 1.0]),
            "param/bn1.running_mean": np.array([0.0, 0.0]),
            "param/bn1.running_cov": np.array([[1.0, 0.0], [1.0, 1.0]]),
            "param/bn1.steps": np.array([99.0]),
        },
    }
    run = []
    for framework, params in arrays.items():
        record = epoch_record(framework)
        write_snapshot(tmp_path, record, **params, **{"probe/logits_eval": np.array([[1.0, 0.0]])})
        run.append(record)
    row = tables.tables(run, tmp_path)["drift"].iloc[0]
    assert row.framework == "jax"
    # parameters (conv1.weight, gamma) agree; the running statistics are off by 1 in the covariance's corner:
    # |(0, 0, 0, 1, 0, 0)| / |(0, 0, 1, 0, 0, 1)| = 1 / sqrt(2)
    assert row.param_rel_l2 == 0.0 and row.param_max_abs == 0.0, "running_cov counted as a trained parameter"
    assert row.running_stats_rel_l2 == pytest.approx(1 / math.sqrt(2)), "running_cov left out of the statistics"


def test_reference_changes_the_drift_table(tmp_path):
    run = drift_run(tmp_path)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run))
    assert report.main([str(tmp_path), "--reference", "mxnet"]) == 0
    drift = pd.read_csv(tmp_path / "drift.csv")
    assert list(drift.framework) == ["torch"] and list(drift.reference) == ["mxnet"]
    # now relative to mxnet's parameters: 0.5 / |(3, 4.5)|
    assert drift.param_rel_l2[0] == pytest.approx(0.5 / math.sqrt(9 + 20.25)), "param_rel_l2 against mxnet"
    assert drift.running_stats_rel_l2[0] == pytest.approx(1 / math.sqrt(7)), "running_stats_rel_l2 against mxnet"
    # and the run's own choice, stored in environment.json, is what a plain rebuild uses
    files.write_json(tmp_path / "environment.json", {"reference": "mxnet"})
    assert report.main([str(tmp_path)]) == 0
    assert list(pd.read_csv(tmp_path / "drift.csv").reference) == ["mxnet"]


def test_mixed_precision_drift_is_measured_from_the_float32_twin(tmp_path):
    """A mixed run beside its float32 twin (the same configuration with mixed off): the distances are the mixed
    run's from the twin's, relative to the twin's norm. The norms differ (2 against 1 per value), so measuring
    the twin from the mixed run would halve them."""
    float32 = RunConfig(model=ModelSpec(), dtype="float32", device="cpu", epochs=1)
    mixed = float32.replace(mixed="bfloat16")
    recs, values = [], {float32.config_id: 1.0, mixed.config_id: 2.0}
    for config in (float32, mixed):
        ident = dict(framework="torch", variant="scratch", seed=0, config_id=config.config_id)
        epoch = epoch_record(config_id=config.config_id, snapshot=f"snapshots/{config.config_id}.npz")
        write_snapshot(
            tmp_path,
            epoch,
            **{
                "param/conv1.weight": np.full(4, values[config.config_id]),
                "param/bn1.running_var": np.full(4, values[config.config_id]),
                "probe/logits_eval": np.eye(2) * values[config.config_id],
            },
        )
        recs += [
            records.make("plan", **ident, epochs=1, config=config.to_dict()),
            epoch,
            records.make("run_end", **ident, status="complete", epochs_done=1),
        ]
    t = tables.tables(recs, tmp_path)
    row = t["mixed_precision"].iloc[0]
    assert (row.config_id, row.float32_config_id) == (mixed.config_id, float32.config_id)
    # |(2, 2, 2, 2) - (1, 1, 1, 1)| / |(1, 1, 1, 1)| = 1 (from the mixed run's side: 2 / 4 = 0.5)
    assert row.param_rel_l2 == pytest.approx(1.0) and row.running_stats_rel_l2 == pytest.approx(1.0)
    drift = t["runs"].set_index("config_id").final_running_stats_drift
    assert drift[mixed.config_id] == pytest.approx(1.0) and drift[float32.config_id] == 0.0


def test_seed_statistics_by_hand():
    from compare.reporting.stats import seed_stats

    st = seed_stats([0.8, 0.75, 0.9])
    mean = 2.45 / 3
    std = math.sqrt(((0.8 - mean) ** 2 + (0.75 - mean) ** 2 + (0.9 - mean) ** 2) / 2)  # ddof 1
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2 degrees of freedom), from a t table
    assert st["n"] == 3 and st["mean"] == pytest.approx(mean) and st["std"] == pytest.approx(std)
    assert (st["ci_low"], st["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    two = seed_stats([1.0, 3.0, float("nan")])  # non-finite values (a diverged seed's) do not count
    # std of 1, 3 is sqrt(2); t(0.975, 1) = 12.7062: half-width 12.7062 * sqrt(2) / sqrt(2)
    assert two["n"] == 2 and two["ci_high"] == pytest.approx(2.0 + 12.706204736174698)
    one = seed_stats([0.7])
    assert one["n"] == 1 and one["mean"] == 0.7 and math.isnan(one["std"]) and math.isnan(one["ci_low"])


def test_summary_carries_the_interval_over_seeds(tmp_path):
    t = tables.tables(summary_records(), tmp_path)
    row = t["summary"].iloc[0]
    best = [0.8, 0.75, 0.9]  # each seed's best epoch (CURVES)
    half = 4.302652729911275 * np.std(best, ddof=1) / math.sqrt(3)
    assert row.best_test_acc_n == 3 and row.best_test_acc_std == pytest.approx(np.std(best, ddof=1))
    assert row.best_test_acc_ci_high == pytest.approx(np.mean(best) + half), "best_test_acc_ci_high"
    assert row.final_test_acc_ci_low == pytest.approx(
        np.mean([0.7, 0.75, 0.6]) - 4.302652729911275 * np.std([0.7, 0.75, 0.6], ddof=1) / math.sqrt(3)
    )
    mean = np.mean(best)
    assert mean + half > 1  # the table keeps the t-interval as it is; report.md shows it clipped to [0, 1]
    assert f"0.8167 [{mean - half:.4f}, 1.0000]" in markdown.markdown_table(t["summary"], markdown.SUMMARY_COLUMNS)


def test_every_table_a_report_writes_reads_back_with_its_header(tmp_path):
    """A one-framework run without errors: drift.csv and errors.csv have no row but their header (pandas reads
    every CSV), and report.md says why there is no drift table."""
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in summary_records()))
    assert report.main([str(tmp_path)]) == 0
    csvs = sorted(tmp_path.glob("*.csv"))
    assert {"drift.csv", "errors.csv", "summary.csv"} <= {p.name for p in csvs}
    for path in csvs:
        frame = pd.read_csv(path)  # an empty file (no header) raises EmptyDataError
        assert len(frame.columns) > 0, path.name
    assert list(pd.read_csv(tmp_path / "drift.csv").columns[:2]) == ["framework", "reference"]
    assert pd.read_csv(tmp_path / "errors.csv").empty
    text = (tmp_path / "report.md").read_text()
    assert "Not measured: only torch ran, and drift is one framework's distance from another's" in text


def test_a_network_still_on_its_plateau_is_named_with_the_reason(tmp_path):
    """The none variant ends with a training loss of 2.29 (ln 10 = 2.3026: a uniform guess) and chance accuracy:
    report.md says it has not left its initial plateau and, for sigmoid without BN, why; scratch at 0.5 is not
    named. The conventions say its norm is none, not batch."""
    ident = dict(framework="torch", seed=0, epochs=1)
    recs = []
    for variant, loss, acc in (("scratch", 0.5, 0.8), ("none", 2.29, 0.1)):
        config = RunConfig(model=ModelSpec(variant=variant), epochs=1, device="cpu")
        recs += [
            records.make("plan", **ident, variant=variant, config_id=f"{variant}-0", config=config.to_dict()),
            epoch_record(variant=variant, train_loss=loss, test_acc=acc),
            records.make(
                "run_end",
                framework="torch",
                variant=variant,
                seed=0,
                config_id=f"{variant}-0",
                status="complete",
                epochs_done=1,
            ),
        ]
    t = tables.tables(recs, tmp_path)
    sentences = markdown.plateau_sentences(t["summary"])
    assert len(sentences) == 1 and sentences[0].startswith(
        "torch none: still on its initial plateau (final training loss 2.2900, against ln 10 = 2.3026 for a "
        "uniform guess over the 10 classes; best test accuracy 0.1000)"
    )
    assert "each sigmoid scales the gradient by its slope (at most 1/4)" in sentences[0]
    assert t["runs"].set_index("variant").norm.to_dict() == {"scratch": "batch", "none": "none"}
    assert not markdown.on_plateau(0.9 * math.log(10) - 1e-9) and markdown.on_plateau(0.9 * math.log(10))


def test_rows_that_say_the_same_thing_are_said_once():
    """Two frameworks' none rows on the plateau: one sentence naming both, their losses as a range, the reason
    once; population sentences that say the same thing: one, naming both rows."""
    summary = pd.DataFrame(
        [
            {"framework": fw, "variant": "none", "final_train_loss": loss, "best_test_acc": 0.1}
            for fw, loss in (("torch", 2.2900), ("mxnet", 2.2950))
        ]
        + [{"framework": "torch", "variant": "scratch", "final_train_loss": 0.5, "best_test_acc": 0.8}]
    )
    sentences = markdown.plateau_sentences(summary)
    assert len(sentences) == 1 and sentences[0].startswith(
        "torch none and mxnet none: still on their initial plateau (final training loss 2.2900-2.2950, against ln "
        "10 = 2.3026 for a uniform guess over the 10 classes; best test accuracy 0.1000): they have not learnt yet"
    )
    assert sentences[0].count("each sigmoid scales the gradient") == 1
    assert markdown.said_once([("torch scratch", "a"), ("mxnet scratch", "a"), ("torch builtin", "b")]) == [
        "torch scratch and mxnet scratch: a",
        "torch builtin: b",
    ]


def test_plots_compare_at_a_glance():
    """curves.png and divergence.png from two variants over three epochs: integer epoch ticks only, one y range
    per row across the variants' columns, accuracies and disagreement on [0, 1]; no promise of dashed
    population lines where none was measured, and the dashed lines where they were."""
    import matplotlib.pyplot as plt

    from compare.reporting import plots

    recs = summary_records()
    recs += [
        epoch_record(variant="none", seed=0, epoch=e, test_acc=0.1 + 0.001 * e, train_loss=2.3, probe_disagreement=0.0)
        for e in (1, 2, 3)
    ]
    figs = plots.figures(tables.tables(recs, "."))
    try:
        for name in ("curves.png", "divergence.png"):
            fig = figs[name]
            rows = {}
            for ax in fig.axes:
                ticks = [x for x in ax.get_xticks() if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]]
                assert ticks and all(float(x).is_integer() for x in ticks), (name, ticks)
                rows.setdefault(ax.get_subplotspec().rowspan.start, []).append(ax.get_ylim())
            assert all(len(set(limits)) == 1 for limits in rows.values()), (name, rows)  # shared per row
            assert "population" not in fig._suptitle.get_text()
        curves = figs["curves.png"].axes
        assert [ax.get_title() for ax in curves[:2]] == ["scratch", "none"]
        assert curves[-1].get_ylim() == (0, 1) and figs["divergence.png"].axes[-1].get_ylim() == (0, 1)
        for fig in figs.values():
            plt.close(fig)
        with_pop = population_like(recs)
        figs = plots.figures(tables.tables(with_pop, "."))
        assert figs["divergence.png"]._suptitle.get_text().endswith("dashed: with population statistics")
        assert any(line.get_linestyle() == "--" for line in figs["divergence.png"].axes[-1].get_lines())
    finally:
        for fig in figs.values():
            plt.close(fig)


def population_like(recs):
    return [dict(r, pop_test_acc=0.5, pop_probe_disagreement=0.05) if r["kind"] == "epoch" else r for r in recs]
