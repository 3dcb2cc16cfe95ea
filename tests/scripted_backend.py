"""A Backend whose clock, step results, logits and BN statistics the test decides.

It drives the real common.loop.run, so every figure the loop derives
(throughput, warm-up split, accuracies, divergence) can be checked against a
value computed by hand in the test. Its device is asynchronous like a GPU's:
queued work costs time only when the host waits for it (synchronize,
reduce_stats, evaluate), so a loop that reads the clock without waiting, or
waits in the wrong place, gets a different figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.init import is_trainable
from common.interface import Backend, ProbeResult


@dataclass
class Script:
    """What the scripted device does. Times are seconds of device work."""

    step_seconds: callable  # (epoch, step) -> seconds the step's work takes
    step_stats: callable  # (epoch, step) -> (loss_sum, correct) of that step
    eval_seconds: float = 1.0
    eval_stats: tuple = (0.0, 0.0)  # (loss_sum, correct) over the whole test split
    probe: ProbeResult | None = None
    # (batch index) -> {BN name: (mean, var)} of population batch i; None: the Backend default (probe per batch)
    population_stats: callable = None
    bn_epsilon: float | None = None
    gradient_seconds: float = 0.0  # host time of one Backend.gradient call (common.trace)
    now: float = 0.0  # the device clock
    queued: float = 0.0  # work queued and not yet waited for
    calls: list = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def wait(self) -> None:
        self.now += self.queued
        self.queued = 0.0


def scripted_backend(script: Script):
    """A Backend class (what loop.run takes) bound to one Script."""

    class ScriptedBackend(Backend):
        name = "torch"  # a registry name, so records look like a real framework's

        def __init__(self, config):
            super().__init__(config)
            self.epoch = 0

        def describe(self):
            return {
                "framework": "scripted",
                "version": "0",
                "device": "cpu",
                "device_name": "scripted",
                "execution": "scripted",
                "bn_decay": None,
                "bn_epsilon": script.bn_epsilon,
                "dtype": self.config.dtype,
            }

        # the template's hooks: describe and probe are scripted whole here, so these are never called
        def framework_version(self):
            raise NotImplementedError

        def device_info(self):
            raise NotImplementedError

        def execution_name(self):
            raise NotImplementedError

        def default_norm_constants(self):
            raise NotImplementedError

        def train_mode_forward(self, images, capture):
            raise NotImplementedError

        def loss_and_gradient(self, images, labels, capture, noise=None):
            script.calls.append(("gradient", self.epoch, len(images)))
            script.now += script.gradient_seconds
            trainable = {n: np.ones_like(v) for n, v in self.params.items() if is_trainable(n, self.config.model)}
            return 1.0, trainable, {}

        def device_noise(self, noise):
            script.calls.append(("device_noise", self.epoch, sorted(noise)))
            return noise

        def set_params(self, params):
            self.params = dict(params)

        def get_params(self):
            return self.params

        def save(self, path):
            raise NotImplementedError

        def load(self, path):
            raise NotImplementedError

        def put(self, images, labels):
            return images, labels

        def put_order(self, order):
            self.epoch += 1
            return order

        def train_step(self, data, order, step):
            script.calls.append(("train_step", self.epoch, step))
            script.queued += script.step_seconds(self.epoch, step)
            return np.array(script.step_stats(self.epoch, step), dtype=np.float64)

        def reduce_stats(self, stats):
            script.wait()
            return np.sum(stats, axis=0)

        def evaluate(self, data, batch_size):
            script.calls.append(("evaluate", self.epoch))
            script.wait()
            script.now += script.eval_seconds
            return np.array(script.eval_stats, dtype=np.float64)

        def predict(self, images):  # the population pass's eval-mode probe
            script.calls.append(("predict", self.epoch, len(images)))
            return script.probe.logits_eval

        def probe(self, images):
            script.calls.append(("probe", self.epoch, len(images)))
            return script.probe

        def norm_moments(self, images):  # the template's population pass, batch by batch: the probe's statistics
            script.calls.append(("norm_moments", self.epoch, len(images)))
            return {name: (s["batch_mean"], s["batch_var"]) for name, s in script.probe.norms.items()}

        def batch_statistics(self, batches):
            if script.population_stats is None:
                return super().batch_statistics(batches)
            script.calls.append(("batch_statistics", self.epoch, [len(b) for b in batches]))
            return [script.population_stats(i) for i in range(len(batches))]

        def synchronize(self):
            script.wait()

    return ScriptedBackend
