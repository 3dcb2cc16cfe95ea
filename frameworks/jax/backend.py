"""JAX / Flax backend: common.interface.Backend over BNLeNet (NHWC).

State is explicit: `self.variables` is Flax's {"params", "batch_stats"} and every
step returns a new one; nothing is mutated in place, so evaluate, predict and the
probe cannot change state by construction (the probe's train-mode forward returns
new running statistics, which it drops). The mode is an argument of every forward:
train_step runs training=True with "batch_stats" mutable; evaluate/predict run
training=False; the probe runs training=False (no dropout), bn_training=True.

Execution: compiled (the default) = the whole step, gather of the batch, forward,
loss, gradient, SGD update and running-statistics update, under one `jax.jit`, the
variables donated to it on a GPU (their buffers are reused for the result); eager =
the same functions un-jitted, op by op (slow; for parity). float64 runs switch on
`jax_enable_x64` here, and nowhere else; every array's dtype is explicit (parameters and
images in the run's dtype, labels and batch indices int32), so a float32 run's arrays stay
float32 with the flag on.
"""

import os
import platform

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from common.errors import BackendUnavailable
from common.init import check_params, init_params, is_trainable, norm_features
from common.interface import Backend, DataParallel, resolve_execution
from common.layout import from_channels_last, nchw_to_nhwc, to_channels_last
from common.norms import NORM_NAMES, norm_after

from .lenet import AXIS, BNLeNet, make_norm, variable_paths

# The jitted step by default: eager JAX dispatches every op from Python (docs/benchmark.md, "Execution modes").
DEFAULT_EXECUTION = "compiled"
# XLA's GPU reductions may use atomics, whose order varies between runs; this flag makes them
# deterministic (it must be set before the GPU backend starts; the CPU ignores it).
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def enable_float64(dtype):
    """float64 runs need jax_enable_x64 (without it JAX silently computes in float32)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def resolve_device(requested):
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib, or no GPU
        gpus = []
    if requested == "gpu" and not gpus:
        raise BackendUnavailable(
            f"--device gpu asked for, but this JAX ({jax.__version__}) sees no GPU; use --device cpu or auto, "
            "or install a CUDA build of JAX (pip install 'jax[cuda13]') on a machine with an NVIDIA driver"
        )
    return gpus[0] if requested in ("gpu", "auto") and gpus else jax.devices("cpu")[0]


def prepare(configs, options: dict | None = None) -> None:
    """Before this process's first JAX computation: as many host CPU devices as the job's largest --replicas
    (JAX fixes the count when its backend starts; compare.execution.worker calls this once per worker)."""
    most = max((c.replicas for c in configs), default=1)
    if most > 1:
        jax.config.update("jax_num_cpu_devices", most)


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy with integer labels."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def loss_and_correct(logits, labels):
    losses = cross_entropy(logits, labels)
    correct = jnp.sum(jnp.argmax(logits, axis=1) == labels).astype(logits.dtype)
    return losses, correct


class JaxBackend(Backend):
    name = "jax"
    data_parallel = DataParallel(  # --replicas K: shard_map over K host CPU devices (prepare)
        engine="devices",
        where="the host CPU's devices",
        executions=("jax.jit",),
        why_executions="shard_map's step is jitted",
        global_sync=("scratch", "builtin", "builtin-defaults"),
        devices="JAX fixes the count when it starts. compare.run sets it for its workers; in your own process call "
        "jax.config.update('jax_num_cpu_devices', K) before any JAX work",
    )

    def __init__(self, config):
        super().__init__(config)
        enable_float64(config.dtype)
        self.device = resolve_device(config.device)
        self.dtype = config.dtype
        self.spec = config.model
        if config.model.has_norm:
            # a normalisation without a fitting Flax module fails here
            make_norm(norm_after(config.model, config.model.norm_positions[0]), config.precision)
        # mixed precision: Flax's own way, modules computing in bfloat16 with float32 parameters
        self.model = BNLeNet(config.layer_spec, config.precision)
        self.paths = variable_paths(config.model)
        # XLA is JAX's only compiler: --execution xla is the jitted step too
        self.compiled = resolve_execution(config, DEFAULT_EXECUTION, ("compiled", "eager", "xla")) != "eager"
        self.dropout_key = jax.random.key(config.seed)  # dropout masks only; weights come from common
        self.steps_done = 0  # folded into the dropout key: a new mask every step
        self.set_params(init_params(config.model, config.seed, config.dtype))
        step = self.make_step(self.model)
        self.mesh = self._data_parallel(config) if config.replicas > 1 else None
        if self.mesh is not None:
            model = BNLeNet(config.layer_spec, config.precision, sync=config.bn_sync)
            body = self.make_step(model, axis=AXIS)
            # check_vma off: each replica's gradient is its own contribution (the pooled statistics' psum sends
            # every replica's part back to it), averaged explicitly, as DDP does
            step = jax.shard_map(body, mesh=self.mesh, in_specs=P(), out_specs=P(), check_vma=False)
            self.replicated = NamedSharding(self.mesh, P())
            self._shared = {}  # slot -> (the single-device input, its copy on every replica)
        if self.compiled:
            # donation reuses the old variables' buffers for the new ones (XLA on the CPU does not, and warns)
            self._step = jax.jit(step, donate_argnums=(0,) if self.device.platform != "cpu" else ())
            impls = (self._forward_impl, self._probe_impl, self._moments_impl, self._logits_impl, self._gradient_impl)
            self._forward, self._probe, self._moments, self._logits, self._gradient = (jax.jit(f) for f in impls)
        else:
            self._step, self._forward, self._probe, self._moments, self._logits, self._gradient = (
                step,
                self._forward_impl,
                self._probe_impl,
                self._moments_impl,
                self._logits_impl,
                self._gradient_impl,
            )

    def _data_parallel(self, config):
        """The mesh of K host CPU devices a data-parallel step runs over, or the reason it cannot run."""
        devices = jax.devices("cpu")
        self.check_replicas(config, self.device.platform, self.execution_name(), len(devices))
        return Mesh(np.array(devices[: config.replicas]), (AXIS,))

    def make_step(self, model, axis=None):
        """The whole training step as one pure function of (variables, images, labels, order, step, count, the
        epoch's noisy-BN draws or None). axis: inside shard_map over that mesh axis, this replica's contiguous
        slice of the batch, the gradients averaged and [loss_sum, correct] summed over the replicas."""
        lr, mask = self.config.lr, self.trainable_mask()
        dropout = self.spec.dropout > 0
        base_key = self.dropout_key
        share = self.config.batch_size // self.config.replicas

        def step(variables, images, labels, order, index, count, noise):
            batch = order[index]
            if axis is not None:
                batch = lax.dynamic_slice_in_dim(batch, lax.axis_index(axis) * share, share)
            step_noise = None if noise is None else {n: (s[index], m[index]) for n, (s, m) in noise.items()}
            x, y = jnp.take(images, batch, axis=0), jnp.take(labels, batch, axis=0)
            key = jax.random.fold_in(base_key, count)
            rngs = (
                {"dropout": key if axis is None else jax.random.fold_in(key, lax.axis_index(axis))} if dropout else {}
            )
            stats = variables.get("batch_stats", {})

            def loss_fn(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": stats},
                    x,
                    training=True,
                    mutable=["batch_stats"],
                    rngs=rngs,
                    noise=step_noise,
                )
                losses, correct = loss_and_correct(logits, y)
                return jnp.mean(losses), (updates.get("batch_stats", {}), jnp.sum(losses), correct)

            grads, (new_stats, loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(variables["params"])
            if axis is not None:
                grads = lax.pmean(grads, axis)
                loss_sum, correct = lax.psum(loss_sum, axis), lax.psum(correct, axis)
            params = {
                module: {
                    leaf: value - lr * grads[module][leaf] if mask[module][leaf] else value
                    for leaf, value in leaves.items()
                }
                for module, leaves in variables["params"].items()
            }
            new = {"params": params, "batch_stats": new_stats} if stats else {"params": params}
            return new, jnp.stack([loss_sum, correct])

        return step

    def trainable_mask(self):
        """{module: {leaf: bool}} over the params: frozen gamma/beta stay as they are."""
        mask = {}
        for name, (collection, module, leaf) in self.paths.items():
            if collection == "params":
                mask.setdefault(module, {})[leaf] = is_trainable(name, self.spec)
        return mask

    # hooks of the Backend template (common.interface) -------------------------------------------------------
    def framework_version(self):
        return f"{jax.__version__} (flax {flax.__version__})"

    def device_info(self):
        if self.device.platform == "cpu":
            return "cpu", f"CPU ({platform.processor() or platform.machine()})"
        return "gpu", self.device.device_kind

    def execution_name(self):
        return "jax.jit" if self.compiled else "eager"

    def default_norm_constants(self):
        layer = make_norm(norm_after(self.spec, self.spec.norm_positions[0]))
        return getattr(layer, "momentum", None), layer.epsilon

    def save_state(self):  # functional: a forward returns new state and changes none
        return None

    def restore_state(self, saved):
        pass

    def train_mode_forward(self, images, capture):
        x = jax.device_put(nchw_to_nhwc(images).astype(self.dtype), self.device)
        logits, inputs = self._probe(self.variables, x)
        wide = jnp.float64 if self.dtype == "float64" else jnp.float32
        return np.asarray(logits), {
            name: (np.asarray(inputs[f"{name}_input"][0].astype(wide)), -1)  # channels last
            for name in (norm_features(self.spec) if capture else ())
        }

    def norm_moments(self, images):
        x = jax.device_put(nchw_to_nhwc(images).astype(self.dtype), self.device)
        return {
            name: (np.asarray(m, np.float64), np.asarray(v, np.float64))
            for name, (m, v) in self._moments(self.variables, x).items()
        }

    def _moments_impl(self, variables, x):
        """Each BN input's per-channel mean and biased variance from the probe's train-mode forward, on the
        device, in the run's dtype (float32 runs have no 64-bit JAX arrays): only the moments travel."""
        _, inputs = self._probe_impl(variables, x)
        out = {}
        for name in norm_features(self.spec):
            h = inputs[f"{name}_input"][0]
            axes = tuple(range(h.ndim - 1))  # channels last
            out[name] = (jnp.mean(h, axis=axes), jnp.var(h, axis=axes))
        return out

    def loss_and_gradient(self, images, labels, capture, noise=None):
        x = jax.device_put(nchw_to_nhwc(images).astype(self.dtype), self.device)
        y = jax.device_put(np.asarray(labels, dtype=np.int32), self.device)
        loss, grads, inputs = self._gradient(self.variables, x, y, noise)
        wide = np.float64 if self.dtype == "float64" else np.float32
        return (
            float(loss),
            {
                name: from_channels_last(name, np.asarray(grads[module][leaf]), self.spec)
                for name, (collection, module, leaf) in self.paths.items()
                if collection == "params" and is_trainable(name, self.spec)
            },
            {
                pos: (np.asarray(inputs[f"{pos}_input"][0]).astype(wide), -1)  # channels last
                for pos in (NORM_NAMES if capture else ())
            },
        )

    def _gradient_impl(self, variables, x, y, noise):
        """The mean loss, its gradient over "params" and the sown activation inputs; train-mode normalisation,
        dropout off. The new running statistics it computes are dropped."""

        def loss_fn(params):
            logits, state = self.model.apply(
                {**variables, "params": params},
                x,
                training=False,
                bn_training=True,
                mutable=["batch_stats", "activations"],
                noise=noise,
            )
            return jnp.mean(cross_entropy(logits, y)), state.get("activations", {})

        (loss, inputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return loss, grads, inputs

    # parameters ---------------------------------------------------------------
    def set_params(self, params):
        check_params(params, self.spec)
        variables = {}
        for name, (collection, module, leaf) in self.paths.items():
            value = to_channels_last(name, np.asarray(params[name], dtype=self.dtype), self.spec)
            variables.setdefault(collection, {}).setdefault(module, {})[leaf] = jax.device_put(value, self.device)
        self.variables = variables

    def _array(self, name):
        """The numpy value of a canonical name's variable, in Flax's layout."""
        collection, module, leaf = self.paths[name]
        return np.asarray(self.variables[collection][module][leaf])

    def get_params(self):
        return {name: from_channels_last(name, self._array(name), self.spec).astype(self.dtype) for name in self.paths}

    def save(self, path):
        """Flax's own serialisation (msgpack) of the variables, running statistics included."""
        with open(path if path.endswith(".msgpack") else path + ".msgpack", "wb") as f:
            f.write(serialization.to_bytes(self.variables))

    def load(self, path):
        with open(path if path.endswith(".msgpack") else path + ".msgpack", "rb") as f:
            restored = serialization.from_bytes(self.variables, f.read())
        self.variables = jax.device_put(restored, self.device)

    # data ---------------------------------------------------------------------
    def put(self, images, labels):
        return (
            jax.device_put(nchw_to_nhwc(images).astype(self.dtype), self.device),
            jax.device_put(np.asarray(labels, dtype=np.int32), self.device),
        )

    def put_order(self, order):
        return jax.device_put(np.asarray(order, dtype=np.int32), self.device)

    def device_noise(self, noise):
        return {
            n: tuple(jax.device_put(np.asarray(a, dtype=self.dtype), self.device) for a in p) for n, p in noise.items()
        }

    # work ---------------------------------------------------------------------
    def train_step(self, data, order, step):
        if self.mesh is None:
            self.variables, stats = self._step(
                self.variables, data[0], data[1], order, step, self.steps_done, self.noise
            )
        else:  # every input on every replica (the split once); the new variables back on the one device
            images, labels, order, noise = (
                self._on_replicas(slot, value)
                for slot, value in zip(("images", "labels", "order", "noise"), (data[0], data[1], order, self.noise))
            )
            variables = jax.device_put(self.variables, self.replicated)
            new, stats = self._step(variables, images, labels, order, step, self.steps_done, noise)
            self.variables = jax.device_put(new, self.device)
        self.steps_done += 1
        return stats

    def _on_replicas(self, slot, value):
        """A copy of a single-device input on every replica, made again only when the input in `slot` changes."""
        if value is None:
            return None
        held = self._shared.get(slot)
        if held is None or held[0] is not value:
            held = self._shared[slot] = (value, jax.device_put(value, self.replicated))
        return held[1]

    def replica_statistics(self):
        if not self.spec.variant.startswith("builtin"):
            return "the replicas' mean"
        if self.config.bn_sync == "global":
            return "replica 0's, the same on every replica (nn.BatchNorm(axis_name=...) pools them)"
        return "replica 0's (Flax keeps one copy per device)"

    def reduce_stats(self, stats):
        return np.asarray(jnp.sum(jnp.stack(stats), axis=0), dtype=np.float64)

    def _logits_impl(self, variables, x):
        return self.model.apply(variables, x, training=False)

    def _forward_impl(self, variables, x, y):
        losses, correct = loss_and_correct(self._logits_impl(variables, x), y)
        return jnp.stack([jnp.sum(losses), correct])

    def evaluate(self, data, batch_size):
        images, labels = data
        totals = [
            self._forward(self.variables, images[s : s + batch_size], labels[s : s + batch_size])
            for s in range(0, int(labels.shape[0]), batch_size)
        ]
        return self.reduce_stats(totals)

    def export_onnx(self, path, opset=None):
        from importlib.metadata import version

        import jax2onnx  # the port's exporter only (compare.port)
        import onnx

        side = self.spec.side
        variables = self.variables
        model = jax2onnx.to_onnx(
            lambda images: self.model.apply(variables, images, training=False),
            [("B", side, side, 1)],
            model_name="bn_lenet",
            enable_double_precision=self.dtype == "float64",
            **({"opset": opset} if opset else {}),
        )
        onnx.save(model, path)
        return {"exporter": f"jax2onnx {version('jax2onnx')}", "layout": "NHWC"}

    def predict(self, images):
        x = jax.device_put(nchw_to_nhwc(images).astype(self.dtype), self.device)
        return np.asarray(self._logits(self.variables, x))

    def _probe_impl(self, variables, x):
        # the new running statistics this returns are dropped: the probe changes no state
        logits_train, state = self.model.apply(
            variables, x, training=False, bn_training=True, mutable=["batch_stats", "intermediates"]
        )
        return logits_train, state.get("intermediates", {})

    def synchronize(self):
        jax.block_until_ready(self.variables)


BACKEND = JaxBackend  # what common.registry hands to the loop
