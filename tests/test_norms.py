"""The normalisations beside BN (common.norms), one body per behaviour, run once per framework.

Each scratch layer (layer, group, instance, renorm) and each built-in layer against the float64
reference of the spec (common.reference): forward, input gradient, gamma/beta gradients and the state
(running statistics, renorm's steps). Property-based (Hypothesis, derandomised and bounded, so a CI run
is reproducible and short) over shapes, batch sizes 1 and 2, offsets far from zero, epsilon, the renorm
limits and schedule, and dtype; plus the harness's own check that a norm without running statistics
has no train/eval divergence at all.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import ModelSpec, RunConfig
from common.data import load_fashion_mnist
from common.errors import BackendUnavailable, ConfigError
from common.init import norm_suffixes
from common.loop import run as run_loop
from common.norms import BUILTIN_KINDS, SCRATCH_KINDS, norm_after
from tests.conventions import NORM_BUILTIN_ATOL, NORM_BUILTIN_DTYPES_MISSING, NORM_BUILTIN_EPSILON
from tests.helpers import check_norm as check
from tests.helpers import expected_norm as expected
from tests.helpers import make_idx_dir

EXAMPLES = settings(
    max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24}


def layer_inputs(shape, spec, seed, offset=0.0, scale=1.0, steps=0):
    """x, dy and the layer's state (canonical suffixes) for one normalisation layer."""
    rng = np.random.RandomState(seed)
    c = shape[1]
    state = {
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.normal(0, 0.5, c),
        "running_mean": offset + rng.normal(0, scale, c),
        "running_var": scale**2 * rng.uniform(0.3, 3, c),
        "steps": np.array([float(steps)]),
    }
    state = {k: v for k, v in state.items() if k in norm_suffixes(spec)}
    return offset + scale * rng.normal(0, 1, shape), rng.normal(0, 1, shape), state


def bound(dtype, offset, scale, values):
    """Round-off bound: a few hundred unit roundoffs of the input's size relative to its spread (what
    centring leaves of |offset| + scale), times the size of the result. Derived, not fitted."""
    magnitude = (abs(offset) + scale) / scale

    def tol(want):
        return {"rtol": 0, "atol": 256 * UNIT_ROUNDOFF[dtype] * magnitude * (1 + values * np.max(np.abs(want)))}

    return tol


@st.composite
def cases(draw):
    norm = draw(st.sampled_from(["layer", "group", "instance", "renorm", "batch"]))
    dims = 4 if norm == "instance" else draw(st.sampled_from([2, 4]))
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 3)) if norm == "group" else draw(st.integers(1, 5))
    spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4))) if dims == 4 else ()
    batch = draw(st.integers(2 if norm in ("renorm", "batch") and dims == 2 else 1, 6))
    training = draw(st.booleans())
    dtype = draw(st.sampled_from(["float64", "float32"]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    offset = scale * draw(st.sampled_from([0.0, 3.0, -100.0] + ([1e4] if dtype == "float64" else [])))
    # one position, conv1 (6 channels): every drawn group count divides it, and instance is allowed there
    spec = ModelSpec(
        norm=norm,
        norm_positions=("conv1",),
        groups=groups if norm == "group" else 2,
        epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        renorm_rmax=draw(st.sampled_from([1.0, 1.5, 3.0])),
        renorm_dmax=draw(st.sampled_from([0.0, 0.5, 5.0])),
        renorm_warmup=draw(st.sampled_from([0, 10])),
        # BN's backward written out (torch, tensorflow, jax) against the reference's, as autodiff's is
        norm_backward="closed-form" if norm == "batch" else "autodiff",
    )
    steps = draw(st.integers(0, 20))
    return spec, (batch, channels) + spatial, training, dtype, offset, scale, steps, draw(st.integers(0, 2**16))


@EXAMPLES
@given(case=cases())
def test_scratch_norm_matches_reference(fw, harness, framework, case):
    spec, shape, training, dtype, offset, scale, steps, seed = case
    if spec.norm in ("renorm", "batch") and training and np.prod(shape) // shape[1] < 2:
        return  # one value per channel: BN's error (tests/test_backend.py), not a case of renorm
    x, dy, state = layer_inputs(shape, spec, seed, offset, scale, steps)
    cast = {k: v.astype(dtype) for k, v in state.items()}
    if spec.norm_backward == "closed-form" and framework == "mxnet":  # refused: no backward inside a hybrid graph
        with pytest.raises(BackendUnavailable, match="--norm-backward closed-form is not available in MXNet"):
            harness.run_norm(spec, x.astype(dtype), cast, dy.astype(dtype), training=training, dtype=dtype)
        return
    got = harness.run_norm(spec, x.astype(dtype), cast, dy.astype(dtype), training=training, dtype=dtype)
    want = expected(spec, x.astype(dtype), cast, dy.astype(dtype), training)
    # the clip of r or d can flip when sigma_B / sigma lands within round-off of a limit: keep the
    # float32 renorm cases away from those edges (float64 is exact enough for any draw)
    check(
        got,
        want,
        bound(dtype, offset, scale, 1),
        f"{framework} scratch {spec.norm} {shape} {dtype} training={training} offset={offset} scale={scale}",
    )


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 4)])
def test_the_closed_form_backward_is_autodiffs_in_float64(fw, harness, framework, shape):
    """--norm-backward closed-form: the scratch BN layer's outputs, gradients and running statistics are
    autodiff's, to 1e-12, in training mode (where it applies) and eval mode (where it does not); MXNet refuses
    it with its reason."""
    spec = ModelSpec(norm_positions=("conv1",))
    closed = ModelSpec(norm_positions=("conv1",), norm_backward="closed-form")
    x, dy, state = layer_inputs(shape, spec, 7, offset=3.0, scale=2.0)
    for training in (True, False):
        if framework == "mxnet":
            with pytest.raises(BackendUnavailable, match="--norm-backward closed-form is not available in MXNet"):
                harness.run_norm(closed, x, state, dy, training=training, dtype="float64")
            return
        want = harness.run_norm(spec, x, state, dy, training=training, dtype="float64")
        check(
            harness.run_norm(closed, x, state, dy, training=training, dtype="float64"),
            want,
            lambda w: {"rtol": 1e-12, "atol": 1e-12},
            f"{framework} closed-form, training={training}",
        )


@pytest.mark.parametrize("norm", ["layer", "group", "instance"])
def test_scratch_norms_take_a_batch_of_one(fw, harness, framework, norm):
    """Per-example normalisations need no batch: one image normalises on its own (BN cannot)."""
    spec = ModelSpec(norm=norm, norm_positions=("conv1", "conv2"))
    x, dy, state = layer_inputs((1, 4, 3, 3), spec, seed=1)
    check(
        harness.run_norm(spec, x, state, dy, training=True, dtype="float64"),
        expected(spec, x, state, dy, True),
        bound("float64", 0, 1, 1),
        f"{framework} {norm} batch 1",
    )


def test_renorm_first_step_is_bn_and_later_steps_correct_it(fw, harness, framework):
    """Step 0 (rmax 1, dmax 0) normalises exactly as BN; after the warm-up r and d move the output."""
    x, dy, state = layer_inputs((8, 3, 2, 2), ModelSpec(norm="renorm"), seed=2, offset=2.0)
    bn = harness.run_norm(
        ModelSpec(), x, {k: state[k] for k in norm_suffixes(ModelSpec())}, dy, training=True, dtype="float64"
    )
    spec = ModelSpec(norm="renorm", renorm_warmup=10)
    first = harness.run_norm(spec, x, state, dy, training=True, dtype="float64")
    np.testing.assert_allclose(first["y"], bn["y"], rtol=0, atol=1e-14)
    np.testing.assert_array_equal(first["state"]["steps"], [1.0])
    later_state = {**state, "steps": np.array([10.0])}
    later = harness.run_norm(spec, x, later_state, dy, training=True, dtype="float64")
    assert np.max(np.abs(later["y"] - bn["y"])) > 0.1  # running statistics far from the batch's: r, d act
    check(later, expected(spec, x, later_state, dy, True), bound("float64", 2.0, 1, 1), f"{framework} renorm")


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 2, 2)], ids=["2d", "4d"])
def test_renorm_gradient_treats_r_and_d_as_constants(fw, harness, framework, shape):
    """A fixed case with r and d inside their limits (so a gradient through them would show)."""
    spec = ModelSpec(norm="renorm", renorm_warmup=0, renorm_rmax=10, renorm_dmax=10)
    x, dy, state = layer_inputs(shape, spec, seed=1)
    got, want = harness.run_norm(spec, x, state, dy, training=True, dtype="float64"), expected(spec, x, state, dy, True)
    sigma = np.sqrt(state["running_var"] + spec.epsilon)
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    assert np.all(np.abs(x.mean(axis=axes) - state["running_mean"]) / sigma < 10)  # d unclipped
    check(got, want, bound("float64", 0, 1, 1), f"{framework} renorm {shape}")


@pytest.mark.parametrize("variant", ["builtin", "builtin-defaults"])
@pytest.mark.parametrize(
    "norm,dims", [("layer", 2), ("layer", 4), ("group", 2), ("group", 4), ("instance", 4), ("renorm", 2), ("renorm", 4)]
)
def test_builtin_norm_matches_reference_or_is_a_clear_error(fw, harness, framework, norm, dims, variant):
    default_eps = NORM_BUILTIN_EPSILON[framework][(norm, dims)]
    dtype = "float32" if "float64" in NORM_BUILTIN_DTYPES_MISSING.get(framework, {}).get(norm, ()) else "float64"
    spec = ModelSpec(norm=norm, variant=variant, epsilon=1e-4, norm_positions=("conv1", "conv2"))
    shape = (5, 6, 3, 2) if dims == 4 else (5, 6)
    x, dy, state = layer_inputs(shape, spec, seed=4, offset=3.0, scale=2.0)
    if default_eps is None:
        with pytest.raises(BackendUnavailable, match=f"no built-in layer that fits the spec of --norm {norm}"):
            harness.run_norm(spec, x, state, dy, training=True, dtype=dtype)
        return
    got = harness.run_norm(
        spec,
        x.astype(dtype),
        {k: v.astype(dtype) for k, v in state.items()},
        dy.astype(dtype),
        training=True,
        dtype=dtype,
    )
    eps = spec.epsilon if variant == "builtin" else default_eps
    want = expected(ModelSpec(norm=norm, epsilon=eps, norm_positions=("conv1",)), x, state, dy, True)
    tol = bound(dtype, 3.0, 2.0, 4)
    extra = NORM_BUILTIN_ATOL.get(framework, {}).get(norm, 0)
    check(
        got,
        want,
        lambda want: {"rtol": 0, "atol": tol(want)["atol"] + extra},
        f"{framework} {variant} {norm} {dims}-D (epsilon {eps:g})",
    )
    if variant == "builtin-defaults":  # the pinned default really is the layer's: another epsilon misses
        other = expected(ModelSpec(norm=norm, epsilon=eps * 10, norm_positions=("conv1",)), x, state, dy, True)
        assert np.max(np.abs(got["y"] - other["y"])) > 1e-6


def test_a_builtin_missing_for_a_dtype_fails_before_training(fw, framework):
    for norm, dtypes in NORM_BUILTIN_DTYPES_MISSING.get(framework, {}).items():
        spec = ModelSpec(norm=norm, variant="builtin", norm_positions=("conv1", "conv2"))
        for dtype in dtypes:
            with pytest.raises(BackendUnavailable, match=f"float32 only, not {dtype}"):
                fw.BACKEND(RunConfig(model=spec, dtype=dtype, device="cpu"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_idx_dir(tmp_path_factory.mktemp("idx"), 128, 64)
    return load_fashion_mnist(path, verify=False, dtype="float64")


@pytest.mark.parametrize("norm", ["group", "renorm"])
def test_norm_runs_train_the_same_in_every_mode_and_only_renorm_diverges(fw, framework, tiny, norm):
    """Through the one loop: the framework's default (compiled) mode and eager give the same per-step
    losses; a norm without running statistics (group here: layer and instance are the same layer with
    other group counts) shows a train/eval divergence of exactly 0 and has no population statistics;
    renorm has both, as BN."""
    spec = ModelSpec(norm=norm, renorm_warmup=4)
    runs = {}
    for execution in ("default", "eager"):
        config = RunConfig(
            model=spec,
            epochs=2,
            batch_size=32,
            lr=0.5,
            dtype="float64",
            device="cpu",
            probe_size=16,
            trace_steps=4,
            population_size=64,
            execution=execution,
        )
        got = []
        run_loop(fw.BACKEND, config, tiny, lambda record, arrays=None: got.append((record, arrays)))
        assert got[-1][0]["status"] == "complete"
        runs[execution] = [(r, a) for r, a in got if r["kind"] == "epoch"]
    for (default, arrays), (eager, _) in zip(runs["default"], runs["eager"]):
        np.testing.assert_allclose(
            default["step_losses"],
            eager["step_losses"],
            rtol=1e-10,
            atol=0,
            err_msg=f"{framework} {norm}: default vs eager per-step losses",
        )
        if norm == "renorm":
            assert default["probe_logit_mad"] > 0 and "pop_test_acc" in default
            assert arrays["param/bn1.steps"][0] == 4 * default["epoch"]  # 4 steps an epoch, none from the probe
            assert all(0 < g["sigma_average_gap"] < 1 for g in default["bn_gap"])  # Ioffe's running sigma beside
        else:
            assert default["probe_logit_mad"] == 0 and default["probe_disagreement"] == 0
            assert default["bn_gap"] == [] and "pop_test_acc" not in default
            np.testing.assert_array_equal(arrays["probe/logits_train"], arrays["probe/logits_eval"])


def test_bad_norm_combinations_are_clear_errors():
    for kwargs, message in (
        (dict(norm="instance"), "dense layer \\(fc1, fc2\\).*--norm-positions conv1,conv2"),
        (dict(norm="group", groups=4), "--groups 4 does not divide the 6 channels of conv1"),
        (dict(norm="group", groups=0), "groups \\(--groups\\) must be an integer >= 1"),
        (dict(norm="batchnorm"), "unknown normalisation 'batchnorm' \\(--norm\\)"),
        (dict(norm="renorm", renorm_rmax=0.5), "renorm_rmax \\(--renorm-rmax\\) must be a number >= 1"),
        (dict(norm="renorm", renorm_dmax=-1), "renorm_dmax"),
        (dict(norm="renorm", renorm_warmup=-1), "renorm_warmup"),
    ):
        with pytest.raises(ConfigError, match=message):
            ModelSpec(**kwargs)
    # what does not normalise is not checked: no norm layer, or positions where the groups divide
    ModelSpec(norm="instance", variant="none")
    ModelSpec(norm="group", groups=4, norm_positions=("conv2", "fc1", "fc2"))


@pytest.mark.parametrize("variant", ["scratch", "builtin", "builtin-defaults"])
@pytest.mark.parametrize("norm", ["batch", "renorm", "layer", "group", "instance"])
def test_norm_and_variant_make_one_layer_kind(norm, variant):
    """common.norms.norm_layer decides the layer once for every framework: its kind, and the constants it passes
    (none for builtin-defaults, the framework's own; no decay without running statistics)."""
    spec = ModelSpec(norm=norm, variant=variant, groups=2, decay=0.8, epsilon=1e-3, norm_positions=("conv1", "conv2"))
    layer = norm_after(spec, "conv2")
    scratch_kind = {"layer": "group", "instance": "group"}.get(norm, norm)
    assert layer.kind == (scratch_kind if variant == "scratch" else f"builtin-{norm}")
    assert (layer.features, layer.dims) == (16, 4)
    running = norm in ("batch", "renorm")
    assert layer.epsilon == (None if variant == "builtin-defaults" else 1e-3)
    assert layer.decay == (0.8 if running and variant != "builtin-defaults" else None)
    assert layer.groups == (None if running else {"layer": 1, "group": 2, "instance": 16}[norm])
    assert (layer.renorm is not None) == (norm == "renorm")
    if norm != "instance":
        dense = norm_after(ModelSpec(norm=norm, variant=variant), "fc1")
        assert (dense.features, dense.dims) == (120, 2)


def test_every_framework_builds_only_the_kinds_common_decides(fw, framework):
    """Each framework's lenet.CONSTRUCTORS maps kinds of common.norms to layers: every scratch kind, and no kind
    that norm_layer never makes."""
    import importlib

    constructors = importlib.import_module(f"frameworks.{framework}.lenet").CONSTRUCTORS
    kinds = set(SCRATCH_KINDS.values()) | set(BUILTIN_KINDS.values())
    assert set(constructors) <= kinds, sorted(set(constructors) - kinds)
    assert set(SCRATCH_KINDS.values()) <= set(constructors)
    assert "builtin-batch" in constructors


def test_renorm_running_sigma_two_ways_part_by_jensens_gap():
    """The spec keeps BN's running variance, Ioffe 2017's Algorithm 1 a running sigma
    (common.population.sigma_average_gap): equal when every batch has the same variance, and otherwise
    sqrt(average var) above average sqrt(var), by the batches' spread of sigma (Jensen)."""
    from common.population import sigma_average_gap

    steady = [{"bn1": (np.zeros(2), np.full(2, 4.0))} for _ in range(50)]
    assert sigma_average_gap(steady, 0.9, 1e-5) == {"bn1": 0.0}
    rng = np.random.RandomState(0)
    spread = [{"bn1": (np.zeros(3), rng.uniform(0.5, 1.5, 3) ** 2 * [1, 10, 100])} for _ in range(400)]
    got = sigma_average_gap(spread, 0.9, 1e-5)["bn1"]
    var = np.array([b["bn1"][1] for b in spread]) + 1e-5
    weights = 0.1 * 0.9 ** np.arange(len(var) - 2, -1, -1)  # the average's weights, the first batch's apart
    first = 0.9 ** (len(var) - 1)
    want_var = first * var[0] + weights @ var[1:]
    want_sigma = first * np.sqrt(var[0]) + weights @ np.sqrt(var[1:])
    assert got == pytest.approx(np.mean(np.sqrt(want_var) / want_sigma - 1), rel=1e-10)
    assert 1e-3 < got < 0.1  # sigma spread by +-50%: a gap of about a percent


def test_a_norm_added_to_the_table_reaches_every_decision(monkeypatch, tmp_path):
    """One row in common.norms.NORMALISATIONS and nothing else: the config accepts the name, the canonical arrays
    hold its state, drift counts its new statistic as a statistic and its counter as neither, the population pass and
    the data-parallel checks follow its flags, and the report counts it among the norms with running statistics."""
    from common import norms
    from common.init import init_params, norm_suffixes
    from compare.reporting import markdown

    row = norms.Normalisation(
        "batch", ("running_mean", "running_var", "running_peak"), counters=("seen",), population=False
    )
    monkeypatch.setitem(norms.NORMALISATIONS, "batch-peak", row)
    spec = ModelSpec(norm="batch-peak")
    assert spec.has_running_stats and not spec.has_population  # the population pass skips it
    assert norm_suffixes(spec) == ("gamma", "beta", "running_mean", "running_var", "running_peak", "seen")
    assert "bn1.running_peak" in init_params(spec, 0)
    assert (norms.array_role("bn3.running_peak"), norms.array_role("bn3.seen")) == ("statistic", "counter")
    with pytest.raises(ConfigError, match="--replicas with --norm batch-peak is not supported yet"):
        RunConfig(model=spec, replicas=2)
    with pytest.raises(ConfigError, match="--ghost-batch slices the batch statistics"):
        ModelSpec(norm="batch-peak", ghost_batch=32)
    assert markdown.stateless_norms(["batch-peak", "layer", "none"]) == ["layer"]  # the report's divergence note
