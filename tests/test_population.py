"""Population statistics (common.population): the spec in float64 numpy, then each framework against it
(--framework / tox -e NAME), then that computing them changes nothing else in a run."""

import numpy as np
import pytest

from common import population
from common.config import ModelSpec, RunConfig
from common.data import load_fashion_mnist
from common.errors import ConfigError, DataError
from common.interface import ProbeResult
from common.reference import lenet_forward
from tests.conventions import EVAL_DRAWS_DROPOUT
from tests.helpers import epochs_of, make_idx_dir, random_bn_params, tiny_config
from tests.made import population_records


# The spec, framework-free ---------------------------------------------------------------------------
def test_combine_is_the_exact_variance_over_every_value():
    """Equal batches of one channel's values, far from zero (mean 1000, std 1, where E[x^2] - E[x]^2 loses
    the variance): combine gives the mean and the biased variance of all the values together, not the
    average of the batch variances."""
    rng = np.random.RandomState(0)
    batches = [rng.normal(1000 + 3 * b, 1.0, size=(32, 3)) for b in range(6)]  # batch means spread by 3
    per_batch = [{"bn1": (x.mean(axis=0), x.var(axis=0))} for x in batches]
    mean, var = population.combine(per_batch)["bn1"]
    every = np.concatenate(batches)
    np.testing.assert_allclose(mean, every.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, every.var(axis=0), rtol=1e-11)
    # the average of the batch variances leaves out the spread of the batch means (about 3^2 x 35/12 here)
    assert np.all(var - np.mean([v for _, v in (b["bn1"] for b in per_batch)], axis=0) > 20)
    # the spec's own formula, average(var + mean^2) - mean^2, is the same number (in float64, at this
    # offset, to about 1e-10 of the value: the cancellation the stable form avoids)
    means, variances = np.stack([b["bn1"][0] for b in per_batch]), np.stack([b["bn1"][1] for b in per_batch])
    spec_var = (variances + means**2).mean(axis=0) - means.mean(axis=0) ** 2
    np.testing.assert_allclose(var, spec_var, rtol=1e-6)


def test_population_batches_are_seeded_and_drop_the_partial_batch():
    a = population.population_batches(seed=3, num_train=1000, size=300, batch_size=64)
    assert a.shape == (4, 64) and len(np.unique(a)) == 256 and a.max() < 1000
    np.testing.assert_array_equal(a, population.population_batches(3, 1000, 300, 64))  # every framework
    assert not np.array_equal(a, population.population_batches(4, 1000, 300, 64))
    # the first N of the permutation: a larger N starts with the same images
    np.testing.assert_array_equal(population.population_batches(3, 1000, 640, 64).ravel()[:256], a.ravel())
    assert population.population_batches(3, 200, 5000, 64).shape == (3, 64)  # no more than the split holds
    with pytest.raises(DataError, match="at least one batch: 40 image"):
        population.population_batches(3, 40, 5000, 64)


class FixedBackend:
    """What population.figures asks of a backend, with fixed answers: eval mode's logits and test figures, and
    the parameters it was given."""

    def __init__(self, logits_eval, test_loss, test_correct):
        self.logits_eval, self.test = logits_eval, (test_loss, test_correct)
        self.params = {"bn1.running_mean": np.zeros(2), "bn1.running_var": np.ones(2)}

    def get_params(self):
        return dict(self.params)

    def set_params(self, params):
        self.params = dict(params)

    def evaluate(self, test, batch_size):
        return self.test

    def predict(self, images):
        return self.logits_eval


def test_population_figures_set_eval_mode_with_population_statistics_against_the_probes_train_mode():
    """Four probe images, by hand. Train mode's logits are the epoch's probe's (the population statistics change
    eval mode only); eval mode's come from the backend with the population statistics in place. Predictions: train
    0, 1, 1, 0; population eval 0, 1, 0, 0; labels 0, 1, 0, 1: population eval accuracy 3/4, disagreement 1/4, and
    |logit differences| 0, 0, 2, 0 and 0, 0, 2, 0 per class -> mean 0.5. The EMA's eval logits (predictions 1, 1,
    1, 1) enter none of these."""
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    ema_eval = np.array([[0.0, 1.0]] * 4)
    pop_eval = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [1.0, 0.0]])
    backend = FixedBackend(pop_eval, test_loss=30.0, test_correct=7)
    stats = {"bn1": (np.array([1.0, 2.0]), np.array([4.0, 9.0]))}
    ema_probe = ProbeResult(
        logits_eval=ema_eval,
        logits_train=train,
        norms={
            "bn1": {
                "running_mean": np.zeros(2),
                "running_var": np.ones(2),
                "batch_mean": np.ones(2),
                "batch_var": np.ones(2),
            }
        },
    )
    got = population.figures(
        backend, stats, ema_probe, None, 10, np.zeros((4, 1)), np.array([0, 1, 0, 1]), RunConfig(), 0.0, keep=False
    )
    assert got["pop_test_loss"] == 3.0 and got["pop_test_acc"] == 0.7
    assert got["pop_probe_acc_eval"] == 0.75
    assert got["pop_probe_disagreement"] == 0.25, "train mode's predictions: the probe's, not eval mode's"
    assert got["pop_probe_logit_mad"] == 0.5
    assert backend.params["bn1.running_var"].tolist() == [1.0, 1.0]  # the EMA put back (keep=False)


def test_population_options_are_checked_before_anything_runs():
    assert RunConfig().population_size == 2048 and not RunConfig().recalibrate
    with pytest.raises(
        ConfigError,
        match=r"population_size \(--population-size\) must be 0 \(off\) or at least "
        r"one batch \(256 images\), got 100",
    ):
        RunConfig(population_size=100)
    with pytest.raises(ConfigError, match="recalibrate .* needs population statistics"):
        RunConfig(population_size=0, recalibrate=True)
    RunConfig(population_size=0)  # off


# Each framework against the spec ---------------------------------------------------------------------
def reference_population(params, spec, images, batches):
    """The spec in float64: each batch through the reference BN-LeNet in train mode, then the mean of the
    batch means and average(batch var + batch mean^2) - mean^2."""
    stats = [lenet_forward(params, spec, images[index], training=True)[1] for index in batches]
    out = {}
    for name in stats[0]:
        means = np.stack([s[name]["batch_mean"] for s in stats])
        variances = np.stack([s[name]["batch_var"] for s in stats])
        mean = means.mean(axis=0)
        out[name] = (mean, (variances + means**2).mean(axis=0) - mean**2, variances.mean(axis=0))
    return out


@pytest.mark.parametrize("variant, norm", [("scratch", "batch"), ("builtin", "batch"), ("scratch", "renorm")])
def test_population_statistics_follow_the_spec(fw, framework, variant, norm):
    """Renorm's train-mode forward reads the running statistics: each batch must see them as they were."""
    spec = ModelSpec(variant=variant, norm=norm)
    params = random_bn_params(spec)
    backend = fw.BACKEND(RunConfig(model=spec, dtype="float64", device="cpu", batch_size=32))
    backend.set_params(params)
    rng = np.random.RandomState(7)  # images of unequal brightness, so that batch means spread
    images = rng.uniform(size=(300, 1, 28, 28)) * rng.uniform(0.1, 1.0, size=(300, 1, 1, 1))
    batches = population.population_batches(0, 300, 300, 32)  # 9 batches of 32; 12 images left out
    got = population.statistics(backend, images, batches)
    want = reference_population(params, spec, images, batches)
    assert sorted(got) == sorted(want) == ["bn1", "bn2", "bn3", "bn4"]
    for name, (mean, var, mean_of_batch_vars) in want.items():
        np.testing.assert_allclose(
            got[name][0], mean, rtol=1e-9, atol=1e-12, err_msg=f"{framework} {variant} {name} population mean"
        )
        np.testing.assert_allclose(got[name][1], var, rtol=1e-9, err_msg=f"{framework} {variant} {name} population var")
        # far beyond the tolerance: the average of the batch variances would fail this test
        assert np.max(np.abs(var - mean_of_batch_vars) / var) > 1e-6, f"{name}: the exact variance must be told apart"
    for name, value in backend.get_params().items():  # nothing changed
        np.testing.assert_array_equal(value, params[name], err_msg=f"{framework}: {name} changed")


def test_evaluating_with_population_statistics_changes_no_state(fw, framework):
    spec = ModelSpec()
    params = random_bn_params(spec)
    config = RunConfig(model=spec, dtype="float64", device="cpu", batch_size=16, eval_batch_size=20)
    backend = fw.BACKEND(config)
    backend.set_params(params)
    rng = np.random.RandomState(1)
    images, labels = rng.uniform(size=(64, 1, 28, 28)), rng.randint(0, 10, 64)
    stats = population.statistics(backend, images, population.population_batches(0, 64, 64, 16))
    probe = backend.probe(images[:20])
    figures = population.figures(
        backend,
        stats,
        probe,
        backend.put(images[20:], labels[20:]),
        44,
        images[:20],
        labels[:20],
        config,
        spec.epsilon,
        keep=False,
    )
    for name, value in backend.get_params().items():
        np.testing.assert_array_equal(value, params[name], err_msg=f"{framework}: {name} changed")
    # the figures are eval mode with the population statistics loaded, as the reference computes it
    logits, _ = lenet_forward(population.with_running(params, stats), spec, images[20:], training=False)
    assert figures["pop_test_acc"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels[20:]), abs=1e-12)
    assert len(figures["lag_noise"]) == 4 and figures["lag_noise"][0]["lag_mean_gap"] > 0


@pytest.fixture
def tiny(tmp_path):
    make_idx_dir(tmp_path, 192, 48)
    return load_fashion_mnist(tmp_path, verify=False, dtype="float64")


def _run(fw, dataset, dropout=0.3, **kw):
    return epochs_of(fw.BACKEND, tiny_config(model=ModelSpec(dropout=dropout), eval_batch_size=48, **kw), dataset)


TRAINING = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "step_losses",
    "probe_acc_eval",
    "probe_acc_train",
    "probe_logit_mad",
    "probe_disagreement",
)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_rest_of_the_run_is_unchanged_by_population_statistics(fw, framework, tiny, dropout):
    """float64, with and without dropout (a random stream): the same run with population statistics off
    and on gives bit-identical training, EMA evaluation, probes and parameters, epoch after epoch; on, it
    has the population figures and their own time. Except where an eval-mode forward draws dropout masks
    (tests/conventions.py EVAL_DRAWS_DROPOUT: MXNet), whose later masks, and so its second epoch, differ."""
    off, on = _run(fw, tiny, dropout, population_size=0), _run(fw, tiny, dropout, population_size=96)
    identical = dropout == 0 or not EVAL_DRAWS_DROPOUT[framework]
    assert (off[1][0]["train_loss"] == on[1][0]["train_loss"]) is identical, (
        f"{framework}: dropout {dropout}, epoch 2 expected {'the same' if identical else 'to differ'}"
    )
    for (a, arrays_a), (b, arrays_b) in zip(off, on) if identical else []:
        for key in TRAINING:
            assert a[key] == b[key], f"{framework} epoch {a['epoch']}: {key} changed by population statistics"
        assert [g["mean_gap"] for g in a["bn_gap"]] == [g["mean_gap"] for g in b["bn_gap"]]
        for name, value in arrays_a.items():
            np.testing.assert_array_equal(arrays_b[name], value, err_msg=f"{framework} {name}")
    for (a, _), (b, _) in zip(off, on):
        assert a.get("pop_test_acc") is None and b["population_images"] == 96 and b["population_seconds"] > 0
        assert 0 <= b["pop_test_acc"] <= 1 and "noise_mean_gap" in b["bn_gap"][0]


def test_a_seed_repeats_whatever_ran_before_it(fw, framework, tiny):
    """Two runs of one configuration in one process (a worker runs its runs in turn): the same dropout
    masks and so the same result, bit for bit. Keras 3 once took its dropout seeds from what ran before."""
    first, again = _run(fw, tiny, population_size=0), _run(fw, tiny, population_size=0)
    for (a, _), (b, _) in zip(first, again):
        for key in TRAINING:
            assert a[key] == b[key], f"{framework} epoch {a['epoch']}: {key} differs in a second run"


def test_recalibrate_keeps_the_population_statistics_in_the_final_snapshot(fw, framework, tiny):
    ema, recal = _run(fw, tiny, population_size=96), _run(fw, tiny, population_size=96, recalibrate=True)
    (_, ema_first), (_, recal_first) = ema[0], recal[0]
    for name in ema_first:  # before the final epoch: the running average, as without it
        np.testing.assert_array_equal(recal_first[name], ema_first[name], err_msg=f"{framework} epoch 1 {name}")
    (last_ema, ema_arrays), (last, arrays) = ema[-1], recal[-1]
    assert last["recalibrated"] is True and last_ema["recalibrated"] is False
    for name in ("bn1", "bn2", "bn3", "bn4"):
        for stat in ("running_mean", "running_var"):
            np.testing.assert_allclose(
                arrays[f"param/{name}.{stat}"],
                arrays[f"population/{name}.{stat}"],
                rtol=1e-15,
                err_msg=f"{framework} recalibrated {name}.{stat}",
            )
            assert not np.allclose(ema_arrays[f"param/{name}.{stat}"], arrays[f"param/{name}.{stat}"])
    assert last["pop_test_acc"] == last_ema["pop_test_acc"] and last["test_acc"] == last_ema["test_acc"]


def test_population_figures_reach_runs_summary_and_report(tmp_path):
    from compare.reporting import markdown, tables

    t = tables.tables(population_records(), tmp_path)
    runs = t["runs"].set_index(["variant", "seed"])
    assert runs.loc[("scratch", 0), "final_pop_gain"] == pytest.approx(0.04)
    assert runs.loc[("scratch", 1), "best_pop_test_acc"] == 0.9  # epoch 1's
    assert np.isnan(runs.loc[("none", 0), "final_pop_test_acc"])
    row = t["summary"].set_index("variant").loc["scratch"]
    # gains 0.04, 0.03: mean 0.035, sd 0.0070711, half-width t(0.975, 1) 12.706205 x 0.0070711 / sqrt(2) = 0.0635310
    assert row.final_pop_test_acc == pytest.approx(0.845) and row.final_pop_gain == pytest.approx(0.035)
    assert row.final_pop_gain_ci_low == pytest.approx(0.035 - 0.0635310, abs=1e-7)
    assert row.final_pop_probe_disagreement == pytest.approx(0.025) and row.population_seconds == 0.45
    assert markdown.population_answer(t["summary"]) == [
        "torch scratch: final test accuracy 0.8100 with the running average (EMA), 0.8450 with population "
        "statistics from 2,048 training images: the EMA costs 3.50 points (95% interval over 2 seeds -2.85 to "
        "+9.85, within seed noise). Train/eval prediction disagreement on the probe: 11.0% with the EMA, 2.5% "
        "with population statistics, so 23% of it remains (batch noise) and 77% was the EMA's lag."
    ]
    text = "\n".join(markdown.population_section(t))
    assert "| torch | scratch | bn1 | 0.65 | 0.05 | 0.01 | 0.02 |" in text  # lag 0.15 and 1.15, averaged
    assert "| torch | none |" not in text
    # a run without population statistics has no section
    assert (
        markdown.population_section(
            tables.tables([r for r in population_records() if r["variant"] == "none"], tmp_path)
        )
        == []
    )
