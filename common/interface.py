"""The Backend interface every framework implements.

numpy arrays go in and out at this boundary, so `common`, `compare` and most
tests never touch a framework tensor. Parameters are exchanged in the
canonical layout of `common.init` (PyTorch's), BN running statistics included.
Training mode is always explicit: `train_step` and `probe` use batch
statistics, `evaluate` and `predict` use the running statistics; nothing is
inferred from grad mode or autograd recording.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from .config import RunConfig
from .errors import BackendUnavailable
from .reference import output_departure


@dataclass
class ProbeResult:
    """A train-mode and an eval-mode forward of the same images; no state changed."""

    logits_eval: np.ndarray  # (N, 10), running statistics
    logits_train: np.ndarray  # (N, 10), batch statistics of these N images
    # canonical BN name -> dict(batch_mean, batch_var, running_mean, running_var), batch_var biased; the batch
    # statistics are those the train-mode forward used; and for the research transforms their output's departure
    # from white or uniform (common.reference.output_departure: whiteness or ks_uniform, a float)
    norms: dict


@dataclass
class Gradient:
    """The mean loss of a batch and the gradient of every trainable parameter, from a forward with the
    normalisation layers in train mode (batch statistics) and dropout off; no state changed."""

    loss: float
    grads: dict  # canonical name -> float64 array in the canonical layout, trainable parameters only
    # position (conv1, conv2, fc1, fc2) -> float64 input of its activation, channels on axis 1 (when captured)
    activations: dict


def channels_first(array, channel_axis: int) -> np.ndarray:
    """A float64 copy of array with its channel axis moved to axis 1 (NCHW / NC, the canonical layout)."""
    return np.moveaxis(np.asarray(array, dtype=np.float64), channel_axis, 1)


# Each frameworks/<fw>/backend.py defines, at module level, BACKEND: its Backend subclass. The tests run single
# layers through frameworks/<fw>/harness.py (common.harness).


def resolve_execution(config: RunConfig, default: str, supported=("compiled", "eager")) -> str:
    """What the run asked for, or the framework's default for "default"; a mode the framework does not
    have (`supported`) is BackendUnavailable, naming the ones it has."""
    mode = default if config.execution == "default" else config.execution
    if mode not in supported:
        raise BackendUnavailable(
            f"--execution {mode} is not a mode of this framework; it has "
            f'{", ".join(("default",) + tuple(supported))} (docs/benchmark.md, "Execution modes")'
        )
    return mode


def moments(values, channel_axis: int) -> tuple:
    """The per-channel mean and biased variance of values over every axis but channel_axis, in float64
    (two passes: the mean, then the mean squared deviation from it)."""
    h = np.asarray(values, dtype=np.float64)
    axes = tuple(a for a in range(h.ndim) if a != channel_axis % h.ndim)
    return h.mean(axis=axes), h.var(axis=axes)


def running_variance(params: dict, name: str) -> np.ndarray:
    """A normalisation layer's running variance per channel: running_var, or whiten's running covariance's
    diagonal."""
    if f"{name}.running_var" in params:
        return params[f"{name}.running_var"]
    return np.diagonal(params[f"{name}.running_cov"])


def bn_probe_stats(bn_input: np.ndarray, channel_axis: int, running_mean, running_var) -> dict:
    """One entry of ProbeResult.norms: the per-channel batch mean and biased variance of the
    BN layer's input (computed in float64) beside its running statistics."""
    mean, var = moments(bn_input, channel_axis)
    return {
        "batch_mean": mean,
        "batch_var": var,
        "running_mean": np.asarray(running_mean, dtype=np.float64),
        "running_var": np.asarray(running_var, dtype=np.float64),
    }


@dataclass(frozen=True)
class DataParallel:
    """What a framework's data-parallel engine supports (--replicas K > 1, docs/data-parallel.md), declared once
    as data on its backend; Backend.check_replicas refuses everything else, one message per kind of refusal.

    engine: how the replicas run, "processes" (one per replica), "devices" (one process's devices) or "contexts"
    (MXNet's). where: the hardware they run on, in words. executions: the execution names (execution_name) the
    replicated step runs in, and why_executions: why only those. global_sync: the variants whose layer pools the
    replicas' statistics under --bn-sync global, and why_not_global: {variant: the measured reason} for those
    whose does not. devices: how a process gets K devices, where the engine needs them made before it starts
    (said when a process has too few)."""

    engine: str
    where: str
    executions: tuple
    why_executions: str = ""
    global_sync: tuple = ("scratch",)
    why_not_global: dict = field(default_factory=dict)
    devices: str = ""


def _then_changed(method, what: str):
    """method, then self.changed(what) (Backend.CHANGES)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        self.changed(what)
        return result

    return wrapped


class Backend(ABC):
    """One framework's BN-LeNet on one device, built from a RunConfig.

    A template: what is the same in every framework is written here once (describe, probe, the population
    pass, and the gate that only normalisations with running statistics report statistics); a framework
    implements the primitives the loop calls (set_params ... synchronize) and a few small hooks:
    framework_version, device_info, execution_name, default_norm_constants, train_mode_forward and
    loss_and_gradient, and, where a forward can change more than the canonical arrays, save_state /
    restore_state."""

    name: str = ""  # the registry name: torch, mxnet, tensorflow, jax
    data_parallel: DataParallel | None = None  # what --replicas K > 1 runs on, where the framework has an engine
    # the primitives that change what a training step reads, and what: after each, the template calls
    # changed(what), so a framework whose other replicas keep copies (PyTorch's) can never miss one
    CHANGES = {"set_params": "state", "load": "state", "restore_state": "state", "put_noise": "noise"}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for method, what in Backend.CHANGES.items():
            if method in cls.__dict__:
                setattr(cls, method, _then_changed(cls.__dict__[method], what))

    def changed(self, what: str) -> None:
        """Called by the template after every call that changes the step's inputs: "state" (the parameters and
        running statistics) or "noise" (the epoch's noisy-BN draws). Default: nothing (one process)."""

    def check_replicas(self, config: RunConfig, device_type: str, execution: str, available: int | None = None):
        """Refuse a data-parallel run this framework's engine (data_parallel) does not support, before anything
        is built: the device, the execution mode, the number of devices a process has (available: None where the
        engine makes its replicas itself) and global sync with the run's variant."""
        engine, spec = self.data_parallel, config.model
        if engine is None:
            raise BackendUnavailable(f"{self.name} has no data-parallel engine in this suite: use --replicas 1")
        if device_type != "cpu":
            raise BackendUnavailable(f"--replicas runs on {engine.where} here: use --device cpu")
        if execution not in engine.executions:
            raise BackendUnavailable(
                f"--replicas runs {self.name}'s step {' or '.join(engine.executions)} only"
                + (f" ({engine.why_executions})" if engine.why_executions else "")
                + f", not {execution}: use --execution default"
            )
        if available is not None and available < config.replicas:
            raise BackendUnavailable(
                f"--replicas {config.replicas} needs {config.replicas} devices and this process has {available}: "
                f"{engine.devices}"
            )
        if config.bn_sync == "global" and spec.has_running_stats and spec.variant not in engine.global_sync:
            why = engine.why_not_global.get(spec.variant, f"{self.name}'s {spec.variant} layer does not pool them")
            raise BackendUnavailable(
                f"--bn-sync global with {self.name}'s {spec.variant} layer: {why}; use --bn-sync local"
                + (f" or --variants {','.join(engine.global_sync)}" if engine.global_sync else " or --replicas 1")
            )

    def __init__(self, config: RunConfig):
        self.config = config
        self.noise = None  # the epoch's noisy-BN draws on the device (put_noise), or None

    # hooks ------------------------------------------------------------------------------------------------
    @abstractmethod
    def framework_version(self) -> str:
        """The framework's version string."""

    @abstractmethod
    def device_info(self) -> tuple:
        """("cpu" or "gpu", a readable device name) of the device this model runs on."""

    @abstractmethod
    def execution_name(self) -> str:
        """How the training step runs, in the framework's words (eager, torch.compile, hybridized, ...)."""

    @abstractmethod
    def default_norm_constants(self) -> tuple:
        """(decay, epsilon) of the framework's own normalisation layer for this spec as its constructor makes
        it (the builtin-defaults variant); decay None where the layer keeps no running statistics."""

    @abstractmethod
    def train_mode_forward(self, images: np.ndarray, capture: bool) -> tuple:
        """A forward of numpy images with every normalisation layer in train mode (its batch statistics) and
        dropout off: (logits as numpy, {canonical layer name: (the layer's input as numpy, its channel axis)}
        for every normalisation layer where capture, else {}). It may change state (running statistics,
        counters); probe() restores it."""

    @abstractmethod
    def loss_and_gradient(self, images: np.ndarray, labels: np.ndarray, capture: bool, noise=None) -> tuple:
        """With the current parameters: a forward of numpy images with every normalisation layer in train mode
        (followed by noise, one step's {norm name: (scales, shifts)} as device_noise made them, where given)
        and dropout off, the mean cross-entropy against labels and its gradient. Returns (loss as a float,
        {canonical name: gradient as numpy, canonical layout} for every trainable parameter (common.init
        .is_trainable), {position: (the input of its activation as numpy, its channel axis)} for conv1, conv2,
        fc1 and fc2 where capture, else {}). It may change state (running statistics, gradient buffers);
        gradient() restores it."""

    def replica_statistics(self) -> str:
        """Under --replicas K > 1: which running statistics eval mode uses (the replicas' mean, replica 0's, ...)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend started (data-parallel replicas); the loop calls it once, at the end."""

    def save_state(self):
        """Everything a train-mode forward could change, for restore_state (default: the canonical arrays,
        running statistics and renorm's step counts included)."""
        return self.get_params()

    def restore_state(self, saved) -> None:
        self.set_params(saved)

    # the template -------------------------------------------------------------------------------------------
    def effective_norm(self) -> tuple:
        """(decay, epsilon) the normalisation layers really use: the spec's, or for builtin-defaults the
        framework's own; decay None without running statistics, both None without a normalisation."""
        spec = self.config.model
        if not spec.has_norm:
            return None, None
        if spec.variant == "builtin-defaults":
            decay, epsilon = self.default_norm_constants()
        else:
            decay, epsilon = spec.decay, spec.epsilon
        return (None if decay is None or not spec.has_running_stats else float(decay)), float(epsilon)

    def describe(self) -> dict:
        """Framework version, device name, execution mode, and the decay and epsilon the normalisation layers
        really use (they differ from the spec for builtin-defaults)."""
        device, device_name = self.device_info()
        decay, epsilon = self.effective_norm()
        return {
            "framework": self.name,
            "version": self.framework_version(),
            "device": device,
            "device_name": device_name,
            "execution": self.execution_name(),
            "bn_decay": decay,
            "bn_epsilon": epsilon,
            "dtype": self.config.dtype,
            **(
                {"replica_statistics": self.replica_statistics()}
                if self.config.replicas > 1 and self.config.model.has_running_stats
                else {}
            ),
        }

    def probe(self, images: np.ndarray) -> ProbeResult:
        """Eval-mode and train-mode logits of the same images, and each normalisation layer's batch and
        running statistics (only the normalisations that keep running statistics report any). Changes no
        state: running statistics, parameters and any optimizer or framework counters are exactly as before."""
        logits_eval = self.predict(images)
        capture = self.config.model.has_running_stats
        params = self.get_params() if capture else {}
        saved = self.save_state()
        try:
            logits_train, inputs = self.train_mode_forward(images, capture)
        finally:
            self.restore_state(saved)
        _, epsilon = self.effective_norm()
        stats = {
            name: {
                **bn_probe_stats(x, axis, params[f"{name}.running_mean"], running_variance(params, name)),
                **output_departure(self.config.model, channels_first(x, axis), epsilon),
            }
            for name, (x, axis) in inputs.items()
        }
        return ProbeResult(logits_eval=np.asarray(logits_eval), logits_train=np.asarray(logits_train), norms=stats)

    def gradient(
        self, params: dict, images: np.ndarray, labels: np.ndarray, capture: bool = False, noise=None
    ) -> Gradient:
        """The loss and gradient at `params` (canonical, every array of common.init.parameter_shapes) on a batch,
        train mode, with a step's noisy-BN draws where given (loss_and_gradient). Changes no state: the model's
        parameters, running statistics and any optimizer or framework counter are exactly as before, and no
        random stream is drawn from (dropout is off). What common.trace measures with."""
        current, saved = self.get_params(), self.save_state()
        try:
            self.set_params(params)
            device = self.device_noise(noise) if noise else None
            loss, grads, activations = self.loss_and_gradient(images, labels, capture, device)
        finally:
            self.set_params(current)
            self.restore_state(saved)
        return Gradient(
            loss=float(loss),
            grads={name: np.asarray(g, dtype=np.float64) for name, g in grads.items()},
            activations={pos: channels_first(h, axis) for pos, (h, axis) in activations.items()},
        )

    def export_onnx(self, path: str, opset: int | None = None) -> dict:
        """Write the model in eval mode to path as ONNX, with the framework's own exporter at the given opset (None:
        the exporter's default) (compare.port). Returns
        {"exporter": its name and version, "layout": the input's, "NCHW" or "NHWC"}; raises what the exporter raises
        where it cannot export this model (the reason compare.port records)."""
        raise BackendUnavailable(f"{type(self).__name__} has no ONNX exporter")

    # the primitives the loop calls ------------------------------------------------------------------------
    @abstractmethod
    def set_params(self, params: dict) -> None:
        """Load canonical parameters (every array of common.init.parameter_shapes)."""

    @abstractmethod
    def get_params(self) -> dict:
        """Export every canonical array as float numpy arrays of the run's dtype."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Write a checkpoint in the framework's own format (state_dict, Gluon .params,
        Keras .weights.h5), BN running statistics included."""

    @abstractmethod
    def load(self, path: str) -> None:
        """Read a checkpoint written by save() into this model."""

    @abstractmethod
    def put(self, images: np.ndarray, labels: np.ndarray):
        """Move a whole split to the device once; returns an opaque handle."""

    @abstractmethod
    def put_order(self, order: np.ndarray):
        """Move one epoch's (steps, batch_size) index matrix to the device."""

    @abstractmethod
    def device_noise(self, noise: dict):
        """Noisy-BN draws ({norm name: (scales, shifts)} of numpy arrays, not empty) as the framework's arrays on
        the device in the run's dtype, in the same dict."""

    def put_noise(self, noise: dict) -> None:
        """Move one epoch's noisy-BN draws (common.norms.draw_noise: {norm name: (scales, shifts)}, each
        (steps, channels); {} = none) to the device as self.noise: train_step(..., step) then adds row `step`
        after each normalisation layer."""
        self.noise = self.device_noise(noise) if noise else None
        self.changed("noise")  # the template's own primitive: a framework's override is wrapped (CHANGES)

    @abstractmethod
    def train_step(self, data, order, step: int):
        """One SGD step on the batch order[step] in training mode (batch statistics,
        running statistics updated). Returns an opaque on-device [loss_sum, correct]
        without waiting for the device."""

    @abstractmethod
    def reduce_stats(self, stats: list) -> np.ndarray:
        """Sum the train_step results: numpy [loss_sum, correct] (waits for the device)."""

    @abstractmethod
    def evaluate(self, data, batch_size: int) -> np.ndarray:
        """Eval mode over a whole split: numpy [loss_sum, correct]. Changes no state."""

    @abstractmethod
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode logits of numpy images. Changes no state."""

    def batch_statistics(self, batches: list) -> list:
        """For each batch of numpy images: a forward with every BN layer in train mode (normalising with
        that batch's own statistics, nothing updated, dropout off), and per BN layer the batch mean and
        biased variance of its input, float64: [{canonical BN name: (mean, var)}, ...]. Changes no
        state (common.population builds the population statistics from it); each batch's forward sees the
        state as it was (renorm's train-mode forward reads the running statistics)."""
        return [self.norm_moments(images) for images in batches]

    def norm_moments(self, images: np.ndarray) -> dict:
        """{canonical BN name: (batch mean, biased batch variance)} of each BN layer's input in a train-mode
        forward of numpy images, as numpy. Changes no state. This default takes train_mode_forward's inputs
        to the host and restores the state after it; a backend overrides it with one pass on the device
        that returns the moments only (its time is most of the population pass's)."""
        saved = self.save_state()
        try:
            _, inputs = self.train_mode_forward(images, True)
        finally:
            self.restore_state(saved)
        return {name: moments(x, axis) for name, (x, axis) in inputs.items()}

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until the device has finished all queued work (timing boundaries)."""
