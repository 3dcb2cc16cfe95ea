"""One body per behaviour, run once per framework (--framework / tox -e NAME).

Expected values come from common.reference in float64.
"""

import numpy as np
import pytest

from common.config import EXECUTIONS, ModelSpec, RunConfig
from common.data import batch_order, load_fashion_mnist
from common.errors import BackendUnavailable, NonFiniteError
from common.harness import run_batch_norm
from common.init import init_params
from common.loop import run as run_loop
from common.reference import batch_norm_backward, batch_norm_forward, lenet_forward
from tests.conventions import BUILTIN, CENTRED_RESIDUAL, EXECUTION_NAMES, FAR_FROM_ZERO_ATOL, FLOAT32, FLOAT64
from tests.helpers import make_idx_dir, random_bn_params

TOL = {"float32": FLOAT32, "float64": FLOAT64}


def bn_inputs(shape, seed=0, loc=0.5, scale=2.0):
    rng = np.random.RandomState(seed)
    c = shape[1]
    return dict(
        x=rng.normal(loc, scale, shape),
        gamma=rng.uniform(0.5, 1.5, c),
        beta=rng.normal(0, 0.5, c),
        running_mean=rng.normal(0, 1, c),
        running_var=rng.uniform(0.5, 2, c),
        dy=rng.normal(0, 1, shape),
    )


def call(harness, kind, inputs, dtype, training, decay=0.9, epsilon=1e-5):
    cast = {k: v.astype(dtype) for k, v in inputs.items()}
    return run_batch_norm(
        harness,
        kind,
        cast["x"],
        cast["gamma"],
        cast["beta"],
        cast["running_mean"],
        cast["running_var"],
        cast["dy"],
        training=training,
        decay=decay,
        epsilon=epsilon,
        dtype=dtype,
    )


def expected(inputs, training, decay=0.9, epsilon=1e-5):
    y, rm, rv, cache = batch_norm_forward(
        inputs["x"],
        inputs["gamma"],
        inputs["beta"],
        inputs["running_mean"],
        inputs["running_var"],
        training=training,
        decay=decay,
        epsilon=epsilon,
    )
    dx, dgamma, dbeta = batch_norm_backward(inputs["dy"], cache)
    return dict(y=y, dx=dx, dgamma=dgamma, dbeta=dbeta, running_mean=rm, running_var=rv)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(16, 7), (6, 3, 5, 4)], ids=["2d", "4d"])
def test_scratch_bn_matches_reference(harness, framework, shape, training, dtype):
    inputs = bn_inputs(shape)
    got, want = call(harness, "scratch", inputs, dtype, training), expected(inputs, training)
    for name in ("y", "dx", "dgamma", "dbeta"):
        np.testing.assert_allclose(
            getattr(got, name),
            want[name],
            **TOL[dtype],
            err_msg=f"{framework} scratch {name} {dtype} training={training}",
        )
    for name, key in (
        ("mean_after_forward", "running_mean"),
        ("var_after_forward", "running_var"),
        ("mean_after_backward", "running_mean"),
        ("var_after_backward", "running_var"),
    ):
        np.testing.assert_allclose(
            getattr(got, name),
            want[key],
            **TOL[dtype],
            err_msg=f"{framework} scratch {name} {dtype} training={training}",
        )
    if training:  # the update really happened (the textbook's TF slip: it never did)
        assert not np.allclose(got.var_after_forward, inputs["running_var"].astype(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_scratch_bn_far_from_zero_mean(harness, framework, dtype):
    inputs = bn_inputs((32, 4, 3, 3), loc=1000.0, scale=1.0)
    got, want = call(harness, "scratch", inputs, dtype, True), expected(inputs, True)
    atol = FLOAT64["atol"] * 1e3 if dtype == "float64" else FAR_FROM_ZERO_ATOL[framework]
    np.testing.assert_allclose(got.y, want["y"], rtol=0, atol=atol, err_msg=f"{framework} y, mean 1000, {dtype}")
    np.testing.assert_allclose(
        got.var_after_backward,
        want["running_var"],
        rtol=1e-4 if dtype == "float32" else 1e-10,
        err_msg=f"{framework} running var, mean 1000, {dtype}",
    )


def test_scratch_bn_centres_before_scaling(harness, framework):
    """Within a channel, the float32 error of y far from zero is only y's own rounding.

    (x - mean) is exact when x and mean are that close, so the batch mean's accumulation
    error and the variance's error move a whole channel together (an offset and a scale,
    fitted out below). TensorFlow's fused x * inv + (beta - mean * inv) rounds x * inv,
    about 1000 here, in every element: a residual of ~6e-5 against ~3e-7 (measured).
    """
    inputs = bn_inputs((32, 4, 3, 3), loc=1000.0, scale=1.0)
    rounded = {k: v.astype(np.float32).astype(np.float64) for k, v in inputs.items()}  # what the layer sees
    got, want = call(harness, "scratch", inputs, "float32", True), expected(rounded, True)
    error = got.y.astype(np.float64) - want["y"]
    for channel in range(error.shape[1]):
        y, e = want["y"][:, channel].ravel(), error[:, channel].ravel()
        fit = np.stack([np.ones_like(y), y], axis=1)
        residual = e - fit @ np.linalg.lstsq(fit, e, rcond=None)[0]
        assert np.abs(residual).max() < CENTRED_RESIDUAL, (
            f"{framework} scratch BN, channel {channel}: per-element float32 error {np.abs(residual).max():.1e} "
            f"beyond a per-channel offset and scale; does the layer compute x * inv + (beta - mean * inv)?"
        )


def test_scratch_bn_bad_input(harness, framework):
    inputs = bn_inputs((4, 3, 5))
    with pytest.raises(ValueError, match="2-D .* or 4-D"):
        call(harness, "scratch", inputs, "float32", True)
    one = bn_inputs((1, 3))
    with pytest.raises(ValueError, match="more than one value per channel"):
        call(harness, "scratch", one, "float32", True)
    with pytest.raises(ValueError, match="more than one value per channel"):
        call(harness, "scratch", bn_inputs((1, 3, 1, 1)), "float32", True)
    # eval mode normalises a single example with the running statistics: no error
    got = call(harness, "scratch", one, "float64", False)
    np.testing.assert_allclose(got.y, expected(one, False)["y"], **FLOAT64, err_msg=f"{framework} single-example eval")


@pytest.mark.parametrize("shape", [(16, 7), (8, 3, 4, 4)], ids=["2d", "4d"])
def test_builtin_layer_conventions(harness, framework, shape):
    """builtin agrees with scratch on y and gradients; its running variance and the moment it
    updates follow the table in tests/conventions.py."""
    conv = BUILTIN[framework]
    inputs = bn_inputs(shape)
    decay = float(np.dtype(conv["decay_dtype"]).type(0.9))
    got, want = call(harness, "builtin", inputs, "float64", True), expected(inputs, True, decay=decay)
    for name in ("y", "dx", "dgamma", "dbeta"):
        np.testing.assert_allclose(
            getattr(got, name), want[name], rtol=1e-9, atol=1e-10, err_msg=f"{framework} builtin {name}"
        )
    n = inputs["x"].size // shape[1]
    batch_var = want["running_var"] - decay * inputs["running_var"]  # (1 - decay) * biased var
    factor = n / (n - 1) if conv["running_var"] == "unbiased" else 1.0
    expected_var = decay * inputs["running_var"] + batch_var * factor
    np.testing.assert_allclose(
        got.var_after_backward,
        expected_var,
        rtol=1e-10,
        err_msg=f"{framework} builtin running var ({conv['running_var']})",
    )
    np.testing.assert_allclose(
        got.mean_after_backward, want["running_mean"], rtol=1e-10, err_msg=f"{framework} builtin running mean"
    )
    if conv["updated_in"] == "forward":
        np.testing.assert_allclose(got.var_after_forward, expected_var, rtol=1e-10)
    else:  # running statistics untouched by the forward alone
        np.testing.assert_array_equal(got.var_after_forward, inputs["running_var"])
        np.testing.assert_array_equal(got.mean_after_forward, inputs["running_mean"])


def test_builtin_defaults(fw, harness, framework):
    decay, epsilon = BUILTIN[framework]["defaults"]
    inputs = bn_inputs((16, 5))
    got = call(harness, "builtin-defaults", inputs, "float64", True, decay=0.5, epsilon=0.5)  # both ignored
    want = expected(inputs, True, decay=float(np.dtype(BUILTIN[framework]["decay_dtype"]).type(decay)), epsilon=epsilon)
    np.testing.assert_allclose(got.y, want["y"], rtol=1e-9, err_msg=f"{framework} default epsilon {epsilon}")
    np.testing.assert_allclose(
        got.mean_after_backward, want["running_mean"], rtol=1e-10, err_msg=f"{framework} default decay {decay}"
    )
    backend = fw.BACKEND(RunConfig(model=ModelSpec(variant="builtin-defaults"), device="cpu"))
    assert (backend.describe()["bn_decay"], backend.describe()["bn_epsilon"]) == pytest.approx((decay, epsilon))


# BN-LeNet ----------------------------------------------------------------------
SPECS = {
    "default": ModelSpec(),
    "builtin": ModelSpec(variant="builtin"),
    "none": ModelSpec(variant="none"),
    "knobs": ModelSpec(
        bias_before_norm=False,
        norm_positions=("conv2", "fc1"),
        activation="relu",
        pooling="max",
        norm_placement="after_activation",
        input_size=32,
    ),
    # the textbook's second configuration's input (--image-size 96): fc1 takes 16 x 21 x 21 = 7,056 inputs
    "96x96": ModelSpec(image_size=96, variant="builtin"),
}


def backend_for(fw, spec, dtype="float64", device="cpu", **kw):
    return fw.BACKEND(RunConfig(model=spec, dtype=dtype, device=device, **kw))


@pytest.mark.parametrize("name", list(SPECS))
def test_lenet_logits_match_reference(fw, framework, name):
    spec = SPECS[name]
    params = random_bn_params(spec)
    backend = backend_for(fw, spec)
    backend.set_params(params)
    x = np.random.RandomState(5).uniform(size=(24, 1, spec.side, spec.side))
    want_eval, _ = lenet_forward(params, spec, x, training=False)
    want_train, stats = lenet_forward(params, spec, x, training=True)
    np.testing.assert_allclose(
        backend.predict(x), want_eval, rtol=1e-9, atol=1e-10, err_msg=f"{framework} {name} eval logits"
    )
    probe = backend.probe(x)
    np.testing.assert_allclose(
        probe.logits_eval, want_eval, rtol=1e-9, atol=1e-10, err_msg=f"{framework} {name} probe eval logits"
    )
    np.testing.assert_allclose(
        probe.logits_train, want_train, rtol=1e-9, atol=1e-10, err_msg=f"{framework} {name} probe train logits"
    )
    assert sorted(probe.norms) == sorted(stats)
    for layer, s in stats.items():
        np.testing.assert_allclose(
            probe.norms[layer]["batch_mean"],
            s["batch_mean"],
            rtol=1e-9,
            atol=1e-12,
            err_msg=f"{framework} {layer} batch mean",
        )
        np.testing.assert_allclose(
            probe.norms[layer]["batch_var"], s["batch_var"], rtol=1e-9, err_msg=f"{framework} {layer} batch var"
        )
        np.testing.assert_array_equal(probe.norms[layer]["running_var"], params[f"{layer}.running_var"])


def test_float32_logits_match_reference(fw, framework):
    spec = ModelSpec()
    params = random_bn_params(spec, dtype="float32")
    backend = backend_for(fw, spec, "float32")
    backend.set_params(params)
    x = np.random.RandomState(5).uniform(size=(16, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(
        backend.predict(x),
        lenet_forward(params, spec, x, training=False)[0],
        rtol=1e-4,
        atol=1e-5,
        err_msg=f"{framework} float32 logits",
    )


# Mode and state ----------------------------------------------------------------
def _equal_params(a, b, framework, what):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{framework}: {k} changed by {what}")


@pytest.fixture
def trained(fw):
    spec = ModelSpec()
    backend = backend_for(fw, spec, "float64", lr=0.5, batch_size=8)
    backend.set_params(random_bn_params(spec))
    rng = np.random.RandomState(0)
    images, labels = rng.uniform(size=(32, 1, 28, 28)), rng.randint(0, 10, 32)
    return backend, images, labels


def test_eval_and_probe_change_nothing(fw, framework, trained):
    backend, images, labels = trained
    before = backend.get_params()
    data = backend.put(images, labels)
    backend.evaluate(data, 10)
    backend.predict(images)
    backend.probe(images)
    backend.probe(images[:5])
    _equal_params(before, backend.get_params(), framework, "evaluate/predict/probe")


def test_probe_leaves_training_unchanged(fw, framework, trained):
    """A probe between two steps changes neither state nor the next step's result."""
    backend, images, labels = trained
    other = backend_for(fw, ModelSpec(), "float64", lr=0.5, batch_size=8)
    other.set_params(backend.get_params())
    order = np.arange(16).reshape(2, 8)
    results = []
    for b, do_probe in ((backend, True), (other, False)):
        data, o = b.put(images, labels), b.put_order(order)
        s0 = b.train_step(data, o, 0)
        if do_probe:
            b.probe(images)
        s1 = b.train_step(data, o, 1)
        results.append((b.reduce_stats([s0]), b.reduce_stats([s1]), b.get_params()))
    np.testing.assert_array_equal(results[0][1], results[1][1], err_msg=f"{framework} step after probe")
    _equal_params(results[0][2], results[1][2], framework, "a probe between steps")


def test_training_step_updates_running_statistics_by_the_spec(fw, framework, trained):
    backend, images, labels = trained
    before = backend.get_params()
    data, order = backend.put(images, labels), backend.put_order(np.arange(8).reshape(1, 8))
    backend.train_step(data, order, 0)
    after = backend.get_params()
    spec = ModelSpec()
    _, stats = lenet_forward(before, spec, images[:8], training=True)
    for layer, s in stats.items():
        np.testing.assert_allclose(
            after[f"{layer}.running_mean"],
            s["new_running_mean"],
            rtol=1e-9,
            atol=1e-12,
            err_msg=f"{framework} {layer} running mean after one step",
        )
        np.testing.assert_allclose(
            after[f"{layer}.running_var"],
            s["new_running_var"],
            rtol=1e-9,
            err_msg=f"{framework} {layer} running var after one step",
        )
    assert not np.array_equal(after["conv1.weight"], before["conv1.weight"])


def test_params_round_trip_into_a_new_model(fw, framework, trained):
    backend, images, labels = trained
    data, order = backend.put(images, labels), backend.put_order(np.arange(16).reshape(2, 8))
    backend.train_step(data, order, 0)
    saved = backend.get_params()
    fresh = backend_for(fw, ModelSpec(), "float64")
    fresh.set_params(saved)
    _equal_params(saved, fresh.get_params(), framework, "a set/get round trip")
    np.testing.assert_array_equal(fresh.predict(images), backend.predict(images))
    with pytest.raises(ValueError, match="missing bn1.running_var"):
        fresh.set_params({k: v for k, v in saved.items() if k != "bn1.running_var"})


@pytest.mark.parametrize("variant", ["scratch", "builtin"])
def test_native_checkpoint_keeps_running_statistics(fw, framework, tmp_path, variant):
    """The textbook's slip: running statistics kept as plain attributes vanish from checkpoints."""
    spec = ModelSpec(variant=variant)
    backend = backend_for(fw, spec, "float64", batch_size=8)
    backend.set_params(random_bn_params(spec))
    rng = np.random.RandomState(0)
    data = backend.put(rng.uniform(size=(8, 1, 28, 28)), rng.randint(0, 10, 8))
    backend.train_step(data, backend.put_order(np.arange(8).reshape(1, 8)), 0)
    backend.save(str(tmp_path / "model"))
    fresh = backend_for(fw, spec, "float64")
    fresh.load(str(tmp_path / "model"))
    saved, loaded = backend.get_params(), fresh.get_params()
    assert not np.array_equal(loaded["bn3.running_var"], init_params(spec, 0, "float64")["bn3.running_var"])
    _equal_params(saved, loaded, framework, "a native save/load")


def test_frozen_gamma_beta_stay(fw, framework):
    spec = ModelSpec(freeze_gamma_beta=True)
    backend = backend_for(fw, spec, "float64", batch_size=8)
    params = init_params(spec, 0, "float64")
    backend.set_params(params)
    rng = np.random.RandomState(0)
    data = backend.put(rng.uniform(size=(8, 1, 28, 28)), rng.randint(0, 10, 8))
    backend.train_step(data, backend.put_order(np.arange(8).reshape(1, 8)), 0)
    after = backend.get_params()
    np.testing.assert_array_equal(after["bn1.gamma"], params["bn1.gamma"])
    np.testing.assert_array_equal(after["bn3.beta"], params["bn3.beta"])
    assert not np.array_equal(after["fc1.weight"], params["fc1.weight"])


def test_gpu_without_one_is_a_clear_error(fw, framework):
    try:
        backend_for(fw, ModelSpec(), device="gpu")
    except BackendUnavailable as exc:
        assert "--device" in str(exc)
    else:  # a GPU is present: the backend must really be on it
        assert backend_for(fw, ModelSpec(), device="gpu").describe()["device"] == "gpu"


def test_nan_input_is_reported(fw, framework, tmp_path):
    make_idx_dir(tmp_path, 64, 32)
    ds = load_fashion_mnist(tmp_path, verify=False)
    ds.train_images[3, 0, 5, 5] = np.nan
    config = RunConfig(epochs=1, batch_size=16, device="cpu", probe_size=8)
    with pytest.raises(NonFiniteError, match="training images contain 1 NaN"):
        run_loop(fw.BACKEND, config, ds, lambda *a: None)


def test_execution_modes_train_the_same(fw, framework, tmp_path):
    """Every --execution the framework has: the same per-step float64 losses, evaluation and probe as eager."""
    make_idx_dir(tmp_path, 320, 64)
    ds = load_fashion_mnist(tmp_path, verify=False, dtype="float64")
    runs = {}
    for execution in (e for e in EXECUTIONS if EXECUTION_NAMES[framework][e] is not None):
        config = RunConfig(
            epochs=2,
            batch_size=32,
            lr=0.5,
            dtype="float64",
            device="cpu",
            probe_size=16,
            trace_steps=10,
            execution=execution,
        )
        got = []
        run_loop(fw.BACKEND, config, ds, lambda record, arrays=None: got.append(record))
        assert got[0]["backend"]["execution"] == EXECUTION_NAMES[framework][execution], (
            f"{framework} --execution {execution} runs as {got[0]['backend']['execution']}"
        )
        runs[execution] = [r for r in got if r["kind"] == "epoch"]
    for execution, epochs in runs.items():
        for eager, compiled in zip(runs["eager"], epochs):
            np.testing.assert_allclose(
                compiled["step_losses"],
                eager["step_losses"],
                rtol=1e-10,
                atol=0,
                err_msg=f"{framework} {execution} vs eager per-step losses, epoch {eager['epoch']}",
            )
            for key in ("train_loss", "test_loss", "probe_logit_mad"):
                np.testing.assert_allclose(
                    compiled[key],
                    eager[key],
                    rtol=1e-10,
                    err_msg=f"{framework} {execution} vs eager {key}, epoch {eager['epoch']}",
                )


def test_a_mode_the_framework_lacks_is_a_clear_error(fw, framework):
    missing = [e for e, name in EXECUTION_NAMES[framework].items() if name is None]
    for execution in missing:
        with pytest.raises(
            BackendUnavailable,
            match=f"--execution {execution} is not a mode of this framework; it has default, compiled, eager",
        ):
            backend_for(fw, ModelSpec(), execution=execution)
    if not missing:  # every mode exists: each one builds and says what it runs as
        for execution, name in EXECUTION_NAMES[framework].items():
            assert backend_for(fw, ModelSpec(), execution=execution).describe()["execution"] == name


def test_compiled_run_repeats_bit_for_bit(fw, framework, tmp_path):
    """--execution compiled on the CPU: the same seed gives the same per-step losses and parameters, exactly."""
    make_idx_dir(tmp_path, 320, 64)
    ds = load_fashion_mnist(tmp_path, verify=False, dtype="float64")
    config = RunConfig(
        epochs=1,
        batch_size=32,
        lr=0.5,
        dtype="float64",
        device="cpu",
        probe_size=16,
        trace_steps=10,
        execution="compiled",
    )
    runs = []
    for _ in range(2):
        got = []
        run_loop(fw.BACKEND, config, ds, lambda record, arrays=None: got.append((record, arrays)))
        runs.append(next((r, a) for r, a in got if r["kind"] == "epoch"))
    (first, first_arrays), (second, second_arrays) = runs
    assert first["step_losses"] == second["step_losses"], f"{framework} compiled: per-step losses differ between runs"
    for name, value in first_arrays.items():
        np.testing.assert_array_equal(second_arrays[name], value, err_msg=f"{framework} compiled: {name}")


def test_compiled_evaluate_and_probe_leave_the_training_graph_alone(fw, framework, tmp_path):
    """The classic compiled-graph bug: a graph that captured the training flag or the buffers when it was
    traced. After compiled training steps, evaluate and the probe change no state, and the next training
    step still normalises with batch statistics and updates the running statistics, as eager does."""
    make_idx_dir(tmp_path, 320, 64)
    ds = load_fashion_mnist(tmp_path, verify=False, dtype="float64")
    trained = {}
    for execution in ("eager", "compiled"):
        config = RunConfig(batch_size=32, lr=0.5, dtype="float64", device="cpu", execution=execution)
        backend = fw.BACKEND(config)
        backend.set_params(init_params(config.model, 0, "float64"))
        train, test = backend.put(ds.train_images, ds.train_labels), backend.put(ds.test_images, ds.test_labels)
        order = backend.put_order(batch_order(0, 1, 320, 32))
        for step in range(3):
            backend.train_step(train, order, step)
        before = backend.get_params()
        backend.evaluate(test, 32)
        backend.probe(ds.test_images[:16])
        for name, value in backend.get_params().items():
            np.testing.assert_array_equal(value, before[name], err_msg=f"{execution}: evaluate/probe changed {name}")
        backend.train_step(train, order, 3)
        trained[execution] = backend.get_params()
    moved = [n for n in before if n.endswith(".running_mean") and not np.array_equal(trained["compiled"][n], before[n])]
    assert moved, f"{framework} compiled: the training step after evaluate/probe left the running statistics alone"
    for name, value in trained["eager"].items():
        np.testing.assert_allclose(
            trained["compiled"][name],
            value,
            rtol=1e-10,
            atol=1e-13,
            err_msg=f"{framework} compiled vs eager after evaluate/probe: {name}",
        )
