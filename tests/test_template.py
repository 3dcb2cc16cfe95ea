"""The Backend template (common.interface): a backend that implements only the primitives and the hooks, here
in numpy over the float64 reference and with no framework installed, gets describe, the probe, the population
pass and the running-statistics gate from the template, and runs the loop end to end."""

import numpy as np
import pytest

from common import population
from common.config import ModelSpec, RunConfig
from common.data import load_fashion_mnist
from common.init import init_params
from common.interface import Backend
from common.loop import run as run_loop
from common.reference import lenet_forward, softmax_cross_entropy
from tests.helpers import make_idx_dir


class NumpyBackend(Backend):
    """BN-LeNet by the float64 reference: training mode updates the running statistics by the spec, and the
    weights stay where they are (no gradients here: what is tested is the template around them)."""

    name = "torch"  # a registry name, so records look like a real framework's

    # hooks
    def framework_version(self):
        return "numpy " + np.__version__

    def device_info(self):
        return "cpu", "numpy"

    def execution_name(self):
        return "reference"

    def default_norm_constants(self):
        return 0.5, 1e-3  # a framework's own defaults, unlike the spec's

    def train_mode_forward(self, images, capture):
        inputs = {}
        logits, _ = lenet_forward(self.params, self.config.model, images, training=True, inputs=inputs)
        self.params = {k: v + 1.0 if k.endswith("running_var") else v for k, v in self.params.items()}  # a side effect
        return logits, {name: (x, 1) for name, x in inputs.items()} if capture else {}

    def loss_and_gradient(self, images, labels, capture, noise=None):
        raise NotImplementedError("the reference has no backward; the template's tests trace nothing")

    # primitives
    def device_noise(self, noise):
        raise NotImplementedError("the template's tests add no noise")

    def set_params(self, params):
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}

    def get_params(self):
        return {k: v.copy() for k, v in self.params.items()}

    def save(self, path):
        np.savez(path, **self.params)

    def load(self, path):
        with np.load(path) as saved:
            self.set_params(dict(saved))

    def put(self, images, labels):
        return np.asarray(images, np.float64), np.asarray(labels)

    def put_order(self, order):
        return order

    def train_step(self, data, order, step):
        images, labels = data[0][order[step]], data[1][order[step]]
        logits, stats = lenet_forward(self.params, self.config.model, images, training=True)
        for name, s in stats.items():
            self.params[f"{name}.running_mean"], self.params[f"{name}.running_var"] = (
                s["new_running_mean"],
                s["new_running_var"],
            )
        loss = softmax_cross_entropy(logits, labels)
        return np.array([loss * len(labels), np.sum(logits.argmax(1) == labels)])

    def reduce_stats(self, stats):
        return np.sum(stats, axis=0)

    def evaluate(self, data, batch_size):
        logits = self.predict(data[0])
        return np.array([softmax_cross_entropy(logits, data[1]) * len(data[1]), np.sum(logits.argmax(1) == data[1])])

    def predict(self, images):
        return lenet_forward(self.params, self.config.model, images, training=False)[0]

    def synchronize(self):
        pass


@pytest.fixture
def tiny(tmp_path):
    return load_fashion_mnist(make_idx_dir(tmp_path, 96, 40), verify=False, dtype="float64")


def test_a_backend_of_hooks_only_runs_the_loop(tiny):
    config = RunConfig(
        model=ModelSpec(),
        epochs=2,
        batch_size=16,
        dtype="float64",
        device="cpu",
        probe_size=16,
        eval_batch_size=20,
        population_size=64,
    )
    got = []
    run_loop(NumpyBackend, config, tiny, lambda record, arrays=None: got.append((record, arrays)))
    start = next(r for r, _ in got if r["kind"] == "run_start")
    assert start["backend"] == {
        "framework": "torch",
        "version": "numpy " + np.__version__,
        "device": "cpu",
        "device_name": "numpy",
        "execution": "reference",
        "bn_decay": 0.9,
        "bn_epsilon": 1e-5,
        "dtype": "float64",
    }
    epochs = [(r, a) for r, a in got if r["kind"] == "epoch"]
    assert len(epochs) == 2 and got[-1][0]["status"] == "complete"
    for record, arrays in epochs:
        assert [g["layer"] for g in record["bn_gap"]] == ["bn1", "bn2", "bn3", "bn4"]
        assert all(g["mean_gap"] > 0 and "lag_mean_gap" in g for g in record["bn_gap"])
        assert record["population_images"] == 64 and 0 <= record["probe_disagreement"] <= 1
        assert "population/bn1.running_var" in arrays

    class Clean(NumpyBackend):  # the same without the forward's side effect on the running variances
        def train_mode_forward(self, images, capture):
            saved = self.get_params()
            out = super().train_mode_forward(images, capture)
            self.params = saved
            return out

    clean = []
    run_loop(Clean, config, tiny, lambda record, arrays=None: clean.append((record, arrays)))
    for (a, arrays_a), (b, arrays_b) in zip(epochs, [(r, x) for r, x in clean if r["kind"] == "epoch"]):
        assert {k: v for k, v in a.items() if not k.endswith("seconds") and not k.endswith("_per_s")} == {
            k: v for k, v in b.items() if not k.endswith("seconds") and not k.endswith("_per_s")
        }
        for name, value in arrays_a.items():  # the side effect never reached the run: the template restored it
            np.testing.assert_array_equal(arrays_b[name], value, err_msg=name)


def test_the_template_probe_restores_state_and_reports_by_the_spec(tiny):
    spec = ModelSpec()
    backend = NumpyBackend(RunConfig(model=spec, dtype="float64", device="cpu"))
    params = init_params(spec, 0, "float64")
    params["bn2.running_var"] = params["bn2.running_var"] * 3.0
    backend.set_params(params)
    images = tiny.test_images[:12]
    probe = backend.probe(images)
    for name, value in backend.get_params().items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
    record = {}
    lenet_forward(params, spec, images, training=True, inputs=record)
    h = record["bn2"]
    np.testing.assert_allclose(probe.norms["bn2"]["batch_mean"], h.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(probe.norms["bn2"]["batch_var"], h.var(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_array_equal(probe.norms["bn2"]["running_var"], params["bn2.running_var"])  # before the forward
    np.testing.assert_array_equal(probe.logits_eval, backend.predict(images))
    # the same statistics feed the population pass
    (stats,) = backend.batch_statistics([images])
    np.testing.assert_array_equal(stats["bn2"][0], probe.norms["bn2"]["batch_mean"])
    assert population.combine([stats])["bn2"][0].shape == (16,)


@pytest.mark.parametrize(
    "variant, norm, want",
    [("builtin-defaults", "batch", (0.5, 1e-3)), ("scratch", "group", (None, 1e-5)), ("none", "batch", (None, None))],
)
def test_the_gate_and_the_effective_constants_are_the_templates(tiny, variant, norm, want):
    """builtin-defaults reads the framework's defaults through its hook; a norm without running statistics
    reports no decay and no statistics; no normalisation: neither."""
    spec = ModelSpec(variant=variant, norm=norm)
    backend = NumpyBackend(RunConfig(model=spec, dtype="float64", device="cpu"))
    backend.set_params(init_params(spec, 0, "float64"))
    assert backend.effective_norm() == want
    assert (backend.probe(tiny.test_images[:8]).norms == {}) == (not spec.has_running_stats)


def test_the_template_marks_every_state_change_so_that_no_backend_can_forget():
    """A backend that defines set_params, load and restore_state without a word about other replicas gets
    changed("state") after each, and changed("noise") after put_noise (the template's own), in that order; a
    framework whose replicas keep copies (PyTorch's) overrides changed() only."""
    seen = []

    class Watched(NumpyBackend):
        def changed(self, what):
            seen.append(what)

        def load(self, path):
            pass

    backend = Watched(RunConfig(model=ModelSpec(), dtype="float64"))
    seen.clear()  # what building it set
    params = init_params(ModelSpec(), 0, "float64")
    backend.set_params(params)
    backend.load("nowhere")
    backend.restore_state(backend.save_state())
    backend.put_noise({})
    assert seen == ["state", "state", "state", "noise"]  # restore_state's default is set_params: marked through it
