"""Why BN helps, measured (common.trace, --trace-every): each measure against a case worked by hand,
framework-free; then each framework's gradient against finite differences, changing no state, and a traced
run bit-identical to an untraced one (--framework / tox -e NAME)."""

import math

import numpy as np
import pytest

from common import norms, trace
from common.config import LATE_FIELDS, STORED_NAMES, ModelSpec, RunConfig
from common.data import load_fashion_mnist
from common.errors import ConfigError
from common.init import init_params, is_trainable, parameter_shapes
from tests.helpers import epochs_of, make_idx_dir, random_bn_params, tiny_config


# hand-worked, framework-free ---------------------------------------------------------------------------
def two_layers(x=1.0, t=0.0):
    """loss = (w2 * w1 * x - t)^2 / 2 over two one-weight layers (conv1, conv2): gradient(params) as common.trace
    takes it."""

    def gradient(p):
        w1, w2 = float(p["conv1.weight"][0]), float(p["conv2.weight"][0])
        r = w2 * w1 * x - t
        return r * r / 2, {"conv1.weight": np.array([r * w2 * x]), "conv2.weight": np.array([r * w1 * x])}

    return gradient


def test_ics_compares_with_the_gradient_after_the_earlier_layers_step_only():
    """w1 = 1, w2 = 2, x = 1, t = 0, lr 0.1: G1 = 4, G2 = 2. After conv1's step w1' = 0.6, so
    G2' = (2 * 0.6) * 0.6 = 0.72 and ||G2 - G2'|| / ||G2|| = 0.64 (had conv2 moved too, w2' = 1.8, G2'' = 0.648 and
    the ratio 0.676: not what is defined)."""
    gradient = two_layers()
    params = {"conv1.weight": np.array([1.0]), "conv2.weight": np.array([2.0])}
    loss, grads = gradient(params)
    assert loss == 2.0 and grads["conv1.weight"][0] == 4.0 and grads["conv2.weight"][0] == 2.0
    ics = trace.internal_covariate_shift(gradient, params, grads, lr=0.1)
    assert list(ics) == ["conv2"]  # the first layer has no earlier layer
    assert ics["conv2"]["rel_diff"] == pytest.approx(0.64, abs=1e-12)
    assert ics["conv2"]["cos"] == pytest.approx(1.0, abs=1e-12)
    assert params["conv1.weight"][0] == 1.0  # the measure moves a copy


def test_ics_cosine_sees_a_turned_gradient():
    """Two weights in conv2 whose gradient turns by 90 degrees when conv1 moves: cos 0, rel_diff sqrt(2)."""

    def gradient(p):
        w1 = float(p["conv1.weight"][0])
        return 0.0, {"conv1.weight": np.array([1.0]), "conv2.weight": np.array([w1, 1.0 - w1])}

    params = {"conv1.weight": np.array([1.0]), "conv2.weight": np.zeros(2)}
    ics = trace.internal_covariate_shift(gradient, params, gradient(params)[1], lr=1.0)
    assert ics["conv2"]["cos"] == pytest.approx(0.0, abs=1e-12)
    assert ics["conv2"]["rel_diff"] == pytest.approx(math.sqrt(2), abs=1e-12)


def test_landscape_of_a_quadratic():
    """loss = a w^2 / 2, a = 2, w = 1, lr 0.1, scales 1 and 2: g = 2, the points 0.8 and 0.6 (losses 0.64,
    0.36; gradients 1.6, 1.2): loss variation 1 - 0.36 = 0.64, gradient predictiveness 0.8, and the
    effective beta-smoothness 0.4 / 0.2 = 0.8 / 0.4 = 2 = a, the curvature."""

    def gradient(p):
        w = float(p["fc3.weight"][0])
        return w * w, {"fc3.weight": np.array([2 * w])}

    params = {"fc3.weight": np.array([1.0]), "bn4.running_mean": np.array([5.0])}
    loss, grads = gradient(params)
    got = trace.landscape(gradient, params, loss, grads, lr=0.1, scales=(1.0, 2.0))
    assert got["losses"] == pytest.approx([0.64, 0.36], abs=1e-12)
    assert got["loss_variation"] == pytest.approx(0.64, abs=1e-12)
    assert got["grad_predictiveness"] == pytest.approx(0.8, abs=1e-12)
    assert got["beta_smoothness"] == pytest.approx(2.0, abs=1e-12)
    assert params["fc3.weight"][0] == 1.0 and params["bn4.running_mean"][0] == 5.0  # a copy moved, not these


def test_gradient_predictiveness_is_the_largest_change_not_the_last():
    """loss = -cos(w) at w = pi/2 (g = sin(w) = 1), lr 1, scales pi/2, pi, 2 pi: at w - s the gradient is cos(s),
    so it changes by |1 - cos(s)| = 1, 2, 0 (the last step comes round to the same slope); the gradient
    predictiveness is the largest, 2, the loss variation 0 - (-1) = 1 (losses -sin(s): -1, 0, 0, and 0 at w), and
    the effective beta-smoothness max(1 / (pi/2), 2 / pi, 0) = 2 / pi."""

    def gradient(p):
        w = float(p["fc3.weight"][0])
        return -math.cos(w), {"fc3.weight": np.array([math.sin(w)])}

    params = {"fc3.weight": np.array([math.pi / 2])}
    loss, grads = gradient(params)
    got = trace.landscape(gradient, params, loss, grads, lr=1.0, scales=(math.pi / 2, math.pi, 2 * math.pi))
    assert got["grad_changes"] == pytest.approx([1.0, 2.0, 0.0], abs=1e-12)
    assert got["grad_predictiveness"] == pytest.approx(2.0, abs=1e-12)
    assert got["loss_variation"] == pytest.approx(1.0, abs=1e-12)
    assert got["beta_smoothness"] == pytest.approx(2 / math.pi, abs=1e-12)


class RecordingBackend:
    """Backend.gradient with every call's noise recorded: activations and grads that say nothing, the noise that
    came with each call in `calls`."""

    def __init__(self):
        self.calls = []

    def gradient(self, params, images, labels, capture=False, noise=None):
        from common.interface import Gradient

        self.calls.append((capture, noise))
        grads = {n: np.ones_like(v) for n, v in params.items()}
        activations = {"conv1": np.zeros((len(images), 2, 2, 2))} if capture else {}
        return Gradient(loss=1.0, grads=grads, activations=activations)


def test_every_forward_of_a_traced_step_carries_that_steps_noise():
    """A noisy run's trace is of the step the run takes, noise included: the percentiles' forward too, not only
    the gradients (a traced step's activations without its noise would show plain BN's)."""
    backend = RecordingBackend()
    params = {"conv1.weight": np.ones(2), "conv2.weight": np.ones(3)}
    step_noise = {"bn1": (np.array([1.5, 1.2]), np.array([0.1, -0.3]))}
    trace.measure(backend, params, (np.zeros((4, 1)), np.zeros(4)), np.zeros((3, 1)), 0.1, step_noise)
    assert [capture for capture, _ in backend.calls].count(True) == 1  # the percentiles' forward
    assert len(backend.calls) == 2 + 1 + len(trace.STEP_SCALES)  # probe, G, conv2's G', one per scale
    assert all(noise is step_noise for _, noise in backend.calls), [n for _, n in backend.calls]


def test_landscape_at_a_stationary_point_has_no_smoothness_figure():
    def gradient(p):
        return 1.0, {"fc3.weight": np.zeros(1)}

    got = trace.landscape(gradient, {"fc3.weight": np.ones(1)}, 1.0, {"fc3.weight": np.zeros(1)}, lr=0.1)
    assert got["loss_variation"] == 0 and got["grad_predictiveness"] == 0 and got["beta_smoothness"] is None


@pytest.mark.parametrize("side", [3, 4], ids=["odd", "even"])
def test_percentiles_pool_every_unit_and_follow_one(side):
    """(N, C, H, W) = (101, 2, side, side): channel 0 at the unit (side // 2, side // 2), the centre of an odd map
    and the first past it on an even one (BN-LeNet's maps are even: 24 x 24 and 8 x 8 at 28 x 28), holds
    0 ... 100, so its percentiles are 15, 50, 85; everything else is 1000, so over all units they are those of the
    pooled values."""
    h = np.full((101, 2, side, side), 1000.0)
    h[:, 0, side // 2, side // 2] = np.arange(101)
    got = trace.percentiles({"conv1": h, "fc1": np.arange(20.0).reshape(10, 2)})
    assert got["conv1"]["unit"] == [15.0, 50.0, 85.0]
    assert got["conv1"]["all"] == [float(v) for v in np.percentile(h, [15, 50, 85])]
    assert got["fc1"]["unit"] == [float(v) for v in np.percentile(np.arange(0.0, 20, 2), [15, 50, 85])]


def test_steps_are_traced_every_k_across_epochs():
    tracer = trace.Tracer(None, RunConfig(trace_every=5), None, None, None)
    assert tracer.due(1, 12) == {0, 5, 10} and tracer.due(2, 12) == {3, 8}  # steps 15 and 20 of the run


def test_trace_every_is_checked_and_leaves_earlier_ids_alone():
    with pytest.raises(ConfigError, match=r"trace_every \(--trace-every\) must be an integer >= 0"):
        RunConfig(trace_every=-1)
    off = RunConfig()
    assert "trace_every" in off.to_dict() and RunConfig(trace_every=3).config_id != off.config_id
    # the id of a config without it is the hash it had before the field existed
    import hashlib
    import json

    late = {name.removeprefix("model.") for name in LATE_FIELDS}  # this field and those added after it
    before = {k: v for k, v in off.to_dict().items() if k not in late}
    # and the renamed fields by the names they had then (STORED_NAMES)
    before["model"] = {STORED_NAMES.get(k, k): v for k, v in before["model"].items() if k not in late}
    assert {"trace_every", "norm_noise"} <= late
    assert off.config_id == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert RunConfig(model=ModelSpec(norm_noise=True)).config_id != off.config_id


def test_noise_draws_are_seeded_bounded_and_exact_at_one_and_zero():
    spec = ModelSpec(norm_noise=True, noise_scale=1.5, noise_shift=0.25, norm_positions=("conv2", "fc1"))
    a = norms.draw_noise(spec, seed=3, epoch=2, steps=5, dtype="float64")
    assert sorted(a) == ["bn2", "bn3"] and a["bn2"][0].shape == (5, 16) and a["bn3"][1].shape == (5, 120)
    for scales, shifts in a.values():
        assert 1 <= scales.min() and scales.max() <= 1.5 and -0.25 <= shifts.min() and shifts.max() <= 0.25
        assert scales.std() > 0.1 and shifts.std() > 0.1  # it moves, step by step and channel by channel
    again = norms.draw_noise(spec, seed=3, epoch=2, steps=5, dtype="float64")
    assert all(np.array_equal(a[n][i], again[n][i]) for n in a for i in (0, 1))  # what every framework gets
    other = norms.draw_noise(spec, seed=3, epoch=3, steps=5, dtype="float64")
    assert not np.array_equal(a["bn2"][0], other["bn2"][0])  # a new draw every epoch
    flat = norms.draw_noise(ModelSpec(norm_noise=True, noise_scale=1.0, noise_shift=0.0), 0, 1, 4)
    assert all(np.all(s == 1) and np.all(m == 0) for s, m in flat.values())
    assert norms.draw_noise(ModelSpec(), 0, 1, 4) == {} and norms.noise_at({}, 0) is None


def test_the_papers_form_draws_per_example_around_a_centre_and_spread_that_move():
    """--noise-form example: (steps, batch, channels); per step and channel a centre as the channel form's, per
    step a spread w in [0, 1/2], per example s = 1 + (s0 - 1) U(1 - w, 1 + w) and m = m0 + U(-w b, w b). Over 200
    steps of 64 examples and 16 channels the means are E[s] = (1 + a) / 2 = 2 and E[m] = 0 (within 5 standard errors
    of the centres, 0.0102 each: the centres, 3,200 of them, carry the variance); a = 1, b = 0 is exact."""
    spec = ModelSpec(norm_noise=True, noise_form="example", noise_scale=3.0, noise_shift=1.0, norm_positions=("conv2",))
    scales, shifts = norms.draw_noise(spec, seed=1, epoch=1, steps=200, dtype="float64", batch=64)["bn2"]
    assert scales.shape == shifts.shape == (200, 64, 16)
    assert abs(scales.mean() - 2.0) < 0.05 and abs(shifts.mean()) < 0.05
    assert 1 <= scales.min() and scales.max() <= 4 and np.abs(shifts).max() <= 1.5
    spread = ((scales.max(axis=1) - 1) / (scales.min(axis=1) - 1)).mean(axis=1)  # per step: (1 + w) / (1 - w)
    assert spread.min() < 1.2 and spread.max() > 2.0  # the spread changes from step to step
    assert np.all(scales.std(axis=1) > 0)  # every example its own draw
    flat = ModelSpec(norm_noise=True, noise_form="example", noise_scale=1.0, noise_shift=0.0)
    assert all(np.all(s == 1) and np.all(m == 0) for s, m in norms.draw_noise(flat, 0, 1, 3, batch=4).values())


def test_eval_mode_folds_the_noise_expectation_into_gamma_and_beta():
    """a = 3, b = 0.5: E[s] = 2, E[m] = 0; gamma (2, 0.5) -> (4, 1), beta (1, -1) -> (2, -2); the weights, the
    running statistics and the layers without noise stay as they are; a = 1, b = 0 is the identity, bit for bit."""
    spec = ModelSpec(norm_noise=True, noise_scale=3.0, noise_shift=0.5, norm_positions=("conv1",))
    params = {
        "conv1.weight": np.ones(2),
        "bn1.gamma": np.array([2.0, 0.5]),
        "bn1.beta": np.array([1.0, -1.0]),
        "bn1.running_var": np.array([3.0, 4.0]),
    }
    folded = norms.noise_folded(params, spec)
    assert folded["bn1.gamma"].tolist() == [4.0, 1.0] and folded["bn1.beta"].tolist() == [2.0, -2.0]
    assert folded["conv1.weight"] is params["conv1.weight"] and folded["bn1.running_var"] is params["bn1.running_var"]
    flat = norms.noise_folded(params, ModelSpec(norm_noise=True, noise_scale=1.0, noise_shift=0.0))
    assert all(np.array_equal(flat[k], v) for k, v in params.items())
    # without noise the evaluation option means nothing, so it leaves every earlier id as it was
    assert ModelSpec(noise_eval="expectation") == ModelSpec(noise_eval="none") == ModelSpec()
    # a noisy configuration stored before the option existed evaluated without the noise, and reads back so
    stored = RunConfig(model=ModelSpec(norm_noise=True, noise_eval="none")).to_dict()
    del stored["model"]["noise_eval"], stored["model"]["noise_form"]
    assert RunConfig.from_dict(stored).model.noise_eval == "none"
    assert (
        RunConfig.from_dict(stored).config_id
        == RunConfig(model=ModelSpec(norm_noise=True, noise_eval="none")).config_id
    )
    assert (
        RunConfig(model=ModelSpec(norm_noise=True)).config_id
        != RunConfig(model=ModelSpec(norm_noise=True, noise_eval="none")).config_id
    )


def test_the_papers_form_refuses_what_its_per_example_noise_cannot_fit():
    example = ModelSpec(norm_noise=True, noise_form="example")
    with pytest.raises(ConfigError, match="--noise-form example draws noise per example of the training batch"):
        RunConfig(model=example, trace_every=5)
    with pytest.raises(ConfigError, match="--noise-form example with --replicas is not supported"):
        RunConfig(model=example, replicas=2)
    with pytest.raises(ConfigError, match="unknown noise_form 'pixel'"):
        ModelSpec(norm_noise=True, noise_form="pixel")


def test_noise_needs_a_normalisation_and_sane_bounds():
    with pytest.raises(ConfigError, match="adds noise after each normalisation layer, and this model has none"):
        ModelSpec(variant="none", norm_noise=True)
    with pytest.raises(ConfigError, match=r"noise_scale \(--noise-scale\) must be a number >= 1"):
        ModelSpec(norm_noise=True, noise_scale=0.5)
    with pytest.raises(ConfigError, match=r"noise_shift \(--noise-shift\) must be a number >= 0"):
        ModelSpec(noise_shift=-1.0)


# each framework ---------------------------------------------------------------------------------------------
SPECS = {
    "scratch": ModelSpec(variant="scratch", dropout=0.3),
    "builtin": ModelSpec(variant="builtin", dropout=0.3, activation="relu"),
    "none": ModelSpec(variant="none", dropout=0.3),
    "frozen": ModelSpec(variant="scratch", freeze_gamma_beta=True, norm_placement="after_activation"),
}


def _batch(n=6, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(size=(n, 1, 28, 28)), rng.randint(0, 10, n)


@pytest.mark.parametrize("name", list(SPECS))
def test_gradient_matches_finite_differences(fw, framework, name):
    """float64, dropout in the spec (the gradient runs without it, or the differences would be noise): the
    gradient of a few coordinates of every trainable array against central differences of the loss."""
    spec = SPECS[name]
    backend = fw.BACKEND(RunConfig(model=spec, dtype="float64", device="cpu", lr=0.5))
    params = random_bn_params(spec)
    images, labels = _batch()
    got = backend.gradient(params, images, labels)
    trainable = [n for n in parameter_shapes(spec) if is_trainable(n, spec)]
    assert sorted(got.grads) == sorted(trainable), f"{framework}: the trainable parameters, no more"
    rng = np.random.RandomState(1)
    for name_ in trainable:
        for _ in range(2):
            index = tuple(rng.randint(s) for s in params[name_].shape)
            plus, minus = dict(params), dict(params)
            step = 1e-6
            plus[name_], minus[name_] = params[name_].copy(), params[name_].copy()
            plus[name_][index] += step
            minus[name_][index] -= step
            numeric = (backend.gradient(plus, images, labels).loss - backend.gradient(minus, images, labels).loss) / (
                2 * step
            )
            assert got.grads[name_][index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (
                f"{framework} {name}: d loss / d {name_}{list(index)}"
            )


def flat_state(saved, prefix="") -> dict:
    """A backend's save_state() (framework tensors, numpy arrays, nested dicts) as {path: numpy array}."""
    if isinstance(saved, dict):
        return {k: v for key, value in saved.items() for k, v in flat_state(value, f"{prefix}{key}/").items()}
    return {prefix: np.asarray(saved)}


@pytest.mark.parametrize("variant", ["scratch", "builtin"])
def test_gradient_changes_no_state_and_captures_each_activation_input(fw, framework, variant):
    """The model's arrays bit-identical after gradient() at other parameters, every state a forward can touch
    (save_state: PyTorch's num_batches_tracked of its built-in layer, which no canonical array holds and
    checkpoints do) as the twin's that never called it, eval mode's logits right after it as before it, and the
    next training step the same as the twin's. With BN before the activation and gamma 1, beta 0, each captured
    activation input has per channel the batch mean 0 and variance var / (var + eps), just under 1."""
    spec = ModelSpec(variant=variant)
    config = RunConfig(model=spec, dtype="float64", device="cpu", lr=0.5, batch_size=8)
    backend, twin = fw.BACKEND(config), fw.BACKEND(config)
    start = random_bn_params(spec)
    for b in (backend, twin):
        b.set_params(start)
    images, labels = _batch(16)
    before = backend.predict(images)
    got = backend.gradient(init_params(spec, 7, "float64"), images, labels, capture=True)
    np.testing.assert_array_equal(backend.predict(images), before, err_msg=f"{framework}: eval mode after gradient()")
    for name, value in backend.get_params().items():
        np.testing.assert_array_equal(value, start[name], err_msg=f"{framework}: {name} changed by gradient()")
    mine, theirs = flat_state(backend.save_state()), flat_state(twin.save_state())
    assert sorted(mine) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(mine[name], value, err_msg=f"{framework}: state {name} changed by gradient()")
    assert {k: v.shape for k, v in got.activations.items()} == {
        "conv1": (16, 6, 24, 24),
        "conv2": (16, 16, 8, 8),
        "fc1": (16, 120),
        "fc2": (16, 84),
    }
    for pos, h in got.activations.items():
        axes = tuple(a for a in range(h.ndim) if a != 1)
        np.testing.assert_allclose(h.mean(axis=axes), 0, atol=1e-9, err_msg=f"{framework} {pos}")
        variance = h.var(axis=axes)  # var / (var + eps) of the layer's input: 0.99 and more here
        assert np.all((variance > 0.99) & (variance <= 1)), f"{framework} {pos}: not BN's output ({variance})"
    order = np.arange(16).reshape(2, 8)
    steps = []
    for b in (backend, twin):
        data, o = b.put(images, labels), b.put_order(order)
        steps.append(b.reduce_stats([b.train_step(data, o, 0)]))
    np.testing.assert_array_equal(steps[0], steps[1])
    for name, value in backend.get_params().items():
        np.testing.assert_array_equal(value, twin.get_params()[name], err_msg=f"{framework}: {name} after a step")


@pytest.fixture
def tiny(tmp_path):
    make_idx_dir(tmp_path, 192, 48)
    return load_fashion_mnist(tmp_path, verify=False, dtype="float64")


def _run(fw, dataset, model=None, **kw):
    config = tiny_config(model=model or ModelSpec(dropout=0.3), eval_batch_size=48, population_size=0, **kw)
    return epochs_of(fw.BACKEND, config, dataset)


def test_a_traced_run_trains_bit_for_bit_as_an_untraced_one(fw, framework, tiny):
    """float64 with dropout (a random stream): tracing every 4th step changes no loss, accuracy, probe or
    parameter; the traces are in the records (6 steps an epoch: steps 0 and 4 of the run in epoch 1, step 8 in
    epoch 2), with their own time."""
    off, on = _run(fw, tiny), _run(fw, tiny, trace_every=4)
    for (a, arrays_a), (b, arrays_b) in zip(off, on):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "step_losses", "probe_logit_mad"):
            assert a[key] == b[key], f"{framework} epoch {a['epoch']}: {key} changed by tracing"
        for name, value in arrays_a.items():
            np.testing.assert_array_equal(arrays_b[name], value, err_msg=f"{framework} {name}")
        assert "trace" not in a
    first, second = on[0][0], on[1][0]
    assert [t["step"] for t in first["trace"]] == [0, 4] and [t["step"] for t in second["trace"]] == [8]
    t = first["trace"][0]
    assert set(t["percentiles"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert set(t["ics"]) == {"conv2", "fc1", "fc2", "fc3"}
    assert t["loss"] == pytest.approx(math.log(10), abs=0.5) and t["grad_norm"] > 0
    assert t["landscape"]["loss_variation"] > 0 and t["landscape"]["beta_smoothness"] > 0
    assert first["trace_seconds"] == pytest.approx(sum(x["seconds"] for x in first["trace"]))
    assert first["trace_seconds"] > 0


@pytest.mark.parametrize("variant", ["scratch", "builtin"])
@pytest.mark.parametrize("execution", ["eager", "default"])
def test_noise_of_one_and_zero_is_plain_bn_and_real_noise_changes_training(fw, framework, tiny, variant, execution):
    """--norm-noise with a = 1, b = 0 trains as plain BN: bit for bit op by op (eager; the noise enters the step
    as h * 1 + 0, which is exact), and within 1e-12 relative in each framework's default mode (measured: bit
    for bit in PyTorch and Gluon; under XLA, TensorFlow's and JAX's, the two extra ops change how the step is
    fused, and the losses part in the 16th digit). The default a = 2, b = 1 changes every step's loss."""
    spec, run = dict(variant=variant, dropout=0.0), dict(execution=execution)
    plain = _run(fw, tiny, model=ModelSpec(**spec), **run)
    flat = _run(fw, tiny, model=ModelSpec(**spec, norm_noise=True, noise_scale=1.0, noise_shift=0.0), **run)
    noisy = _run(fw, tiny, model=ModelSpec(**spec, norm_noise=True), **run)
    for (a, arrays_a), (b, arrays_b) in zip(plain, flat):
        if execution == "eager" or framework in ("torch", "mxnet"):
            assert a["step_losses"] == b["step_losses"] and a["test_acc"] == b["test_acc"], framework
            for name, value in arrays_a.items():
                np.testing.assert_array_equal(arrays_b[name], value, err_msg=f"{framework} {name}: a=1, b=0")
        else:
            np.testing.assert_allclose(b["step_losses"], a["step_losses"], rtol=1e-12, atol=0, err_msg=framework)
            for name, value in arrays_a.items():
                np.testing.assert_allclose(arrays_b[name], value, rtol=1e-12, atol=1e-14, err_msg=f"{framework} {name}")
    steps = [(p["step_losses"], n["step_losses"]) for (p, _), (n, _) in zip(plain, noisy)]
    assert all(x != y for pl, no in steps for x, y in zip(pl, no)), f"{framework}: noise left a step's loss alone"


@pytest.mark.parametrize("form", ["channel", "example"])
def test_a_noisy_step_is_the_reference_step(fw, framework, form):
    """One float64 SGD step with noise: the parameters after it equal gradient() at the same parameters with the
    step's noise, followed by the SGD update in numpy (the noise is where the spec puts it, in both); per channel,
    and per example and channel (the paper's form)."""
    spec = ModelSpec(norm_noise=True, norm_placement="after_activation", noise_form=form)
    config = RunConfig(model=spec, dtype="float64", device="cpu", lr=0.5, batch_size=8)
    backend = fw.BACKEND(config)
    start = random_bn_params(spec)
    backend.set_params(start)
    images, labels = _batch(8)
    noise = norms.draw_noise(spec, 0, 1, 1, "float64", batch=8)
    expected = backend.gradient(start, images, labels, noise=norms.noise_at(noise, 0))
    backend.put_noise(noise)
    backend.reduce_stats([backend.train_step(backend.put(images, labels), backend.put_order(np.arange(8)[None]), 0)])
    after = backend.get_params()
    for name, grad in expected.grads.items():
        np.testing.assert_allclose(after[name], start[name] - 0.5 * grad, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("form", ["channel", "example"])
def test_a_noisy_run_is_evaluated_with_the_noise_expectation(fw, framework, tiny, form):
    """a = 3, b = 0.5 (E[s] = 2): the probe's eval-mode logits are the float64 reference's eval forward of the
    snapshot's parameters with gamma and beta scaled by 2 (--noise-eval expectation, the default), and of the
    snapshot's own parameters with --noise-eval none; the snapshot holds the trained gamma either way."""
    from common.data import probe_indices
    from common.reference import lenet_forward

    for noise_eval in ("expectation", "none"):
        spec = ModelSpec(norm_noise=True, noise_scale=3.0, noise_shift=0.5, noise_form=form, noise_eval=noise_eval)
        record, arrays = _run(fw, tiny, model=spec, epochs=1)[-1]
        params = {k.removeprefix("param/"): v for k, v in arrays.items() if k.startswith("param/")}
        used = norms.noise_folded(params, spec) if noise_eval == "expectation" else params
        probe = tiny.test_images[probe_indices(len(tiny.test_labels), 16)]
        want, _ = lenet_forward(used, spec, probe, training=False)
        np.testing.assert_allclose(
            arrays["probe/logits_eval"], want, rtol=1e-9, atol=1e-9, err_msg=f"{framework} {form} {noise_eval}"
        )
        assert np.max(np.abs(params["bn1.gamma"] - 1)) < 0.5  # trained from 1, not doubled


# the report's tables and plots, framework-free ------------------------------------------------------------
def _trace_record(step, scale):
    return {
        "step": step,
        "epoch": 1,
        "loss": 2.0 - step / 100,
        "grad_norm": scale,
        "percentiles": {pos: {"all": [-scale, 0.0, scale], "unit": [-1.0, 0.0, 1.0]} for pos in ("conv1", "fc2")},
        "ics": {"conv2": {"rel_diff": 0.1 * scale, "cos": 0.9}, "fc3": {"rel_diff": 0.3 * scale, "cos": 0.5}},
        "landscape": {"loss_variation": scale, "grad_predictiveness": 2 * scale, "beta_smoothness": 3 * scale},
        "seconds": 0.5,
    }


def test_trace_tables_means_and_figures():
    """Two runs (BN and none) of two traced steps each: the tables hold a row per step and layer (percentiles
    for conv1 and fc2, ICS for conv2 and fc3), the runs' means are the plain means, and the figures have a row
    per position (percentiles) or layer (ICS) or measure (landscape), a column per arm, one y range per row."""
    import pandas as pd

    from compare.reporting import plots, tables

    epochs = pd.DataFrame(
        [
            {
                "framework": "torch",
                "variant": v,
                "seed": 0,
                "config_id": v,
                "trace": [_trace_record(0, k), _trace_record(4, 3 * k)],
            }
            for v, k in (("scratch", 1.0), ("none", 2.0))
        ]
    )
    layers, steps = tables.trace_tables(epochs)
    assert len(steps) == 4 and len(layers) == 4 * 4
    assert set(layers.layer) == {"conv1", "fc2", "conv2", "fc3"}
    assert (
        layers[(layers.layer == "conv1")].ics_rel_diff.isna().all() and layers[layers.layer == "fc3"].p50.isna().all()
    )
    means = tables._trace_metrics(layers, steps).set_index("config_id")
    assert means.loc["scratch", "mean_loss_variation"] == pytest.approx(2.0)  # (1 + 3) / 2
    assert means.loc["none", "mean_ics_rel_diff"] == pytest.approx((0.2 + 0.6 + 0.6 + 1.8) / 4)
    assert means.loc["scratch", "mean_ics_cos"] == pytest.approx(0.7)
    figs = plots.trace_figures(layers, steps)
    assert sorted(figs) == ["activations.png", "ics.png", "landscape.png"]
    for name, rows in (("activations.png", 2), ("ics.png", 2), ("landscape.png", 3)):
        axes = figs[name].axes
        assert len(axes) == rows * 2, name  # two arms side by side
        assert [a.get_title() for a in axes[:2]] == ["scratch", "none"], name
        for row in range(rows):
            assert axes[2 * row].get_ylim() == axes[2 * row + 1].get_ylim(), f"{name}: one y range per row"
    # each band: the 15th-85th percentiles around the median
    band = figs["activations.png"].axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(-3.0) and band.max() == pytest.approx(3.0)
