"""A study's statistics and answers against numbers worked by hand, from hand-made records: the failure
criterion, the cells, the paired comparisons, the trends, the plateau, what each answer says when runs are missing."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from common import records
from compare.reporting import tables
from compare.studies import analysis, answers, render, spec, summary
from tests.helpers import runs_frame, write
from tests.made import BASE_LR, LR_STUDY, epoch_record


# Statistics and answers, against numbers worked by hand -------------------------------------
def lr_study(tmp_path):
    return spec.load(
        write(
            tmp_path,
            LR_STUDY.replace("batch_size = [32, 64]\n", "").replace(
                '[scale]\nprobe_size = { with = "batch_size", reference = 32, rule = "linear" }\n', ""
            ),
        )
    )


def test_failure_criterion(tmp_path):
    study = lr_study(tmp_path)
    runs = runs_frame(
        [
            {"best_test_acc": 0.6},
            {"best_test_acc": 0.4},
            {"best_test_acc": 0.5},
            {"status": "diverged", "best_test_acc": 0.7},
            {"status": "diverged"},
            {"status": "crashed", "best_test_acc": 0.2},
            {"status": "interrupted"},
            {"status": "complete"},
        ]
    )  # complete but no epoch accuracy: fails (not >= threshold)
    assert analysis.failed(runs, study).tolist() == [False, True, False, True, True, np.nan, np.nan, True]


def test_cell_statistics_by_hand(tmp_path):
    study = lr_study(tmp_path)
    runs = runs_frame(
        [{"lr": 0.1, "seed": s, "best_test_acc": v} for s, v in enumerate([0.80, 0.84, 0.85])]
        + [
            {"lr": 0.1, "seed": 3, "status": "diverged", "best_test_acc": 0.1},
            {"lr": 1.0, "seed": 0, "best_test_acc": 0.7},
        ]
    )
    cells = analysis.cells(runs, study).set_index("lr")
    row = cells.loc[0.1]
    # mean 0.83; sample sd sqrt(((-.03)^2 + .01^2 + .02^2) / 2) = sqrt(0.0007) = 0.0264575;
    # half-width t(0.975, 2) 4.302653 x 0.0264575 / sqrt(3) = 0.0657241
    assert row.best_test_acc == pytest.approx(0.83)
    assert row.best_test_acc_std == pytest.approx(0.0264575, abs=1e-7)
    assert row.best_test_acc_ci_high - row.best_test_acc == pytest.approx(0.0657241, abs=1e-7)
    assert (row.best_test_acc_n, row.seeds, row.complete, row.diverged, row.missing, row.failed) == (3, 4, 3, 1, 0, 1)
    one = cells.loc[1.0]
    assert one.best_test_acc == 0.7 and one.best_test_acc_n == 1 and np.isnan(one.best_test_acc_ci_high)


def test_largest_stable_learning_rate(tmp_path):
    study = lr_study(tmp_path)
    rows = []
    # scratch: passes at 0.1, 1, 3 in both seeds, one seed fails (accuracy) at 10, diverges at 30
    for lr, accs in [(0.1, [0.8, 0.8]), (1.0, [0.85, 0.86]), (3.0, [0.7, 0.6]), (10.0, [0.7, 0.3])]:
        rows += [{"lr": lr, "seed": s, "best_test_acc": a} for s, a in enumerate(accs)]
    rows += [{"lr": 30.0, "seed": s, "status": "diverged"} for s in (0, 1)]
    # none: fails at 0.1 (too slow), passes at 1, diverges at 3; 10 has a crashed seed
    for lr, accs in [(0.1, [0.2, 0.6]), (1.0, [0.6, 0.55])]:
        rows += [{"variant": "none", "lr": lr, "seed": s, "best_test_acc": a} for s, a in enumerate(accs)]
    rows += [
        {"variant": "none", "lr": 3.0, "seed": 0, "status": "diverged"},
        {"variant": "none", "lr": 3.0, "seed": 1, "best_test_acc": 0.6},
    ]
    answer, frames = answers.analyse(runs_frame(rows), study)
    table = frames["stability"].set_index("variant")
    assert table.loc["scratch", "largest_stable_lr"] == 3.0 and table.loc["scratch", "smallest_failing_lr"] == 10.0
    assert table.loc["none", "largest_stable_lr"] == 1.0 and table.loc["none", "smallest_failing_lr"] == 0.1
    assert table.loc["none", "note"] == "not monotone: also fails at the smaller lr 0.1"
    assert answer[0] == "**scratch**: largest stable lr 3 (torch)."
    assert answer[1] == "**none**: largest stable lr 1 (torch)."
    assert answer[2] == "In torch, scratch BN tolerates a lr 3x that of the network without BN."


def test_paired_comparison_by_hand(tmp_path):
    text = LR_STUDY.replace('kind = "largest-stable"\nx = "lr"', 'kind = "compare"\naxis = "lr"\nbaseline = 0.1')
    study = spec.load(
        write(
            tmp_path,
            text.replace("batch_size = [32, 64]\n", "").replace(
                '[scale]\nprobe_size = { with = "batch_size", reference = 32, rule = "linear" }\n', ""
            ),
        )
    )
    base, arm = [0.80, 0.81, 0.79], [0.81, 0.83, 0.83]  # per-seed differences 0.01, 0.02, 0.04
    rows = [{"lr": 0.1, "seed": s, "best_test_acc": v} for s, v in enumerate(base)]
    rows += [{"lr": 1.0, "seed": s, "best_test_acc": v} for s, v in enumerate(arm)]
    rows += [{"lr": 1.0, "seed": 9, "best_test_acc": 0.99}]  # no partner seed: not in the difference
    answer, frames = answers.analyse(runs_frame(rows), study)
    row = frames["comparisons"].iloc[0]
    assert (row.arm, row.baseline, row.paired_seeds) == ("lr=1", "lr=0.1", 3)
    # mean 0.0233333; sd 0.0152753; half-width 4.302653 x 0.0152753 / sqrt(3) = 0.0379458
    assert row.difference == pytest.approx(0.0233333, abs=1e-7)
    assert row.difference_ci_low == pytest.approx(0.0233333 - 0.0379458, abs=1e-7)
    assert row.difference_ci_high == pytest.approx(0.0233333 + 0.0379458, abs=1e-7)
    assert row.verdict == "within seed noise"
    assert "difference +0.0233 (3 paired seeds, 95% CI -0.0146 to +0.0613): within seed noise." in answer[0]
    # a consistent gain: differences 0.05, 0.06, 0.055 -> the interval excludes 0
    rows = [{"lr": 0.1, "seed": s, "best_test_acc": v} for s, v in enumerate(base)]
    rows += [{"lr": 1.0, "seed": s, "best_test_acc": v + d} for s, (v, d) in enumerate(zip(base, [0.05, 0.06, 0.055]))]
    _, frames = answers.analyse(runs_frame(rows), study)
    assert frames["comparisons"].iloc[0].verdict == "higher"


def compare_study(tmp_path):
    """The LR study answered by comparing each lr with the baseline lr 0.1."""
    text = LR_STUDY.replace('kind = "largest-stable"\nx = "lr"', 'kind = "compare"\naxis = "lr"\nbaseline = 0.1')
    return spec.load(
        write(
            tmp_path,
            text.replace("batch_size = [32, 64]\n", "").replace(
                '[scale]\nprobe_size = { with = "batch_size", reference = 32, rule = "linear" }\n', ""
            ),
        )
    )


def arms(base: dict, arm: dict, arm_status=None):
    """Runs of the baseline (lr 0.1) and the arm (lr 1.0): seed -> best test accuracy."""
    return runs_frame(
        [{"lr": 0.1, "seed": s, "best_test_acc": v} for s, v in base.items()]
        + [
            {"lr": 1.0, "seed": s, "best_test_acc": v, "status": (arm_status or {}).get(s, "complete")}
            for s, v in arm.items()
        ]
    )


def test_a_diverged_run_stays_out_of_a_paired_comparison(tmp_path):
    """Seed 1 of the arm diverged after some epochs: its best accuracy before that (0.60) is finite, but a
    diverged run is not a complete one and has no place in the paired difference."""
    runs = arms({0: 0.80, 1: 0.82, 2: 0.78, 3: 0.81}, {0: 0.83, 1: 0.60, 2: 0.80, 3: 0.84}, {1: "diverged"})
    row = analysis.comparisons(runs, compare_study(tmp_path)).iloc[0]
    # seeds 0, 2, 3: differences 0.03, 0.02, 0.03; mean 0.0266667, sd sqrt(0.0000333333) = 0.0057735,
    # half-width 4.302653 x 0.0057735 / sqrt(3) = 0.0143422 -> [0.0123245, 0.0410089], above 0
    # (with the diverged seed: -0.22 among them, mean -0.035, within seed noise)
    assert row.paired_seeds == 3
    assert row.arm_mean == pytest.approx((0.83 + 0.80 + 0.84) / 3) and row.baseline_mean == pytest.approx(
        (0.80 + 0.78 + 0.81) / 3
    )
    assert row.difference == pytest.approx(0.0266667, abs=1e-7)
    assert (row.difference_ci_low, row.difference_ci_high) == (
        pytest.approx(0.0123245, abs=1e-7),
        pytest.approx(0.0410089, abs=1e-7),
    )
    assert row.verdict == "higher"


def test_best_names_the_best_arm_and_those_within_seed_noise_of_it(tmp_path):
    """best = true: each arm against the stratum's best arm (by mean), paired per seed. lr 1.0 is best; lr 0.1
    trails it by 0.01-0.03 per seed (beyond seed noise), lr 0.3 by -0.02..+0.02 (within)."""
    study = spec.load(
        write(
            tmp_path,
            LR_STUDY.replace(
                'kind = "largest-stable"\nx = "lr"', 'kind = "compare"\naxis = "lr"\nbaseline = 0.1\nbest = true'
            )
            .replace("batch_size = [32, 64]\n", "")
            .replace('[scale]\nprobe_size = { with = "batch_size", reference = 32, rule = "linear" }\n', ""),
        )
    )
    accuracy = {0.1: [0.80, 0.79, 0.81], 0.3: [0.83, 0.80, 0.82], 1.0: [0.82, 0.81, 0.83]}
    runs = runs_frame(
        [{"lr": lr, "seed": s, "best_test_acc": v} for lr, vs in accuracy.items() for s, v in enumerate(vs)]
    )
    table = analysis.comparisons(runs, study, against_best=True)
    assert set(table.baseline) == {"lr=1"} and sorted(table.arm) == ["lr=0.1", "lr=0.3"]
    # lr 0.1 - lr 1: -0.02, -0.02, -0.02: sd 0, an interval of one point, below 0
    assert table.set_index("arm").verdict.to_dict() == {"lr=0.1": "lower", "lr=0.3": "within seed noise"}
    answer, frames = answers.analyse(runs, study)
    assert answer[0] == (
        "torch, scratch: the highest best test accuracy is lr=1's (0.8200); within seed noise of "
        "it: lr=0.3; behind it beyond seed noise: lr=0.1."
    )
    assert "against_best" in frames
    with pytest.raises(spec.StudyError, match="best"):
        spec.load(write(tmp_path, LR_STUDY.replace('x = "lr"', 'x = "lr"\nbest = true')))


def test_also_compares_further_metrics_the_same_way(tmp_path):
    """also = [...]: each further metric gets its own paired comparisons and sentences, after the answer's."""
    study = spec.load(
        write(
            tmp_path,
            LR_STUDY.replace(
                'kind = "largest-stable"\nx = "lr"',
                'kind = "compare"\naxis = "lr"\nbaseline = 0.1\nalso = ["final_probe_disagreement"]',
            )
            .replace("batch_size = [32, 64]\n", "")
            .replace('[scale]\nprobe_size = { with = "batch_size", reference = 32, rule = "linear" }\n', ""),
        )
    )
    runs = runs_frame(
        [
            {"lr": lr, "seed": seed, "best_test_acc": acc, "final_probe_disagreement": dis}
            for lr, values in {
                0.1: [(0.80, 0.05), (0.79, 0.06), (0.81, 0.05)],
                1.0: [(0.82, 0.10), (0.80, 0.12), (0.83, 0.11)],
            }.items()
            for seed, (acc, dis) in enumerate(values)
        ]
    )
    answer, frames = answers.analyse(runs, study)
    table = frames["comparisons"].set_index("metric")
    assert list(table.index) == ["best_test_acc", "final_probe_disagreement"]
    # disagreement 0.10-0.05, 0.12-0.06, 0.11-0.05: mean 0.0566667, sd 0.0057735 -> above 0
    assert table.loc["final_probe_disagreement", "difference"] == pytest.approx(0.0566667, abs=1e-7)
    assert table.loc["final_probe_disagreement", "verdict"] == "higher"
    assert answer[-1].startswith("lr=1 vs lr=0.1 (torch, scratch): train/eval prediction disagreement 0.1100 vs 0.0533")
    with pytest.raises(spec.StudyError, match="also"):
        spec.load(write(tmp_path, LR_STUDY.replace('x = "lr"', 'x = "lr"\nalso = ["bogus"]')))


def test_arms_pair_by_seed_value_when_a_seed_is_missing(tmp_path):
    """The arm lacks seed 1 (in the middle of the list): seed 2 pairs with seed 2, not with the baseline's
    second run."""
    runs = arms({0: 0.80, 1: 0.70, 2: 0.85, 3: 0.75}, {0: 0.82, 2: 0.88, 3: 0.775})
    row = analysis.comparisons(runs, compare_study(tmp_path)).iloc[0]
    # seeds 0, 2, 3: differences 0.02, 0.03, 0.025; mean 0.025, sd 0.005, half-width 4.302653 x 0.005 /
    # sqrt(3) = 0.0124207 (by position: 0.02, 0.18, -0.075, mean 0.0416667)
    assert row.paired_seeds == 3 and row.baseline_mean == pytest.approx(0.80)
    assert row.difference == pytest.approx(0.025, abs=1e-9)
    assert (row.difference_ci_low, row.difference_ci_high) == (
        pytest.approx(0.0125793, abs=1e-7),
        pytest.approx(0.0374207, abs=1e-7),
    )
    assert row.verdict == "higher"


def test_pairing_keeps_each_arm_in_seed_order(tmp_path):
    """Neither arm is in ascending order of its values; the mean difference would not change if one were
    sorted before pairing, but the interval and the verdict would."""
    runs = arms({0: 0.80, 1: 0.70, 2: 0.75, 3: 0.85}, {0: 0.82, 1: 0.73, 2: 0.775, 3: 0.87})
    row = analysis.comparisons(runs, compare_study(tmp_path)).iloc[0]
    # differences 0.02, 0.03, 0.025, 0.02: mean 0.02375, sd sqrt(0.0000687500 / 3) = 0.00478714, half-width
    # t(0.975, 3) 3.182446 x 0.00478714 / 2 = 0.00761738 (sorted arm: -0.07, 0.075, 0.07, 0.02, within noise)
    assert row.paired_seeds == 4 and row.difference == pytest.approx(0.02375, abs=1e-9)
    assert (row.difference_ci_low, row.difference_ci_high) == (
        pytest.approx(0.0161326, abs=1e-7),
        pytest.approx(0.0313674, abs=1e-7),
    )
    assert row.verdict == "higher"


def test_a_resume_runs_what_has_no_result_and_nothing_else(tmp_path):
    """complete and diverged are results; interrupted, crashed, failed and a run with no end record (its
    runner killed) run again; a run whose latest attempt completed does not."""
    from common.config import RunConfig
    from compare.study import work_left

    configs = [RunConfig(seed=s, epochs=2) for s in range(7)]
    lines = []
    for config, ends in zip(
        configs, [["complete"], ["diverged"], ["interrupted"], ["crashed"], ["failed"], [], ["crashed", "complete"]]
    ):
        ident = dict(framework="torch", variant="scratch", seed=config.seed, config_id=config.config_id)
        for attempt, status in enumerate(ends or [None], 1):
            lines.append(records.make("plan", **ident, epochs=2, attempt=attempt))
            if status in ("complete", "diverged", "interrupted"):
                lines.append(records.make("run_end", **ident, status=status, epochs_done=1))
            elif status:
                lines.append(records.make("error", **ident, status=status, error_type="X", message="x"))
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    left = work_left(tmp_path, ["torch", "mxnet"], configs)
    assert [c.seed for c in left["torch"]] == [2, 3, 4, 5]
    assert [c.seed for c in left["mxnet"]] == list(range(7))  # nothing of it ran yet
    assert work_left(tmp_path / "new", ["torch"], configs) == {"torch": configs}  # a new study runs everything


def test_printed_intervals_stay_inside_what_the_metric_can_be(tmp_path):
    """Two seeds far apart: the t-interval of an accuracy reaches below 0 and above 1; study.md's cells and
    sentences show it clipped to [0, 1] and say it rests on two seeds; study.csv keeps it unclipped."""
    study = compare_study(tmp_path)
    runs = arms({0: 0.10, 1: 0.60}, {0: 0.12, 1: 0.90})
    answer, frames = answers.analyse(runs, study)
    cell = frames["study"].set_index("lr").loc[0.1]
    # mean 0.35, sd 0.353553, half-width 12.706205 x 0.353553 / sqrt(2) = 3.176551
    assert cell.best_test_acc_ci_low == pytest.approx(0.35 - 3.176551, abs=1e-6)  # unclipped in the table
    text = render.render(
        study, summary.summarise(runs, study, frames), answer, frames, {"seeds": [0, 1]}, [], [], runs.iloc[:0], []
    )
    assert "0.3500 [0.0000, 1.0000] (n=2)" in text
    assert "rest on two seeds" in text
    # the paired difference of two accuracies lies in [-1, 1]: differences 0.02, 0.30, mean 0.16, half-width
    # 12.706205 x 0.197990 / sqrt(2) = 1.778869 -> [-1.618869, 1.938869], shown as [-1, +1]
    assert "95% CI -1.0000 to +1.0000" in " ".join(answer)
    shown = [float(v) for pair in re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", text) for v in pair]
    assert shown and all(-1 <= v <= 1 for v in shown), shown
    from compare.reporting.stats import clipped, metric_bounds

    assert metric_bounds("final_train_loss") == (0.0, math.inf)
    assert clipped(-0.5, 2.0, metric_bounds("final_train_loss")) == (0.0, 2.0)
    assert metric_bounds("train_examples_per_s")[0] == 0.0 and metric_bounds("final_probe_disagreement") == (0, 1)


def test_framework_agreement_compares_every_pair_and_their_intervals():
    study = spec.load(spec.find("framework-agreement"))
    values = {"torch": [0.80, 0.82, 0.81], "mxnet": [0.80, 0.82, 0.815], "tensorflow": [0.70, 0.71, 0.72]}
    rows = [
        {"framework": fw, "seed": s, "best_test_acc": v, "config_id": f"c{s}"}
        for fw, vs in values.items()
        for s, v in enumerate(vs)
    ]
    answer, frames = answers.analyse(runs_frame(rows), study)
    pairs = frames["comparisons"][["arm", "baseline", "verdict"]].values.tolist()
    assert pairs == [
        ["mxnet", "torch", "within seed noise"],
        ["tensorflow", "torch", "lower"],
        ["tensorflow", "mxnet", "lower"],
    ]
    assert answer[0] == (
        "2 of 3 comparisons differ beyond seed noise (higher is better). The 95% intervals of "
        "torch and tensorflow (scratch); mxnet and tensorflow (scratch) do not overlap."
    )
    # each framework's mean first: torch 0.81, sd 0.01, half-width 4.302653 x 0.01 / sqrt(3) = 0.0248414
    assert answer[1].startswith("scratch: mean best test accuracy torch 0.8100 [0.7852, 0.8348] (n=3); mxnet 0.8117 [")
    assert answer[2].startswith("mxnet vs torch (scratch): best test accuracy 0.8117 vs 0.8100, difference +0.0017")
    # one framework alone: its figure, and nothing to compare
    answer, _ = answers.analyse(runs_frame([r for r in rows if r["framework"] == "torch"]), study)
    assert answer == [
        "scratch: mean best test accuracy torch 0.8100 [0.7852, 0.8348] (n=3).",
        "Only torch ran with complete runs: nothing to compare.",
    ]


def test_trend_answer(tmp_path):
    text = LR_STUDY.replace(
        'kind = "largest-stable"\nx = "lr"', 'kind = "trend"\nx = "batch_size"\nmetric = "final_probe_disagreement"'
    )
    study = spec.load(write(tmp_path, text.replace("lr = [0.1, 1.0]\n", "")))
    rows = [
        {"batch_size": b, "seed": s, "final_probe_disagreement": v + 0.001 * s}
        for b, v in [(32, 0.20), (64, 0.10)]
        for s in range(3)
    ]
    answer, _ = answers.analyse(runs_frame(rows), study)
    assert answer == [
        "torch, scratch: train/eval prediction disagreement falls as batch_size grows: lowest "
        "0.1010 [0.0985, 0.1035] (n=3) at batch_size 64, highest 0.2010 [0.1985, 0.2035] (n=3) at batch_size 32; "
        "the two intervals do not overlap."
    ]


def test_a_paired_gain_says_where_it_leaves_zero(tmp_path):
    """final_pop_gain is each seed's population minus EMA accuracy of the same run: the trend answer also
    says where its interval over seeds excludes 0."""
    text = LR_STUDY.replace('kind = "largest-stable"\nx = "lr"', 'kind = "trend"\nx = "lr"\nmetric = "final_pop_gain"')
    study = spec.load(
        write(
            tmp_path,
            text.replace("batch_size = [32, 64]\n", "").replace(
                '[scale]\nprobe_size = { with = "batch_size", reference = 32, rule = "linear" }\n', ""
            ),
        )
    )
    rows = [
        {"lr": lr, "seed": s, "final_pop_gain": v}
        for lr, values in [(0.1, [0.01, 0.02, 0.03]), (1.0, [0.05, 0.06, 0.055])]
        for s, v in enumerate(values)
    ]
    answer, _ = answers.analyse(runs_frame(rows), study)
    # lr 0.1: mean 0.02, sd 0.01, half-width 4.302653 x 0.01 / sqrt(3) = 0.0248414; lr 1: mean 0.055, sd 0.005,
    # half-width 0.0124207
    assert answer[0] == (
        "torch, scratch: final test accuracy, population statistics minus running average (per "
        "seed, the same run): above 0 at lr 1 (0.0550 [0.0426, 0.0674] (n=3)); within seed noise "
        "at lr 0.1 (0.0200 [-0.0048, 0.0448] (n=3))."
    )


def test_a_resumed_run_counts_only_its_latest_attempt(tmp_path):
    ident = dict(framework="torch", variant="scratch", seed=0, config_id="c0")
    first = [
        records.make("plan", **ident, epochs=2, coords={"lr": 1.0}),
        epoch_record(config_id="c0", epoch=1, test_acc=0.3),
        records.make("run_end", **ident, status="interrupted", epochs_done=1),
    ]
    second = [
        records.make("plan", **ident, epochs=2, coords={"lr": 1.0}),
        epoch_record(config_id="c0", epoch=1, test_acc=0.5),
        epoch_record(config_id="c0", epoch=2, test_acc=0.6),
        records.make("run_end", **ident, status="complete", epochs_done=2),
    ]
    t = tables.tables(first + second, tmp_path)
    assert t["runs"][["status", "lr", "best_test_acc"]].values.tolist() == [["complete", 1.0, 0.6]]
    assert t["epochs"].test_acc.tolist() == [0.5, 0.6] and t["epochs"].lr.tolist() == [1.0, 1.0]
    assert t["summary"][["lr", "seeds", "best_test_acc"]].values.tolist() == [[1.0, 1, 0.6]]


ANSWER_KINDS = {
    "largest-stable": 'kind = "largest-stable"\nx = "lr"',
    "compare": 'kind = "compare"\naxis = "lr"\nbaseline = 0.1',
    "compare-best": 'kind = "compare"\naxis = "lr"\nbaseline = 0.1\nbest = true',
    "compare-also": 'kind = "compare"\naxis = "lr"\nbaseline = 0.1\nalso = ["final_probe_disagreement"]',
    "compare-every-pair": 'kind = "compare"\naxis = "lr"',
    "trend": 'kind = "trend"\nx = "lr"',
    "trend-gain": 'kind = "trend"\nx = "lr"\nmetric = "final_pop_gain"',
}


def kind_study(tmp_path, kind):
    """BASE_LR answered by `kind`, plotted against lr on a log axis (which cannot autoscale with no value drawn)."""
    text = BASE_LR.replace('kind = "largest-stable"\nx = "lr"', ANSWER_KINDS[kind])
    return spec.load(write(tmp_path, text + '\n[plot]\nx = "lr"\nlog_x = true\n', f"{kind}.toml"))


def statuses_runs(subset):
    """Two arms (lr 0.1 and 1) x two seeds, with only `subset` of them measured: every run without a complete
    result (none), every run diverged, one seed, one arm (lr 1 interrupted)."""
    rows = []
    for lr in (0.1, 1.0):
        for seed in (0, 1):
            measured = {
                "best_test_acc": 0.5 + lr / 10 + seed / 100,
                "final_probe_disagreement": 0.1,
                "final_pop_gain": 0.01 * seed + lr / 100,
            }
            if subset == "one seed" and seed == 1:
                continue
            if subset == "no complete run" or (subset == "one arm" and lr == 1.0):
                measured = {"status": "interrupted"}
            elif subset == "every run diverged":
                measured = {"status": "diverged"}
            rows.append({"lr": lr, "seed": seed, **measured})
    return runs_frame(rows)


NOTHING = {
    "compare": "No run completed (4 without a result): nothing to compare.",
    "trend": "torch, scratch: fewer than two lr values with complete runs (4 without a result): no trend to tell.",
}
MISSING = {  # (kind, subset) -> a sentence the answer must hold, saying what is missing
    ("largest-stable", "no complete run"): "**scratch**: largest stable lr unknown, no run has a result (torch).",
    ("largest-stable", "every run diverged"): "**scratch**: largest stable lr none in the grid (torch).",
    ("largest-stable", "one seed"): "A lr is stable when none of its 1 seed failed: a failure is a non-finite "
    "training loss or a best test accuracy below 0.5.",
    ("largest-stable", "one arm"): "Note: torch scratch: unknown at 1 (runs missing).",
    ("compare", "no complete run"): NOTHING["compare"],
    ("compare", "every run diverged"): "No run completed (4 diverged): nothing to compare.",
    ("compare", "one seed"): "With one paired seed no difference can be told from seed noise.",
    ("compare", "one arm"): "Only lr=0.1 ran with complete runs: nothing to compare.",
    ("compare-best", "no complete run"): "torch, scratch: no arm has a complete run: no best arm.",
    ("compare-best", "every run diverged"): "torch, scratch: no arm has a complete run: no best arm.",
    ("compare-best", "one seed"): "torch, scratch: the highest best test accuracy is lr=1's (0.6000); within seed "
    "noise of it: none; not told apart from it (one paired seed): lr=0.1; behind it "
    "beyond seed noise: none.",
    ("compare-best", "one arm"): "torch, scratch: only lr=0.1 has complete runs, so there is no other arm to rank "
    "it against.",
    ("compare-also", "no complete run"): NOTHING["compare"],
    ("compare-also", "every run diverged"): "No run completed (4 diverged): nothing to compare.",
    ("compare-also", "one seed"): "lr=1 vs lr=0.1 (torch, scratch): train/eval prediction disagreement 0.1000 vs "
    "0.1000, difference +0.0000 (1 paired seed): one seed: no interval.",
    ("compare-also", "one arm"): "Only lr=0.1 ran with complete runs: nothing to compare.",
    ("compare-every-pair", "no complete run"): NOTHING["compare"],
    ("compare-every-pair", "every run diverged"): "No run completed (4 diverged): nothing to compare.",
    ("compare-every-pair", "one seed"): "lr=1 vs lr=0.1 (torch, scratch): best test accuracy 0.6000 vs 0.5100, "
    "difference +0.0900 (1 paired seed): one seed: no interval.",
    ("compare-every-pair", "one arm"): "Only lr=0.1 ran with complete runs: nothing to compare.",
    ("trend", "no complete run"): NOTHING["trend"],
    ("trend", "every run diverged"): "torch, scratch: fewer than two lr values with complete runs (4 diverged): "
    "no trend to tell.",
    ("trend", "one seed"): "torch, scratch: best test accuracy rises with lr: lowest 0.5100 (n=1) at lr 0.1, "
    "highest 0.6000 (n=1) at lr 1; one seed: no interval.",
    ("trend", "one arm"): "torch, scratch: fewer than two lr values with complete runs (2 without a result): no "
    "trend to tell.",
    ("trend-gain", "no complete run"): NOTHING["trend"],
    ("trend-gain", "every run diverged"): "torch, scratch: fewer than two lr values with complete runs (4 "
    "diverged): no trend to tell.",
    ("trend-gain", "one seed"): "torch, scratch: final test accuracy, population statistics minus running average "
    "(per seed, the same run): one seed: no interval at lr 0.1 (0.0010 (n=1)), lr 1 "
    "(0.0100 (n=1)).",
    ("trend-gain", "one arm"): "torch, scratch: fewer than two lr values with complete runs (2 without a result): "
    "no trend to tell.",
}


@pytest.mark.parametrize(
    "kind, subset", sorted(MISSING), ids=[f"{k}-{s}".replace(" ", "-") for k, s in sorted(MISSING)]
)
def test_every_answer_kind_says_what_is_missing(tmp_path, kind, subset):
    """Whatever subset of the runs has a result, each answer kind answers with a sentence saying what is missing,
    study.md renders (with a word on the missing results where no run completed), and the plot draws."""
    study, runs = kind_study(tmp_path, kind), statuses_runs(subset)
    answer, frames = answers.analyse(runs, study)
    assert MISSING[kind, subset] in answer, answer
    assert not any("nan" in sentence for sentence in answer), answer
    text = render.render(
        study,
        summary.summarise(runs, study, frames),
        answer,
        frames,
        {"seeds": [0, 1]},
        [],
        [],
        runs[runs.status != "complete"],
        [],
    )
    assert ("**No run has a complete result**" in text) == (subset in ("no complete run", "every run diverged"))
    assert render.plot(frames["study"], study, tmp_path) == ["study.png"]


def test_a_study_without_any_run_recorded_still_answers(tmp_path):
    study = kind_study(tmp_path, "compare-best")
    runs = tables.tables([], tmp_path)["runs"]
    answer, frames = answers.analyse(runs, study)
    assert answer == ["No run was recorded: nothing to answer."]
    assert "**No run has a complete result**" in render.render(
        study, summary.summarise(runs, study, frames), answer, frames, {}, [], [], runs, []
    )


def test_best_keeps_arms_measured_on_one_seed_apart(tmp_path):
    """lr 0.3 ran one seed only (seed 0): against the best arm (lr 1) it has one paired seed, so it is neither
    within seed noise nor behind beyond it: the answer names it on its own."""
    study = kind_study(tmp_path, "compare-best")
    accuracy = {0.1: [0.80, 0.79, 0.81], 0.3: [0.83], 1.0: [0.82, 0.81, 0.83], 3.0: [0.83, 0.80, 0.82]}
    runs = runs_frame(
        [{"lr": lr, "seed": s, "best_test_acc": v} for lr, vs in accuracy.items() for s, v in enumerate(vs)]
    )
    answer, frames = answers.analyse(runs, study)
    # the best arm is the highest mean: lr 0.3's single seed (0.83), which pairs with each other arm's seed 0 only
    assert answer[0] == (
        "torch, scratch: the highest best test accuracy is lr=0.3's (0.8300); within seed noise "
        "of it: none; not told apart from it (one paired seed): lr=0.1, lr=1, lr=3; behind it "
        "beyond seed noise: none."
    )
    runs = runs[runs.lr != 0.3].copy()
    runs = pd.concat([runs, runs_frame([{"lr": 0.3, "seed": 1, "best_test_acc": 0.60}])], ignore_index=True)
    answer, _ = answers.analyse(runs, study)
    # lr 0.3 now ran seed 1 alone (0.60): lr 1 is best (0.82); lr 3 within seed noise (per seed +0.01, -0.01,
    # -0.01); lr 0.1 behind (-0.02 every seed); lr 0.3 one paired seed (seed 1)
    assert answer[0] == (
        "torch, scratch: the highest best test accuracy is lr=1's (0.8200); within seed noise of "
        "it: lr=3; not told apart from it (one paired seed): lr=0.3; behind it beyond seed noise: "
        "lr=0.1."
    )


def test_trend_intervals_that_overlap_are_not_called_apart(tmp_path):
    """Two batch sizes whose intervals overlap ([0.1000, 0.3000] and [0.2000, 0.4000] in spirit): lowest's high
    end above the highest's low end. A check of the wrong ends (high against high, low against high) would
    call them apart."""
    text = LR_STUDY.replace(
        'kind = "largest-stable"\nx = "lr"', 'kind = "trend"\nx = "batch_size"\nmetric = "final_probe_disagreement"'
    )
    study = spec.load(write(tmp_path, text.replace("lr = [0.1, 1.0]\n", "")))
    # batch 32: 0.25, 0.35, 0.30 -> mean 0.30, sd 0.05, half-width 4.302653 x 0.05 / sqrt(3) = 0.1242069
    # batch 64: 0.15, 0.25, 0.20 -> mean 0.20, the same half-width: [0.0757931, 0.3242069] and [0.1757931, 0.4242069]
    rows = [
        {"batch_size": b, "seed": s, "final_probe_disagreement": v}
        for b, values in [(32, [0.25, 0.35, 0.30]), (64, [0.15, 0.25, 0.20])]
        for s, v in enumerate(values)
    ]
    answer, _ = answers.analyse(runs_frame(rows), study)
    assert answer == [
        "torch, scratch: train/eval prediction disagreement falls as batch_size grows: lowest 0.2000 "
        "[0.0758, 0.3242] (n=3) at batch_size 64, highest 0.3000 [0.1758, 0.4242] (n=3) at batch_size "
        "32; their intervals overlap, so the extremes are not told apart from seed noise."
    ]


def test_a_trend_is_not_split_by_a_scaled_field(tmp_path):
    """probe_size follows batch_size ([scale]): it differs in every cell, so grouping by it would leave one
    batch size per group and no trend."""
    text = LR_STUDY.replace(
        'kind = "largest-stable"\nx = "lr"', 'kind = "trend"\nx = "batch_size"\nmetric = "final_probe_disagreement"'
    )
    study = spec.load(write(tmp_path, text.replace("lr = [0.1, 1.0]\n", "")))
    configs, coords = study.cells(seeds=(0, 1))
    rows = [
        {
            "batch_size": c.batch_size,
            "probe_size": c.probe_size,
            "seed": c.seed,
            "config_id": c.config_id,
            "variant": c.model.variant,
            "final_probe_disagreement": 0.1 * c.batch_size / 32 + 0.01 * c.seed,
        }
        for c in configs
        if c.model.variant == "scratch"
    ]
    runs = runs_frame(rows)
    assert set(zip(runs.batch_size, runs.probe_size)) == {(32, 512), (64, 1024)}
    answer, _ = answers.analyse(runs, study)
    # batch 32: 0.10, 0.11 -> mean 0.105; batch 64: 0.20, 0.21 -> mean 0.205; sd 0.0070711, half-width
    # 12.706205 x 0.0070711 / sqrt(2) = 0.0635310
    assert answer == [
        "torch, scratch: train/eval prediction disagreement rises with batch_size: lowest 0.1050 "
        "[0.0415, 0.1685] (n=2) at batch_size 32, highest 0.2050 [0.1415, 0.2685] (n=2) at batch_size "
        "64; their intervals overlap, so the extremes are not told apart from seed noise."
    ]


def test_also_metrics_reach_the_tables_and_the_plot(tmp_path):
    """A further compared metric (`also`) has its statistics in study.csv, a column in study.md's evidence and
    a panel in study.png, though the [plot] table does not name it."""
    study = kind_study(tmp_path, "compare-also")
    assert study.plot["metrics"] == ["best_test_acc"]
    runs = runs_frame(
        [
            {"lr": lr, "seed": seed, "best_test_acc": acc, "final_probe_disagreement": dis}
            for lr, values in {
                0.1: [(0.80, 0.05), (0.79, 0.06), (0.81, 0.05)],
                1.0: [(0.82, 0.10), (0.80, 0.12), (0.83, 0.11)],
            }.items()
            for seed, (acc, dis) in enumerate(values)
        ]
    )
    answer, frames = answers.analyse(runs, study)
    cell = frames["study"].set_index("lr").final_probe_disagreement
    assert cell[1.0] == pytest.approx(0.11) and cell[0.1] == pytest.approx(0.16 / 3)
    text = render.render(
        study, summary.summarise(runs, study, frames), answer, frames, {"seeds": [0, 1, 2]}, [], [], runs.iloc[:0], []
    )
    header = next(line for line in text.splitlines() if line.startswith("| framework | variant | lr |"))
    assert "final_probe_disagreement" in header and "best_test_acc" in header
    fig = render.figure(frames["study"], study)
    assert [ax.get_ylabel() for ax in fig.axes] == ["best test accuracy", "train/eval prediction disagreement"]
    line = next(drawn for drawn in fig.axes[1].get_lines() if len(drawn.get_ydata()) == 2)
    np.testing.assert_allclose(line.get_ydata(), [0.16 / 3, 0.11])


def test_a_further_metric_without_values_says_so_not_that_no_seed_is_shared(tmp_path):
    """A metric read from the snapshots (the running-statistics drift) has no value in a folder without them: the
    runs still share their seeds, so the answer says the values are missing, not that the seeds differ."""
    text = BASE_LR.replace(
        'kind = "largest-stable"\nx = "lr"',
        'kind = "compare"\naxis = "lr"\nbaseline = 0.1\nalso = ["final_running_stats_drift"]',
    )
    study = spec.load(write(tmp_path, text, "drift.toml"))
    runs = runs_frame(
        [
            {"lr": lr, "seed": s, "best_test_acc": 0.5 + lr / 10 + s / 100, "final_running_stats_drift": np.nan}
            for lr in (0.1, 1.0)
            for s in (0, 1)
        ]
    )
    answer, _ = answers.analyse(runs, study)
    drift = "running-statistics drift from the float32 run"
    assert f"The complete runs that share a seed have no value of {drift}: nothing to compare." in answer, answer
    assert (
        f"lr=1 vs lr=0.1 (torch, scratch): {drift} not compared: the complete runs that share a seed have no "
        "value of it." in answer
    ), answer
    assert not any("share no seed" in sentence for sentence in answer), answer


def test_the_plateau_rule_takes_each_cells_mean_over_its_seeds():
    """Cell lr 0.1 (batch 32): final training losses 2.30, 2.30, 1.90, mean 2.1667, within 10% of ln 10 (2.0723 and
    up): on the plateau, though one seed left it (its minimum, 1.90, is not). Cell lr 1.0: 0.5 each, learning. The
    two share framework and variant, so the rule must tell them apart by the grid's axes (pooled, their mean would be
    1.3333, off the plateau); an unfinished run counts in neither."""
    study = spec.load(spec.STUDIES_DIR / "lr-sweep.toml")
    axis = study.axes[0]
    rows = [(0.1, s, loss, "complete") for s, loss in enumerate([2.30, 2.30, 1.90])]
    rows += [(1.0, s, 0.5, "complete") for s in range(3)] + [(1.0, 3, 2.30, "diverged")]
    runs = pd.DataFrame(
        [
            {
                "framework": "torch",
                "variant": "scratch",
                axis: value,
                "seed": seed,
                "final_train_loss": loss,
                "status": status,
                **{a: 32 for a in study.axes[1:]},
            }
            for value, seed, loss, status in rows
        ]
    )
    assert answers._plateau_sentences(runs, study) == [
        f"torch, scratch, {axis} 0.1"
        + "".join(f", {a} 32" for a in study.axes[1:])
        + ": still on its initial plateau (mean final training loss 2.167, ln 10 = 2.303): it has not started "
        "learning, so its comparisons describe a network that is not moving."
    ]
