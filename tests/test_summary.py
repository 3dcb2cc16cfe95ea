"""A study's summary (compare.studies.summary): hand-made runs whose answer is known, checked word for word for
each answer kind, with frameworks that agree and that do not, within seed noise, one seed and no complete run; and
the appendix (compare.studies.answers) keeping every stratum's own sentence."""

import pandas as pd

from compare.studies import answers, spec, summary
from tests.helpers import runs_frame, write

FOUR = ("torch", "mxnet", "tensorflow", "jax")
STUDY = """\
question = "Does a larger learning rate help?"
frameworks = ["torch", "mxnet", "tensorflow", "jax"]
variants = ["scratch"]
seeds = [0, 1, 2]

[grid]
lr = [0.1, 1.0]
activation = ["relu", "sigmoid"]

[answer]
kind = "compare"
axis = "lr"
baseline = 0.1
names = { "lr=1" = "lr 1", "lr=0.1" = "lr 0.1", "activation=relu" = "ReLU" }
"""


def study(tmp_path, text=STUDY, name="s.toml"):
    return spec.load(write(tmp_path, text, name))


def compare_runs(gain, noisy=(), seeds=(0, 1, 2), activations=("relu", "sigmoid")):
    """lr 0.1 reaches 0.80 + seed / 100; lr 1 `gain` more in every seed (a difference told from seed noise), except
    in the frameworks of `noisy`, where the gains are -0.05, 0, +0.05 + gain (within seed noise)."""
    rows = []
    for framework in FOUR:
        for activation in activations:
            for seed in seeds:
                base = 0.80 + seed / 100
                step = (-0.05, 0.0, 0.05)[seed] + gain if framework in noisy else gain
                rows.append(dict(framework=framework, lr=0.1, activation=activation, seed=seed, best_test_acc=base))
                rows.append(
                    dict(framework=framework, lr=1.0, activation=activation, seed=seed, best_test_acc=base + step)
                )
    return runs_frame(rows)


def summarised(runs, s):
    _, frames = answers.analyse(runs, s)
    return summary.summarise(runs, s, frames)


def test_frameworks_and_strata_that_agree_are_said_once(tmp_path):
    """Every framework and both activations: +0.05 in each of three seeds, higher beyond seed noise; one sentence,
    the two strata's figures apart; the table a row per arm and activation, a column per framework."""
    s = study(tmp_path)
    got = summarised(compare_runs(0.05), s)
    assert got.sentences == [
        "lr 1 against lr 0.1, in all four frameworks: best test accuracy higher beyond seed noise (ReLU: 0.8600 "
        "against 0.8100; activation sigmoid: 0.8600 against 0.8100)."
    ]
    assert list(got.table.columns) == [
        "activation",
        "arm",
        "PyTorch",
        "MXNet Gluon",
        "TensorFlow/Keras",
        "JAX/Flax",
        "verdict",
    ]
    assert got.table.arm.tolist() == ["lr 0.1", "lr 1", "lr 0.1", "lr 1"]  # the baseline first in each stratum
    assert got.table.activation.tolist() == ["ReLU", "ReLU", "sigmoid", "sigmoid"]
    assert got.table.verdict.tolist() == ["baseline", "higher in 4 of 4", "baseline", "higher in 4 of 4"]
    # 0.81 +- t(0.975, 2) * 0.01 / sqrt(3) = 0.81 +- 0.0248
    assert got.table.PyTorch.tolist()[0] == "0.8100 [0.7852, 0.8348]"


def test_a_framework_that_differs_is_named(tmp_path):
    """MXNet's gains are -0.04, +0.01, +0.06 (mean +0.01): within seed noise there, higher in the other three."""
    s = study(tmp_path)
    got = summarised(compare_runs(0.01, noisy=("mxnet",), activations=("relu",)), s)
    assert got.sentences == [
        "lr 1 against lr 0.1: best test accuracy higher beyond seed noise in 3 of 4 frameworks (0.8200 against "
        "0.8100), within seed noise in MXNet Gluon (0.8200 against 0.8100)."
    ]
    assert got.table.verdict.tolist() == ["baseline", "higher in 3 of 4; within noise: MXNet Gluon"]


def test_strata_that_differ_are_said_apart(tmp_path):
    """Higher beyond seed noise with ReLU, within seed noise with sigmoid (every framework noisy there)."""
    s = study(tmp_path)
    relu = compare_runs(0.05, activations=("relu",))
    sigmoid = compare_runs(0.0, noisy=FOUR, activations=("sigmoid",))
    got = summarised(pd.concat([relu, sigmoid], ignore_index=True), s)
    assert got.sentences == [
        "lr 1 against lr 0.1 (ReLU), in all four frameworks: best test accuracy higher beyond seed noise (0.8600 "
        "against 0.8100).",
        "lr 1 against lr 0.1 (activation sigmoid), in all four frameworks: best test accuracy within seed noise "
        "(0.8100 against 0.8100).",
    ]


def test_an_arm_is_one_sentence_with_a_clause_per_metric(tmp_path):
    """Two metrics (answer.also): one sentence for the arm, a clause each, 'in all four frameworks' said once where
    every clause holds in every framework, and in each clause where one does not (MXNet within seed noise on the
    loss)."""
    s = study(tmp_path, STUDY.replace("baseline = 0.1", 'baseline = 0.1\nalso = ["final_train_loss"]'))
    runs = compare_runs(0.05, activations=("relu",))
    runs["final_train_loss"] = 1.0 - runs.best_test_acc
    got = summarised(runs, s)
    assert got.sentences == [
        "lr 1 against lr 0.1, in all four frameworks: best test accuracy higher beyond seed noise (0.8600 against "
        "0.8100); final training loss lower beyond seed noise (0.14 against 0.19)."
    ]
    mxnet = (runs.framework == "mxnet") & (runs.lr == 1.0)
    runs.loc[mxnet, "final_train_loss"] = runs.loc[mxnet, "final_train_loss"] + [0.05, -0.1, 0.1]
    got = summarised(runs, s)
    assert got.sentences == [
        "lr 1 against lr 0.1: best test accuracy higher beyond seed noise in all four frameworks (0.8600 against "
        "0.8100); final training loss lower beyond seed noise in 3 of 4 frameworks (0.14 against 0.19), within "
        "seed noise in MXNet Gluon (0.1567 against 0.19)."
    ]


def test_one_seed_and_no_complete_run(tmp_path):
    s = study(tmp_path)
    got = summarised(compare_runs(0.05, seeds=(0,), activations=("relu",)), s)
    assert got.sentences == [
        "lr 1 against lr 0.1, in all four frameworks: best test accuracy not told apart (one seed) (0.8500 against "
        "0.8000).",
        "Every cell rests on one seed: no difference can be told from seed noise.",
    ]
    assert got.table.PyTorch.tolist() == ["0.8000", "0.8500"]  # no interval from one seed
    failed = compare_runs(0.05, activations=("relu",)).assign(status="crashed")
    got = summarised(failed, s)
    assert got.sentences == ["No run completed: nothing to answer yet."] and got.table.empty


def test_a_framework_without_complete_runs_is_said(tmp_path):
    s = study(tmp_path)
    runs = compare_runs(0.05, activations=("relu",))
    runs.loc[runs.framework == "jax", "status"] = "failed"
    assert summarised(runs, s).sentences == [
        "lr 1 against lr 0.1: best test accuracy higher beyond seed noise in 3 of 4 frameworks (0.8600 against "
        "0.8100); no complete runs to compare in JAX/Flax."
    ]


STABLE = """\
question = "How large can the learning rate go?"
frameworks = ["torch", "mxnet", "tensorflow", "jax"]
variants = ["scratch", "none"]
seeds = [0, 1]

[grid]
lr = [0.1, 1.0, 10.0]

[failure]
min_best_test_acc = 0.5

[answer]
kind = "largest-stable"
x = "lr"
names = { "variant=scratch" = "BN", "variant=none" = "no BN" }
"""


def test_largest_stable_and_what_bn_does_to_it(tmp_path):
    """BN stable to lr 10 in every framework but TensorFlow (1); no BN to 0.1 everywhere."""
    s = study(tmp_path, STABLE)
    rows = []
    for framework in FOUR:
        for variant, limit in (("scratch", 1.0 if framework == "tensorflow" else 10.0), ("none", 0.1)):
            for lr in (0.1, 1.0, 10.0):
                for seed in (0, 1):
                    acc = 0.8 if lr <= limit else 0.1
                    rows.append(dict(framework=framework, variant=variant, lr=lr, seed=seed, best_test_acc=acc))
    got = summarised(runs_frame(rows), s)
    assert got.sentences == [
        "The largest stable lr: BN: 10 in 3 of 4 frameworks; 1 in TensorFlow/Keras; no BN: 0.1 in all four frameworks.",
        "BN against no BN: the largest stable lr went from 0.1 to 10 (100x) in 3 of 4 frameworks; from 0.1 to 1 "
        "(10x) in TensorFlow/Keras.",
    ]
    assert got.table.to_dict("records") == [
        {"variant": "BN", "PyTorch": "10", "MXNet Gluon": "10", "TensorFlow/Keras": "1", "JAX/Flax": "10"},
        {"variant": "no BN", "PyTorch": "0.1", "MXNet Gluon": "0.1", "TensorFlow/Keras": "0.1", "JAX/Flax": "0.1"},
    ]


TREND = """\
question = "Does the disagreement fall with the batch?"
frameworks = ["torch", "mxnet", "tensorflow", "jax"]
variants = ["scratch"]
seeds = [0, 1]

[grid]
batch_size = [16, 64, 256]

[answer]
kind = "trend"
x = "batch_size"
metric = "final_probe_disagreement"
"""


def trend_runs(spread=None):
    """Disagreement 0.3, 0.2, 0.1 at batch 16, 64, 256 in three frameworks; JAX's 0.3, 0.1, 0.2 is not monotone;
    seed 1 above seed 0 by 0.01, or in the frameworks of `spread` by their value."""
    rows = []
    for framework in FOUR:
        values = (0.3, 0.1, 0.2) if framework == "jax" else (0.3, 0.2, 0.1)
        step = (spread or {}).get(framework, 0.01)
        for batch, value in zip((16, 64, 256), values):
            for seed in (0, 1):
                rows.append(
                    dict(framework=framework, batch_size=batch, seed=seed, final_probe_disagreement=value + seed * step)
                )
    return runs_frame(rows)


def test_a_trend_said_once_where_the_frameworks_agree(tmp_path):
    """The shapes said once for the frameworks that share one; the extremes' intervals (two seeds 0.01 apart) do
    not overlap anywhere, so the trend is beyond seed noise."""
    s = study(tmp_path, TREND)
    got = summarised(trend_runs(), s)
    assert got.sentences == [
        "train/eval prediction disagreement falls as batch_size grows in 3 of 4 frameworks, from 0.3050 at "
        "batch_size 16 to 0.1050 at 256; is not monotone in batch_size in JAX/Flax, from 0.3050 at batch_size 16 "
        "to 0.2050 at 256. The lowest and highest cells' 95% intervals do not overlap in all four frameworks: the "
        "trend is beyond seed noise."
    ]
    assert got.table.batch_size.tolist() == ["16", "64", "256"]


def test_a_trend_whose_extremes_overlap_is_not_told_apart_from_seed_noise(tmp_path):
    """PyTorch's seeds 0.3 apart: its lowest and highest cells' intervals overlap, so its fall is said to be
    within seed noise there (a trend in the means alone is not an answer)."""
    s = study(tmp_path, TREND)
    got = summarised(trend_runs({"torch": 0.3}), s)
    assert got.sentences[0].endswith(
        "The lowest and highest cells' 95% intervals do not overlap in 3 of 4 frameworks (the trend is beyond seed "
        "noise there) and overlap in PyTorch."
    ), got.sentences[0]
    got = summarised(trend_runs(dict.fromkeys(FOUR, 0.3)), s)
    assert got.sentences[0].endswith(
        "The lowest and highest cells' 95% intervals overlap in all four frameworks: the trend is not told apart "
        "from seed noise."
    ), got.sentences[0]


def test_the_appendix_keeps_every_strata_sentence(tmp_path):
    """The summary says the eight comparisons (four frameworks x two activations) in one sentence; the appendix
    (answers.analyse) keeps one sentence for each."""
    s = study(tmp_path)
    runs = compare_runs(0.05)
    appendix, frames = answers.analyse(runs, s)
    assert len(frames["comparisons"]) == 8
    pairs = [line for line in appendix if " vs " in line]
    assert len(pairs) == 8 and len({p.split(":")[0] for p in pairs}) == 8
    assert len(summary.summarise(runs, s, frames).sentences) == 1


def test_cells_at_chance_in_the_same_frameworks_are_one_sentence(tmp_path):
    """Two cells (lr 0.1 in both activations) whose final training loss stays near ln 10 in every framework: one
    sentence naming both with their losses; a cell stuck in one framework only, a sentence of its own."""
    s = study(tmp_path)
    runs = compare_runs(0.05)
    runs["final_train_loss"] = 0.5
    runs.loc[runs.lr == 0.1, "final_train_loss"] = 2.30
    runs.loc[(runs.lr == 1.0) & (runs.activation == "relu") & (runs.framework == "jax"), "final_train_loss"] = 2.25
    got = [x for x in summarised(runs, s).sentences if "At chance" in x]
    assert got == [
        "At chance in all four frameworks, mean final training loss near ln 10 = 2.303 (a uniform guess's): lr 0.1, "
        "ReLU (2.3); and lr 0.1, activation sigmoid (2.3). They have not learned in this budget (not yet started, "
        "or thrown back to chance), so what is measured of them describes networks that are not learning.",
        "At chance in JAX/Flax, mean final training loss near ln 10 = 2.303 (a uniform guess's): lr 1, ReLU (2.25). "
        "It has not learned in this budget (not yet started, or thrown back to chance), so what is measured of it "
        "describes a network that is not learning.",
    ]


def test_a_finite_loss_above_chance_is_thrown_off_not_on_the_plateau(tmp_path):
    """lr 1 with ReLU ends at a training loss of 40 in every framework: finite, far above ln 10. That is a network
    its steps threw off, said apart from the plateau (a loss near ln 10, not yet learning)."""
    s = study(tmp_path)
    runs = compare_runs(0.05)
    runs["final_train_loss"] = 0.5
    runs.loc[(runs.lr == 1.0) & (runs.activation == "relu"), "final_train_loss"] = 40.0
    got = [x for x in summarised(runs, s).sentences if "At chance" in x or "Thrown" in x]
    assert got == [
        "Thrown off in all four frameworks, mean final training loss above a uniform guess's (ln 10 = 2.303) though "
        "finite: lr 1, ReLU (40). Its steps were too large to learn, not yet large enough to diverge."
    ]


MANY = STUDY.replace("lr = [0.1, 1.0]", "lr = [0.1, 0.3, 1.0, 3.0]").replace(
    'activation = ["relu", "sigmoid"]', 'activation = ["relu"]'
)


def test_arms_that_came_out_alike_are_one_sentence_with_each_arms_figures(tmp_path):
    """lr 0.3 and lr 1 each 0.05 above lr 0.1 in every seed and framework, lr 3 within seed noise: the two alike
    arms in one sentence (each with its figure, the baseline's last), lr 3 in its own."""
    s = study(tmp_path, MANY)
    rows = []
    for framework in FOUR:
        for seed in (0, 1, 2):
            base = 0.80 + seed / 100
            for lr, gain in ((0.1, 0.0), (0.3, 0.05), (1.0, 0.05), (3.0, (-0.05, 0.0, 0.05)[seed])):
                rows.append(dict(framework=framework, lr=lr, activation="relu", seed=seed, best_test_acc=base + gain))
    got = summarised(runs_frame(rows), s)
    assert got.sentences == [
        "lr=0.3 and lr 1 against lr 0.1, in all four frameworks: best test accuracy higher beyond seed noise "
        "(lr=0.3 0.8600; lr 1 0.8600; lr 0.1 0.8100).",
        "lr=3 against lr 0.1, in all four frameworks: best test accuracy within seed noise (0.8100 against 0.8100).",
    ]
