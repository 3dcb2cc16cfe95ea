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
is batch noise (`gaps`). Nothing here changes a backend's state; the loop
loads the statistics for its eval-mode figures and restores what was there.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError

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
    ({BN name: (mean, var)}), as lag_* and noise_* mean_gap / var_log_ratio. probe_bn: ProbeResult.bn."""
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
    return combine(backend.batch_statistics([images[index] for index in batches]))


def with_running(params: dict, population: dict) -> dict:
    """Canonical parameters with every BN layer's running statistics replaced by the population's."""
    out = dict(params)
    for name, (mean, var) in population.items():
        dtype = np.asarray(params[f"{name}.running_mean"]).dtype
        out[f"{name}.running_mean"] = np.asarray(mean, dtype)
        out[f"{name}.running_var"] = np.asarray(var, dtype)
    return out
