"""The one training and evaluation loop, shared by every framework.

It calls only Backend primitives. Per step it queues work and keeps the
on-device [loss_sum, correct]; the host waits for the device only at timing
boundaries (after the first step and the warm-up steps, both untimed, and at
the end of the epoch), as a bare framework loop would. The first step's own
time is reported apart (first_step_seconds): it holds a compiled mode's
compilation, which never reaches the throughput figure.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from . import norms, population, records, trace
from .config import RunConfig
from .data import Dataset, batch_order, probe_indices
from .errors import NonFiniteError
from .init import init_params
from .interface import Backend


def divergence_message(config: RunConfig, epoch: int, step: int, steps: int) -> str:
    """Where the loss stopped being finite, and what would apply to this variant."""
    spec = config.model
    where = (
        f"the training loss stopped being finite in epoch {epoch}, step {step} of {steps} "
        f"(variant {spec.variant}, lr {config.lr:g}, {spec.activation})"
    )
    if not spec.has_norm:
        return where + (
            "; lower --lr, or add BN (--variants scratch or builtin), "
            "which keeps the activations in range at larger learning rates"
        )
    hint = f"; lower --lr (this variant already has BN after {','.join(spec.norm_positions)}"
    if len(spec.norm_positions) < len(norms.BN_POSITIONS):
        hint += "; BN after more layers, --norm-positions, may also help"
    if spec.freeze_gamma_beta:
        hint += "; gamma and beta are frozen, so BN cannot rescale what it normalises"
    return where + hint + ")"


def subset(dataset: Dataset, config: RunConfig) -> Dataset:
    """Apply train_limit / test_limit (their first N examples)."""
    ntrain = config.train_limit or len(dataset.train_labels)
    ntest = config.test_limit or len(dataset.test_labels)
    return Dataset(
        dataset.train_images[:ntrain],
        dataset.train_labels[:ntrain],
        dataset.test_images[:ntest],
        dataset.test_labels[:ntest],
        dataset.source,
        dataset.verified,
    )


def check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteError(
            f"{name} contain {count} NaN or infinite value(s); "
            f"the input must be finite (check the data files or the transform)"
        )


def timed_epoch(backend: Backend, train, order, steps: int, warm: int, clock, on_step=None, trace=None) -> tuple:
    """The epoch's SGD steps: (per-step results, start, end of the warm-up, end, the first step's own time or
    None, {"warmup": s, "timed": s} spent in `trace`). The host waits for the device only at the boundaries:
    after the first step and at the end of the warm-up (both inside the untimed warm-up), and at the end of
    the epoch. trace: (steps to trace, callable(step)), run before those steps with the clock stopped (the
    device drained first), its time kept apart from both regions."""
    stats = []
    traced, measure = trace or ((), None)
    paused = {"warmup": 0.0, "timed": 0.0}
    backend.synchronize()
    start = clock()
    warm_end = start
    first_step = None
    for step in range(steps):
        if step == warm:
            backend.synchronize()
            warm_end = clock()
        if step in traced:
            backend.synchronize()
            began = clock()
            measure(step)
            paused["timed" if step >= warm else "warmup"] += clock() - began
        stats.append(backend.train_step(train, order, step))
        if step == 0 and warm > 0:  # inside the warm-up: its own figure (compilation, first-call setup)
            backend.synchronize()
            first_step = clock() - start - paused["warmup"]
        if on_step:
            on_step(step + 1)
    backend.synchronize()
    return stats, start, warm_end, clock(), first_step, paused


def train_epoch(
    backend: Backend, train, config: RunConfig, epoch: int, ntrain: int, clock, progress=None, tracer=None
) -> tuple:
    """One epoch's SGD steps, timed: ({the epoch record's training fields}, None), or, when the epoch diverged,
    (None, {the run_end record's fields saying where}). tracer: a common.trace.Tracer (--trace-every)."""
    batch = config.batch_size
    order = batch_order(config.seed, epoch, ntrain, batch)
    steps = len(order)
    warm = min(config.warmup_steps, steps - 1)
    on_step = progress and (lambda step: progress(epoch, step, steps))
    noise = norms.draw_noise(config.model, config.seed, epoch, steps, config.dtype, batch)  # {} without noise
    if noise:
        backend.put_noise(noise)
    trace = tracer and (tracer.due(epoch, steps), lambda step: tracer.measure(epoch, step, order, noise))
    stats, start, warm_end, end, first_step, paused = timed_epoch(
        backend, train, backend.put_order(order), steps, warm, clock, on_step, trace
    )
    loss_sum, correct = backend.reduce_stats(stats)
    if not np.isfinite(loss_sum):  # a result, not an error: the run ends here, diverged
        step = next(i for i, s in enumerate(stats) if not np.isfinite(backend.reduce_stats([s])[0])) + 1
        message = divergence_message(config, epoch, step, steps)
        return None, {"diverged_epoch": epoch, "diverged_step": step, "message": message}
    timed = steps - warm
    warm_seconds = warm_end - start - paused["warmup"]
    traced = tracer.take() if tracer else {}
    return {
        "train_loss": loss_sum / (steps * batch),
        "train_acc": correct / (steps * batch),
        "train_examples_per_s": timed * batch / (end - warm_end - paused["timed"]),
        "train_seconds": end - start - paused["warmup"] - paused["timed"],
        "timed_steps": timed,
        "warmup_examples_per_s": (warm * batch / warm_seconds) if warm else None,
        "warmup_seconds": warm_seconds,
        "warmup_steps": warm,
        "first_step_seconds": first_step,
        # per-step losses for step-by-step parity checks; read after the timed region
        "step_losses": [float(backend.reduce_stats([s])[0]) / batch for s in stats[: config.trace_steps]],
        **traced,
    }, None


def evaluate_epoch(backend: Backend, test, dataset: Dataset, probe_set, pop_batches, config, epoch, epsilon, clock):
    """After an epoch: test loss and accuracy (timed), the train/eval probe and, with population statistics, the
    population pass. ({the epoch record's evaluation fields}, {the arrays to store}). A noisy run with
    --noise-eval expectation is evaluated with the noise's expectation folded into gamma and beta
    (common.norms.noise_folded), and its trained parameters put back after (the running statistics as the
    evaluation left them: --recalibrate's population statistics)."""
    spec = config.model
    if not (spec.norm_noise and spec.noise_eval == "expectation"):
        return _evaluate(backend, test, dataset, probe_set, pop_batches, config, epoch, epsilon, clock)
    trained = backend.get_params()
    backend.set_params(norms.noise_folded(trained, spec))
    try:
        fields, arrays = _evaluate(backend, test, dataset, probe_set, pop_batches, config, epoch, epsilon, clock)
    finally:
        evaluated = backend.get_params()
        backend.set_params({k: evaluated[k] if norms.array_role(k) == "statistic" else v for k, v in trained.items()})
    arrays.update({f"param/{k}": v for k, v in backend.get_params().items()})  # the trained ones, not the folded
    return fields, arrays


def _evaluate(backend: Backend, test, dataset: Dataset, probe_set, pop_batches, config, epoch, epsilon, clock):
    ntest = len(dataset.test_labels)
    eval_start = clock()
    test_loss, test_correct = backend.evaluate(test, config.eval_batch_size)
    eval_seconds = clock() - eval_start
    probe_images, probe_labels = probe_set
    probe = backend.probe(probe_images)
    measured = population.divergence(probe, probe_labels, epsilon)
    pop_arrays = {}
    if pop_batches is not None:  # untimed as training: its own time, population_seconds
        keep = config.recalibrate and epoch == config.epochs
        fields, lag_noise, pop_arrays = population.measure(
            backend,
            dataset.train_images,
            pop_batches,
            probe,
            test,
            ntest,
            probe_images,
            probe_labels,
            config,
            epsilon,
            keep=keep,
            clock=clock,
        )
        measured["bn_gap"] = [{**g, **extra} for g, extra in zip(measured["bn_gap"], lag_noise)]
        measured.update(fields)
    params = backend.get_params()  # with --recalibrate, the final epoch's holds the population statistics
    fields = {
        "test_loss": test_loss / ntest,
        "test_acc": test_correct / ntest,
        "eval_examples_per_s": ntest / eval_seconds,
        "eval_seconds": eval_seconds,
        **measured,
    }
    arrays = {f"param/{k}": v for k, v in params.items()}
    arrays.update({"probe/logits_eval": probe.logits_eval, "probe/logits_train": probe.logits_train, **pop_arrays})
    return fields, arrays


def run(
    backend_cls: Callable[[RunConfig], Backend],
    config: RunConfig,
    dataset: Dataset,
    emit: Callable[..., None],
    progress: Callable[..., None] | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
    initial: dict | None = None,
) -> None:
    """Train config.epochs epochs; emit one epoch record per epoch.

    emit(record, arrays=None): arrays (parameters and probe logits) are for the
    caller to store; the record's "snapshot" field names where.
    progress(epoch, step, steps): called after each queued step.
    clock: seconds, read only at timing boundaries (tests pass one they control).
    initial: canonical parameters to start from (compare.port's fine-tuning) instead of the seed's.
    """
    dataset = subset(dataset, config)
    check_finite("training images", dataset.train_images)
    check_finite("test images", dataset.test_images)
    backend = backend_cls(config)
    try:
        _run(backend, config, dataset, emit, progress, clock, initial)
    finally:
        backend.close()


def _run(backend: Backend, config: RunConfig, dataset: Dataset, emit, progress, clock, initial=None) -> None:
    ident = dict(framework=backend.name, variant=config.model.variant, seed=config.seed, config_id=config.config_id)
    described = backend.describe()
    ntrain, ntest = len(dataset.train_labels), len(dataset.test_labels)
    emit(
        records.make(
            "run_start",
            **ident,
            config=config.to_dict(),
            backend=described,
            data_source=dataset.source,
            data_verified=dataset.verified,
            train_examples=ntrain,
            test_examples=ntest,
        )
    )
    backend.set_params(initial if initial is not None else init_params(config.model, config.seed, config.dtype))
    train = backend.put(dataset.train_images, dataset.train_labels)
    test = backend.put(dataset.test_images, dataset.test_labels)
    probe_idx = probe_indices(ntest, config.probe_size)
    probe_set = dataset.test_images[probe_idx], dataset.test_labels[probe_idx]
    epsilon = described["bn_epsilon"] or config.model.epsilon  # None without normalisation layers
    # the same images every epoch (and in every framework); none without running statistics (common.norms)
    pop_batches = (
        population.population_batches(config.seed, ntrain, config.population_size, config.batch_size)
        if config.population_size and config.model.has_population
        else None
    )
    tracer = (
        trace.Tracer(backend, config, dataset.train_images, dataset.train_labels, probe_set[0], clock)
        if config.trace_every
        else None
    )
    for epoch in range(1, config.epochs + 1):
        trained, diverged = train_epoch(backend, train, config, epoch, ntrain, clock, progress, tracer)
        if diverged:
            emit(records.make("run_end", **ident, status="diverged", epochs_done=epoch - 1, **diverged))
            return
        evaluated, arrays = evaluate_epoch(
            backend, test, dataset, probe_set, pop_batches, config, epoch, epsilon, clock
        )
        snapshot = f"snapshots/{backend.name}_{config.model.variant}_s{config.seed}_{config.config_id}_e{epoch:03d}.npz"
        emit(records.make("epoch", **ident, epoch=epoch, snapshot=snapshot, **trained, **evaluated), arrays)
    emit(records.make("run_end", **ident, status="complete", epochs_done=config.epochs))
