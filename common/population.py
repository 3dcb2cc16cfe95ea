"""Population statistics of the BN layers: the textbook's standard practice for eval mode.

Spec. With every weight fixed and the network in train mode (each BN layer
normalising with its own batch statistics, nothing updated), N training images
go through in batches of the run's batch size (the last partial batch
dropped), all BN layers in one pass. Per layer and channel:

    mean = average of the batch means
    var  = the exact biased variance over every value those batches held
         = average(batch var + batch mean^2) - mean^2

(not the average of the batch variances, which leaves out how the batch means
spread). The N images are the first N of a permutation seeded by the run's
seed, the same in every framework and every epoch.

`combine` computes the variance as average(batch var) + average((batch mean -
mean)^2): the same number in exact arithmetic (every batch holds the same count
of values per channel, the law of total variance), without the cancellation of
E[x^2] - E[x]^2 when |mean| >> std.

Evaluating with them beside the running average (EMA) splits the train/eval
gap: running vs population is the EMA's lag, a batch's statistics vs population
is batch noise (`lag_and_noise`). `measure` is an epoch's whole pass: the
statistics, eval mode with them (`figures`, which restores the EMA unless
--recalibrate keeps them), and the snapshot's arrays. `divergence` measures a
probe's train/eval gap in the same units (`gap`). Nothing here changes a
backend's state except where --recalibrate asks it to.
"""

from __future__ import annotations

import numpy as np

from .config import RunConfig
from .errors import DataError
from .interface import Backend, ProbeResult

# the probe's per-layer departure of a research transform's output from its aim (common.reference.output_departure)
DEPARTURES = ("whiteness", "ks_uniform")
STREAM = 2  # the permutation's stream: RandomState([seed, 0, STREAM]) (batch_order uses [seed, epoch, 1])


def population_batches(seed: int, num_train: int, size: int, batch_size: int) -> np.ndarray:
    """(batches, batch_size) training-set indices: the first min(size, num_train) of a seeded
    permutation, in batches of batch_size, the last partial batch dropped."""
    steps = min(size, num_train) // batch_size
    if steps < 1:
        raise DataError(
            f"population statistics need at least one batch: {min(size, num_train)} image(s) for "
            f"batch size {batch_size}; raise --population-size (or --train-limit), or pass 0 to "
            f"turn them off"
        )
    order = np.random.RandomState([seed, 0, STREAM]).permutation(num_train)
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int64)


def combine(per_batch: list) -> dict:
    """{BN name: (mean, biased variance)} of the population, in float64, from each batch's
    {BN name: (batch mean, biased batch variance)} (equal batch sizes)."""
    if not per_batch:
        raise ValueError("no batch statistics to combine")
    out = {}
    for name in per_batch[0]:
        means = np.stack([np.asarray(b[name][0], np.float64) for b in per_batch])
        variances = np.stack([np.asarray(b[name][1], np.float64) for b in per_batch])
        mean = means.mean(axis=0)
        out[name] = (mean, variances.mean(axis=0) + ((means - mean) ** 2).mean(axis=0))
    return out


def gap(mean, var, ref_mean, ref_var, epsilon: float) -> tuple:
    """(mean_gap, var_log_ratio) of statistics against reference ones, averaged over features:
    |mean - ref mean| in reference standard deviations, and |log((var + eps) / (ref var + eps))|."""
    ref_var = np.asarray(ref_var, np.float64)
    scale = np.sqrt(ref_var + epsilon)
    mean_gap = np.mean(np.abs(np.asarray(mean, np.float64) - np.asarray(ref_mean, np.float64)) / scale)
    var_log_ratio = np.mean(np.abs(np.log((np.asarray(var, np.float64) + epsilon) / (ref_var + epsilon))))
    return float(mean_gap), float(var_log_ratio)


def lag_and_noise(probe_bn: dict, stats: dict, epsilon: float) -> list:
    """Per BN layer, in probe_bn's order: the EMA's lag, gap(running, population), and the batch noise,
    gap(the probe batch's statistics, population), both measured against the population statistics `stats`
    ({BN name: (mean, var)}), as lag_* and noise_* mean_gap / var_log_ratio. probe_bn: ProbeResult.norms."""
    out = []
    for name, s in probe_bn.items():
        pop_mean, pop_var = stats[name]
        lag = gap(s["running_mean"], s["running_var"], pop_mean, pop_var, epsilon)
        noise = gap(s["batch_mean"], s["batch_var"], pop_mean, pop_var, epsilon)
        out.append(
            {
                "lag_mean_gap": lag[0],
                "lag_var_log_ratio": lag[1],
                "noise_mean_gap": noise[0],
                "noise_var_log_ratio": noise[1],
            }
        )
    return out


def statistics(backend, images: np.ndarray, batches: np.ndarray) -> dict:
    """The population statistics of backend's BN layers over images[batches[i]] (see the spec above)."""
    return combine(batch_statistics(backend, images, batches))


def batch_statistics(backend, images: np.ndarray, batches: np.ndarray) -> list:
    """Each batch's {BN name: (mean, var)} of images[batches[i]], in the pass's order."""
    return backend.batch_statistics([images[index] for index in batches])


def sigma_average_gap(per_batch: list, decay: float, epsilon: float) -> dict:
    """Batch renormalisation's running scale two ways, over the same batches in order (each average started at
    the first batch's value): the suite's spec, sqrt(average of var_B + eps) (BN's running variance), against Ioffe
    2017's Algorithm 1, the average of sigma_B = sqrt(var_B + eps). {BN name: mean over channels of |the first /
    the second - 1|}: how far eval mode's scale parts between the two (Jensen: the first is the larger)."""
    out = {}
    for name in per_batch[0]:
        variances = [np.asarray(b[name][1], np.float64) + epsilon for b in per_batch]
        var_average, sigma_average = variances[0], np.sqrt(variances[0])
        for var in variances[1:]:
            var_average = decay * var_average + (1 - decay) * var
            sigma_average = decay * sigma_average + (1 - decay) * np.sqrt(var)
        out[name] = float(np.mean(np.abs(np.sqrt(var_average) / sigma_average - 1)))
    return out


def with_running(params: dict, population: dict) -> dict:
    """Canonical parameters with every BN layer's running statistics replaced by the population's."""
    out = dict(params)
    for name, (mean, var) in population.items():
        dtype = np.asarray(params[f"{name}.running_mean"]).dtype
        out[f"{name}.running_mean"] = np.asarray(mean, dtype)
        out[f"{name}.running_var"] = np.asarray(var, dtype)
    return out


def divergence(probe: ProbeResult, labels: np.ndarray, epsilon: float) -> dict:
    """Train/eval-mode divergence on the probe set, from one ProbeResult."""
    pred_eval = probe.logits_eval.argmax(axis=1)
    pred_train = probe.logits_train.argmax(axis=1)
    gaps = []
    for layer, s in probe.norms.items():
        # |batch mean - running mean| in units of the running std, and |log((batch var + eps) / (running
        # var + eps))|, each averaged over features
        mean_gap, var_log_ratio = gap(s["batch_mean"], s["batch_var"], s["running_mean"], s["running_var"], epsilon)
        departure = {key: s[key] for key in DEPARTURES if key in s}  # the research transforms' (whiten, the PITs)
        gaps.append({"layer": layer, "mean_gap": mean_gap, "var_log_ratio": var_log_ratio, **departure})
    layers = {key: [g[key] for g in gaps if key in g] for key in DEPARTURES}
    return {
        **{key: float(np.mean(values)) for key, values in layers.items() if values},  # mean over the layers
        "probe_acc_eval": float(np.mean(pred_eval == labels)),
        "probe_acc_train": float(np.mean(pred_train == labels)),
        "probe_logit_mad": float(
            np.mean(np.abs(probe.logits_train.astype(np.float64) - probe.logits_eval.astype(np.float64)))
        ),
        "probe_disagreement": float(np.mean(pred_eval != pred_train)),
        "bn_gap": gaps,
    }


def figures(
    backend: Backend,
    stats: dict,
    ema_probe: ProbeResult,
    test,
    ntest: int,
    probe_images: np.ndarray,
    probe_labels: np.ndarray,
    config: RunConfig,
    epsilon: float,
    keep: bool,
) -> dict:
    """Eval mode with the population statistics `stats` ({BN name: (mean, var)}) in place of the running
    averages (EMA): test loss and accuracy and the probe's figures (pop_* fields), and per BN layer the
    EMA's lag (running vs population) and batch noise (the probe's batch statistics vs population), in
    the units of mean_gap / var_log_ratio. ema_probe: the epoch's probe with the EMA. The EMA is put
    back unless `keep` (--recalibrate, final epoch)."""
    saved = backend.get_params()
    backend.set_params(with_running(saved, stats))
    try:
        loss, correct = backend.evaluate(test, config.eval_batch_size)
        # train mode's logits are the epoch's probe's: the population statistics change eval mode only (renorm's
        # train mode reads running statistics too, and the model trains with the running averages)
        logits_eval = backend.predict(probe_images)
        train_logits = ema_probe.logits_train
        probe = divergence(
            ProbeResult(logits_eval=logits_eval, logits_train=train_logits, norms={}), probe_labels, epsilon
        )
    finally:
        if not keep:
            backend.set_params(saved)
    return {
        "pop_test_loss": loss / ntest,
        "pop_test_acc": correct / ntest,
        **{f"pop_{k}": probe[k] for k in ("probe_acc_eval", "probe_logit_mad", "probe_disagreement")},
        "lag_noise": lag_and_noise(ema_probe.norms, stats, epsilon),
    }


def measure(
    backend,
    train_images: np.ndarray,
    batches: np.ndarray,
    ema_probe,
    test,
    ntest: int,
    probe_images: np.ndarray,
    probe_labels: np.ndarray,
    config,
    epsilon: float,
    *,
    keep: bool,
    clock,
) -> tuple:
    """An epoch's population pass, timed on its own: the statistics over images[batches], then figures().
    Returns (the epoch record's fields, the per-layer lag and noise, the snapshot's population/* arrays)."""
    start = clock()
    per_batch = batch_statistics(backend, train_images, batches)
    stats = combine(per_batch)
    fields = figures(backend, stats, ema_probe, test, ntest, probe_images, probe_labels, config, epsilon, keep)
    lag_noise = fields.pop("lag_noise")
    if config.model.norm == "renorm":  # the running sigma of Ioffe's Algorithm 1 against the spec's variance
        decay, _ = backend.effective_norm()
        gaps = sigma_average_gap(per_batch, decay, epsilon)
        lag_noise = [{**row, "sigma_average_gap": gaps[name]} for row, name in zip(lag_noise, ema_probe.norms)]
    fields.update(population_images=int(batches.size), population_seconds=clock() - start, recalibrated=keep)
    arrays = {}
    for name, (mean, var) in stats.items():
        arrays[f"population/{name}.running_mean"], arrays[f"population/{name}.running_var"] = mean, var
    return fields, lag_noise, arrays
