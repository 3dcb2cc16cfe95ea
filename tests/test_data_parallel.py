"""Data-parallel BN (--replicas K, --bn-sync) and ghost batches (--ghost-batch G): docs/data-parallel.md.

Every framework: the scratch layer's ghost batches against the float64 reference (forward, backward, running
statistics); over 2 replicas on the framework's own engine (PyTorch: torch.distributed over gloo, K processes on
127.0.0.1; JAX: shard_map over host CPU devices; TensorFlow: MirroredStrategy over logical CPU devices; MXNet: CPU
contexts and the kvstore), global sync takes the one-process batch-B run's steps and local sync the one-process
--ghost-batch B/K run's, in float64, or the run is refused with the measured reason (MXNet's global sync, the
built-in SyncBatchNorms of PyTorch and MXNet); the running statistics under local sync follow tests/conventions.py;
a PyTorch replica that dies mid-run ends the run with its error, quickly. Small runs: 2 replicas, a few steps.
"""

import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import norms
from common.config import ModelSpec, RunConfig
from common.data import batch_order, load_fashion_mnist
from common.errors import BackendUnavailable, ConfigError
from common.init import init_params
from common.interface import DataParallel
from common.loop import run as run_loop
from common.reference import conv2d, norm_backward, norm_forward
from tests.conventions import BUILTIN, DATA_PARALLEL, REPLICA_RUNNING_STATS
from tests.helpers import epochs_of, make_idx_dir, tiny_config
from tests.scripted_backend import Script, scripted_backend

EXAMPLES = settings(
    max_examples=12, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@EXAMPLES
@given(
    dims=st.sampled_from([2, 4]),
    ghost=st.integers(2, 4),
    slices=st.integers(1, 3),
    channels=st.integers(1, 4),
    dtype=st.sampled_from(["float64", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_ghost_batches_match_the_reference(harness, framework, dims, ghost, slices, channels, dtype, seed):
    """Each G-image slice normalised with its own statistics; the running statistics blend the mean over the
    slices of their means and variances; gradients through every slice."""
    rng = np.random.RandomState(seed)
    shape = (ghost * slices, channels) + ((2, 3) if dims == 4 else ())
    spec = ModelSpec(ghost_batch=ghost)
    x = (1.5 + rng.normal(0, 2, shape)).astype(dtype)
    dy = rng.normal(0, 1, shape).astype(dtype)
    state = {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0, 0.5, channels),
        "running_mean": rng.normal(0, 1, channels),
        "running_var": rng.uniform(0.3, 3, channels),
    }
    state = {k: v.astype(dtype) for k, v in state.items()}
    got = harness.run_norm(spec, x, state, dy, training=True, dtype=dtype)
    y, new, cache, kind = norm_forward(spec, x, state, training=True)
    dx, dgamma, dbeta = norm_backward(dy, cache, kind)
    tol = {"rtol": 0, "atol": 1e-12 if dtype == "float64" else 2e-4}
    for name, want in (("y", y), ("dx", dx), ("dgamma", dgamma), ("dbeta", dbeta)):
        np.testing.assert_allclose(
            got[name], want, err_msg=f"{framework} ghost {ghost}x{slices} {dtype}: {name}", **tol
        )
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(got["state"][name], new[name], err_msg=f"{framework}: {name}", **tol)
    if slices > 1:  # and the slices are not the batch: BN over the whole batch gives other outputs
        whole, _, _, _ = norm_forward(ModelSpec(), x, state, training=True)
        assert np.max(np.abs(whole - y)) > 1e-3


def test_bad_data_parallel_options_are_clear_errors():
    for kwargs, message in (
        (dict(replicas=3), "--replicas 3 does not divide --batch-size 256"),
        (dict(replicas=2, batch_size=2), "leaves 1 image per replica"),
        (dict(replicas=0), "replicas \\(--replicas\\) must be an integer >= 1"),
        (dict(replicas=2, bn_sync="global", model=ModelSpec(norm="layer")), "nothing to synchronise"),
        (dict(replicas=2, model=ModelSpec(norm="renorm")), "--replicas with --norm renorm"),
        (dict(replicas=2, model=ModelSpec(ghost_batch=64)), "--ghost-batch and --replicas together"),
        (dict(model=ModelSpec(ghost_batch=48)), "--ghost-batch 48 does not divide --batch-size 256"),
        (dict(batch_size=96, model=ModelSpec(ghost_batch=48)), "does not divide --probe-size 512"),
        (dict(batch_size=96, replicas=2), "local sync's slice of 48 images does not divide --probe-size 512"),
        (dict(bn_sync="all"), "unknown bn_sync 'all'"),
    ):
        with pytest.raises(ConfigError, match=message):
            RunConfig(**kwargs)
    for kwargs, message in (
        (dict(ghost_batch=1), "must be at least 2"),
        (dict(ghost_batch=32, variant="builtin"), "needs --norm batch and --variants scratch"),
        (dict(ghost_batch=32, norm="group"), "needs --norm batch"),
    ):
        with pytest.raises(ConfigError, match=message):
            ModelSpec(**kwargs)
    # what the layers are built from: local sync's one-process meaning, ghost batches of B/K
    assert RunConfig(replicas=4).layer_spec.ghost_batch == 64
    assert RunConfig(replicas=4, bn_sync="global").layer_spec.ghost_batch == 0
    # the new options at their defaults leave every earlier configuration's id as it was
    assert RunConfig(replicas=1, bn_sync="local", model=ModelSpec(ghost_batch=0)).config_id == RunConfig().config_id


def test_the_template_refuses_what_a_backend_does_not_declare():
    """Data-parallel support is data on a backend (common.interface.DataParallel); Backend.check_replicas refuses
    the rest with one message per kind of refusal: no engine, another device, another execution mode, too few
    devices, global sync with a variant that does not pool."""
    script = Script(step_seconds=lambda e, s: 0.0, step_stats=lambda e, s: (0.0, 0.0))
    plain = scripted_backend(script)  # a test-only backend: it declares no data-parallel engine
    config = RunConfig(replicas=2, device="cpu")
    with pytest.raises(BackendUnavailable, match="has no data-parallel engine in this suite: use --replicas 1"):
        plain(config).check_replicas(config, "cpu", "eager")

    class Declared(plain):
        data_parallel = DataParallel(
            engine="devices",
            where="the test's CPU devices",
            executions=("eager",),
            why_executions="the test runs no other",
            global_sync=("scratch",),
            why_not_global={"builtin": "its layer cannot"},
            devices="make them first",
        )

    backend = Declared(config)
    backend.check_replicas(config, "cpu", "eager", available=2)  # all supported: no error
    global_builtin = RunConfig(replicas=2, bn_sync="global", model=ModelSpec(variant="builtin"), device="cpu")
    for args, message in (
        ((config, "gpu", "eager"), "--replicas runs on the test's CPU devices here: use --device cpu"),
        ((config, "cpu", "jit"), "runs torch's step eager only \\(the test runs no other\\), not jit"),
        ((config, "cpu", "eager", 1), "--replicas 2 needs 2 devices and this process has 1: make them first"),
        ((global_builtin, "cpu", "eager"), "with torch's builtin layer: its layer cannot; use --bn-sync local or"),
    ):
        with pytest.raises(BackendUnavailable, match=message):
            backend.check_replicas(*args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_idx_dir(tmp_path_factory.mktemp("idx"), 128, 64)
    return load_fashion_mnist(path, verify=False, dtype="float64")


def small(**changes):
    return tiny_config(**{"probe_size": 32, "trace_steps": 4, "population_size": 64, "warmup_steps": 1, **changes})


def run(fw, config, data, progress=None):
    """(epoch records, their arrays) of one run through the loop, which completes."""
    epochs = epochs_of(fw.BACKEND, config, data, progress)
    assert len(epochs) == config.epochs
    return epochs


def assert_same_steps(got, want, what):
    """Per-step losses and every canonical array (running statistics included) at each epoch's end, to 1e-10."""
    for (r, arrays), (w, want_arrays) in zip(got, want, strict=True):
        np.testing.assert_allclose(r["step_losses"], w["step_losses"], rtol=1e-10, atol=0, err_msg=what)
        for name, value in want_arrays.items():
            if name.startswith("param/"):
                np.testing.assert_allclose(arrays[name], value, rtol=0, atol=1e-10, err_msg=f"{what}: {name}")


def test_every_framework_trains_data_parallel(fw, framework):
    assert fw.BACKEND.data_parallel and framework in DATA_PARALLEL


def data_parallel(fw, framework):
    assert fw.BACKEND.data_parallel, f"{framework} has no data-parallel path"


@pytest.mark.parametrize("sync", ["global", "local"])
def test_replicas_take_the_one_process_steps(fw, framework, tiny, sync):
    """Global sync over 2 replicas is the batch-B run; local sync the --ghost-batch B/2 run (float64, 1e-10):
    per-step losses, parameters and running statistics. The ghost run differs from the batch-B run, so the
    comparison can tell the two syncs apart."""
    data_parallel(fw, framework)
    if framework == "mxnet" and sync == "global":  # Gluon cannot pool mid-forward outside an operator (backend)
        with pytest.raises(BackendUnavailable, match="cannot pool the slices' statistics mid-forward"):
            run(fw, small(replicas=2, bn_sync=sync), tiny)
        return
    one_process = {"global": small(), "local": small(model=ModelSpec(ghost_batch=16))}
    want = run(fw, one_process[sync], tiny)
    got = run(fw, small(replicas=2, bn_sync=sync), tiny)
    assert_same_steps(got, want, f"{framework} --replicas 2 --bn-sync {sync}")
    other = run(fw, one_process["local" if sync == "global" else "global"], tiny)
    assert np.max(np.abs(np.subtract(other[0][0]["step_losses"], want[0][0]["step_losses"]))) > 1e-6


def test_noisy_replicas_take_the_one_process_noisy_steps(fw, framework, tiny):
    """Noisy BN over 2 replicas (local sync) is the one-process noisy --ghost-batch B/2 run, in both epochs: each
    epoch's new noise reaches every replica (a replica still on epoch 1's draws parts from it in epoch 2)."""
    data_parallel(fw, framework)
    noisy = ModelSpec(norm_noise=True)
    want = run(fw, small(model=replace(noisy, ghost_batch=16)), tiny)
    got = run(fw, small(model=noisy, replicas=2), tiny)
    assert_same_steps(got, want, f"{framework} --replicas 2 --norm-noise")
    drawn = [norms.draw_noise(noisy, 0, epoch, 4)["bn1"][0] for epoch in (1, 2)]
    assert np.max(np.abs(drawn[0] - drawn[1])) > 0.1  # the two epochs' draws differ, so a stale one shows


def test_the_builtin_layer_under_global_sync_is_the_frameworks_sync_layer_or_its_refusal(fw, framework, tiny):
    """Flax's nn.BatchNorm(axis_name=...) and Keras' BatchNormalization(synchronized=True) over 2 replicas take the
    built-in one-process batch-B run's steps (float64, 1e-10); PyTorch's nn.SyncBatchNorm refuses the CPU
    (tests/test_torch_pitfalls.py) and Gluon's SyncBatchNorm fails in float64, so the run says so before training."""
    data_parallel(fw, framework)
    builtin = ModelSpec(variant="builtin")
    refusals = {"torch": "nn.SyncBatchNorm, which refuses the CPU", "mxnet": "SyncBatchNorm \\(contrib\\) fails in"}
    if framework in refusals:
        with pytest.raises(BackendUnavailable, match=refusals[framework]):
            run(fw, small(model=builtin, replicas=2, bn_sync="global"), tiny)
        return
    want = run(fw, small(model=builtin), tiny)
    got = run(fw, small(model=builtin, replicas=2, bn_sync="global"), tiny)
    assert_same_steps(got, want, f"{framework} built-in --replicas 2 --bn-sync global")
    local = run(fw, small(model=builtin, replicas=2, bn_sync="local"), tiny)
    assert np.max(np.abs(np.subtract(local[0][0]["step_losses"], want[0][0]["step_losses"]))) > 1e-6


def test_local_sync_running_statistics_follow_the_framework_convention(fw, framework, tiny):
    """After one step from the initial weights, bn1's running statistics under local sync over 2 replicas: the
    scratch layer blends the replicas' mean of their slices' mean and biased variance; the built-in layer keeps
    what tests/conventions.py says (PyTorch: replica 0's slice's, DDP broadcasting its buffers)."""
    data_parallel(fw, framework)
    ntrain, batch = 32, 32
    order = batch_order(0, 1, ntrain, batch)[0]
    for variant in ("scratch", "builtin"):
        spec = ModelSpec(variant=variant)
        config = small(model=spec, replicas=2, epochs=1, train_limit=ntrain, population_size=0, warmup_steps=0)
        params = init_params(spec, 0, "float64")
        h = conv2d(tiny.train_images[order], params["conv1.weight"], params["conv1.bias"])
        slices = [h[:16], h[16:]]
        means = np.array([s.mean(axis=(0, 2, 3)) for s in slices])
        biased = np.array([s.var(axis=(0, 2, 3)) for s in slices])
        unbiased = np.array([s.var(axis=(0, 2, 3), ddof=1) for s in slices])
        convention = REPLICA_RUNNING_STATS[framework][variant]
        if convention == "replicas' mean":
            want_mean, want_var = means.mean(axis=0), biased.mean(axis=0)
        else:  # replica 0's, with the layer's own variance (PyTorch's built-in: unbiased)
            own = unbiased if BUILTIN[framework]["running_var"] == "unbiased" else biased
            want_mean, want_var = means[0], own[0]
        arrays = run(fw, config, tiny)[0][1]
        # Gluon's built-in layer blends in float32 even in float64 (tests/conventions.py BUILTIN decay_dtype)
        rtol = 1e-6 if variant == "builtin" and BUILTIN[framework].get("decay_dtype") == "float32" else 0
        for name, want in (("running_mean", 0.1 * want_mean), ("running_var", 0.9 + 0.1 * want_var)):
            np.testing.assert_allclose(arrays[f"param/bn1.{name}"], want, rtol=rtol, atol=1e-12, err_msg=name)
        if convention != "replicas' mean":  # replica 1's statistics are told apart from replica 0's at this rtol
            assert np.max(np.abs(means[1] - means[0])) > 1e-3


def test_a_replica_that_dies_ends_the_run_with_its_error(fw, framework, tiny):
    """Replica 1 killed after the third step: the run raises an error naming the replica within seconds (no
    collective waits for it), and no replica process is left behind."""
    data_parallel(fw, framework)
    if fw.BACKEND.data_parallel.engine != "processes":
        pytest.skip(f"{framework}'s replicas are devices of one process: none can die alone")
    config = small(replicas=2, epochs=3)
    backends, followers = [], []

    class Watched(fw.BACKEND):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            backends.append(self)
            followers.extend(self.group.processes)

    def progress(epoch, step, steps):
        if epoch == 1 and step == 3:
            followers[0].kill()
            followers[0].wait()

    began = time.monotonic()
    with pytest.raises(RuntimeError, match="replica 1 of 2 exited \\(code -9\\)"):
        run_loop(Watched, config, tiny, lambda record, arrays=None: None, progress)
    assert time.monotonic() - began < 60
    assert followers and all(process.poll() is not None for process in followers)
    assert backends[0].group is None  # closed: the process group is gone, a next run can start its own


def test_ghost_batches_evaluate_any_eval_batch(fw, framework, tiny):
    """Eval mode ignores ghost batches, so a ghost run evaluates batches its G does not divide (the test set's last
    one; MXNet's graph folds every batch, and pads such a batch): the same test loss and accuracy as with one eval
    batch of the whole test set, in float64."""
    ghost = ModelSpec(ghost_batch=16)
    whole, ragged = (run(fw, small(model=ghost, epochs=1, eval_batch_size=size), tiny)[0][0] for size in (64, 24))
    assert ragged["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-10, abs=0)
    assert ragged["test_acc"] == whole["test_acc"]
