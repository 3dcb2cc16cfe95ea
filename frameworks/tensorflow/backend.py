"""TensorFlow / Keras 3 backend: common.interface.Backend over BNLeNet (NHWC).

Training mode is passed at every call: train_step calls the model with
training=True; evaluate/predict with training=False; the probe with
training=False, bn_training=True, and restores the running statistics
afterwards. Images arrive as canonical NCHW numpy and are transposed to NHWC
once, when they are put on the device. Execution: xla (the default) compiles
the update step and the eval forward with XLA (`tf.function(jit_compile=True)`),
the batch gathered by a plain tf.function before it; compiled = tf.function
for the whole step; eager = neither.

Data parallel (--replicas K, docs/data-parallel.md): tf.distribute.MirroredStrategy over K logical CPU devices of
this process (`prepare` makes them before TensorFlow starts), the model's variables mirrored on each. A step gathers
the batch once, and strategy.run gives replica r its contiguous slice r * B/K ... (r + 1) * B/K - 1; each replica
averages its gradients with the others' through the replica context's all_reduce (whose gradient is an all_reduce
too) and applies them to its own copy of the variables, so the copies stay equal. The scratch BN layers normalise
with the slice's statistics (local) or the whole batch's (global, batchnorm.synced_batch_norm); the built-in layer
is keras.layers.BatchNormalization, with synchronized=True under global sync. Everything else (evaluation, probes,
the population pass) runs outside the strategy on replica 0's copy, and assigns every copy. The step runs as a
tf.function: XLA refuses it (a jit_compile'd step may not touch the other devices' variables).
"""

import platform

import keras
import numpy as np
import tensorflow as tf

from common.errors import BackendUnavailable
from common.init import check_params, is_trainable, parameter_shapes
from common.interface import Backend, DataParallel, resolve_execution
from common.layout import from_channels_last, nchw_to_nhwc, to_channels_last
from common.norms import norm_after

from .batchnorm import replica_context
from .lenet import (
    BNLeNet,
    make_norm,
    trainable_variables,
    variable,
)

# XLA by default: the fastest of the three modes on the CPU, tf.function next, eager last (docs/benchmark.md,
# "Execution modes", has the figures).
DEFAULT_EXECUTION = "xla"
EXECUTION_NAMES = {"compiled": "tf.function", "xla": "tf.function(jit_compile=True)", "eager": "eager"}


def resolve_device(requested):
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "gpu" and not gpus:
        raise BackendUnavailable(
            f"--device gpu asked for, but this TensorFlow ({tf.__version__}) sees no GPU; use --device cpu or "
            "auto, or install tensorflow[and-cuda] on a machine with an NVIDIA driver"
        )
    return "/GPU:0" if requested in ("gpu", "auto") and gpus else "/CPU:0"


def prepare(configs, options: dict | None = None) -> None:
    """Before TensorFlow starts its runtime: as many logical CPU devices as the job's largest --replicas
    (TensorFlow fixes them when it starts; compare.execution.worker calls this once per worker)."""
    most = max((c.replicas for c in configs), default=1)
    if most > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * most)


class TensorFlowBackend(Backend):
    name = "tensorflow"
    data_parallel = DataParallel(  # --replicas K: MirroredStrategy over K logical CPU devices (prepare)
        engine="devices",
        where="the host CPU's logical devices",
        executions=(EXECUTION_NAMES["compiled"],),
        why_executions="XLA, --execution xla, refuses MirroredStrategy's step: a jit_compile'd function may not touch "
        "the variables on the other devices",
        global_sync=("scratch", "builtin", "builtin-defaults"),
        devices="TensorFlow fixes them when it starts. compare.run makes them for its workers; in your own process "
        "call frameworks.tensorflow.backend.prepare([config]) before any TensorFlow work",
    )

    def __init__(self, config):
        super().__init__(config)
        self.device = resolve_device(config.device)
        self.dtype = config.dtype
        self.spec = config.model
        # dropout masks only (weights come from common). Keras 3's Dropout seeds its own SeedGenerator from
        # Python's `random` when built: tf.random.set_seed alone left a run's masks depending on what the
        # worker ran before it; set_random_seed seeds Python, NumPy, TF and Keras' global generator.
        keras.utils.set_random_seed(config.seed)
        size = config.model.side
        # under --replicas the step is a tf.function: XLA cannot compile MirroredStrategy's step (docstring)
        default = "compiled" if config.replicas > 1 else DEFAULT_EXECUTION
        self.execution = resolve_execution(config, default, ("compiled", "eager", "xla"))
        self.strategy = self._data_parallel(config) if config.replicas > 1 else None
        # the strategy's scope mirrors every variable created in it on each replica's device
        with self.strategy.scope() if self.strategy else tf.device(self.device):
            # mixed precision: Keras' own mechanism, the mixed_bfloat16 dtype policy on every layer
            sync = config.bn_sync if self.strategy else None
            self.model = BNLeNet(config.layer_spec, config.precision, sync=sync)
            self.model(tf.zeros((2, size, size, 1), dtype=config.dtype))  # build every variable
        self.trainable = trainable_variables(self.model)
        self.lr = tf.constant(config.lr, dtype=config.dtype)
        if self.strategy is not None:
            self._step = tf.function(self._replicated_step_impl)
            self._forward = tf.function(self._forward_impl)
            self._moments = tf.function(self._moments_impl)
        elif self.execution == "xla":
            # the batch gather stays outside the XLA computation: inside it, XLA on the CPU ran the
            # step at ~110 examples/s (docs/benchmark.md, "Execution modes")
            gather, update = tf.function(self._gather_impl), tf.function(self._update_impl, jit_compile=True)
            self._step = lambda images, labels, order, step, noise: update(*gather(images, labels, order, step, noise))
            self._forward = tf.function(self._forward_impl, jit_compile=True)
            # the population pass's 8 forwards an epoch: a graph, not XLA (whose compilation took 1.6 s at the
            # defaults against 0.6 s for tracing, for 0.16 s against 0.19 s an epoch after it)
            self._moments = tf.function(self._moments_impl)
        else:
            wrap = tf.function if self.execution == "compiled" else (lambda f: f)
            self._step = wrap(self._step_impl)
            self._forward = wrap(self._forward_impl)
            self._moments = wrap(self._moments_impl)

    def _data_parallel(self, config):
        """The MirroredStrategy over K logical CPU devices a data-parallel step runs on, or the reason it cannot
        run."""
        devices = tf.config.list_logical_devices("CPU")
        device = "cpu" if self.device == "/CPU:0" else "gpu"
        self.check_replicas(config, device, EXECUTION_NAMES[self.execution], len(devices))
        # reducing through one device, in merge_call: with the default on these devices, collective all-reduces,
        # steps failed now and then with "Shape mismatch in the collective instance 100" (the replicas' collectives
        # paired out of order: the gradients' with a BN layer's)
        return tf.distribute.MirroredStrategy(
            [d.name for d in devices[: config.replicas]], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )

    def replica_statistics(self):
        if self.spec.variant == "scratch":
            return "the replicas' mean"
        if self.config.bn_sync == "global":
            return "replica 0's, the same on every replica (BatchNormalization(synchronized=True) pools them)"
        return "replica 0's (Keras keeps one copy per replica)"

    # hooks of the Backend template (common.interface) -------------------------------------------------------
    def framework_version(self):
        return tf.__version__

    def device_info(self):
        if self.device.startswith("/GPU"):
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            return "gpu", details.get("device_name", "GPU")
        return "cpu", f"CPU ({platform.processor() or platform.machine()})"

    def execution_name(self):
        return EXECUTION_NAMES[self.execution]

    def default_norm_constants(self):
        layer = make_norm(norm_after(self.spec, self.spec.norm_positions[0]))
        return getattr(layer, "momentum", None), layer.epsilon

    def train_mode_forward(self, images, capture):
        x = tf.constant(nchw_to_nhwc(images).astype(self.dtype))
        with tf.device(self.device):
            logits, inputs = self._norm_forward(x, capture)
        return logits.numpy(), {name: (tf.cast(h, tf.float64).numpy(), -1) for name, h in inputs.items()}

    def _norm_forward(self, x, capture):
        """Logits with the normalisation layers in train mode (dropout off) and {norm name: its input} where
        capture (recorded by the model as it calls each layer: on an eager call, or while tracing)."""
        inputs = {} if capture else None
        object.__setattr__(self.model, "norm_inputs", inputs)  # past Keras' attribute tracking
        try:
            logits = self.model(x, training=False, bn_training=True)
        finally:
            object.__setattr__(self.model, "norm_inputs", None)
        return logits, inputs or {}

    def norm_moments(self, images):
        with tf.device(self.device):
            moments = self._moments(tf.constant(nchw_to_nhwc(images).astype(self.dtype)))
        return {name: (mean.numpy(), var.numpy()) for name, (mean, var) in moments.items()}

    def _moments_impl(self, x):
        """One train-mode forward, in the run's execution mode: each BN input's per-channel mean and biased
        variance, in float64 on the device. The running statistics (every non-trainable variable) are read
        before it and assigned back after it, in the same call, so it changes no state."""
        state = self.model.non_trainable_variables
        before = [tf.identity(v) for v in state]
        _, inputs = self._norm_forward(x, True)
        with tf.control_dependencies(list(inputs.values())):
            for v, value in zip(state, before):
                v.assign(value)
        return {
            name: tf.nn.moments(tf.cast(h, tf.float64), axes=list(range(len(h.shape) - 1)))
            for name, h in inputs.items()
        }

    def loss_and_gradient(self, images, labels, capture, noise=None):
        x = tf.constant(nchw_to_nhwc(images).astype(self.dtype))
        y = tf.constant(labels, dtype=tf.int32)
        names = [n for n in parameter_shapes(self.spec) if is_trainable(n, self.spec)]
        variables = [variable(self.model, n) for n in names]
        activations = {} if capture else None
        object.__setattr__(self.model, "activation_inputs", activations)  # past Keras' attribute tracking
        try:
            with tf.device(self.device), tf.GradientTape() as tape:
                logits = self.model(x, training=False, bn_training=True, noise=noise)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            grads = tape.gradient(loss, variables)
        finally:
            object.__setattr__(self.model, "activation_inputs", None)
        return (
            float(loss),
            {n: from_channels_last(n, g.numpy(), self.spec) for n, g in zip(names, grads)},
            {pos: (tf.cast(h, tf.float64).numpy(), -1) for pos, h in (activations or {}).items()},
        )

    def set_params(self, params):
        check_params(params, self.spec)
        for name, value in params.items():
            variable(self.model, name).assign(to_channels_last(name, np.asarray(value, dtype=self.dtype), self.spec))

    def get_params(self):
        return {
            name: from_channels_last(name, variable(self.model, name).numpy(), self.spec).astype(self.dtype)
            for name in parameter_shapes(self.spec)
        }

    def save(self, path):
        self.model.save_weights(path if path.endswith(".weights.h5") else path + ".weights.h5")

    def load(self, path):
        self.model.load_weights(path if path.endswith(".weights.h5") else path + ".weights.h5")

    def put(self, images, labels):
        with tf.device(self.device):
            return (tf.constant(nchw_to_nhwc(images).astype(self.dtype)), tf.constant(labels, dtype=tf.int32))

    def put_order(self, order):
        with tf.device(self.device):
            return tf.constant(order, dtype=tf.int32)

    def device_noise(self, noise):
        with tf.device(self.device):
            return {n: tuple(tf.constant(np.asarray(a, dtype=self.dtype)) for a in pair) for n, pair in noise.items()}

    def _gather_impl(self, images, labels, order, step, noise=None):
        index = order[step]
        rows = None if noise is None else {n: (tf.gather(a, step), tf.gather(b, step)) for n, (a, b) in noise.items()}
        return tf.gather(images, index), tf.gather(labels, index), rows

    def _step_impl(self, images, labels, order, step, noise=None):
        return self._update_impl(*self._gather_impl(images, labels, order, step, noise))

    def _update_impl(self, x, y, noise=None):
        """One SGD step on the batch (x, y); [loss_sum, correct]. Inside strategy.run (data parallel): on this
        replica's slice of it, the gradients averaged and [loss_sum, correct] summed over the replicas."""
        context = replica_context()
        replicated = context is not None
        if replicated:
            share = self.config.batch_size // self.config.replicas
            mine = context.replica_id_in_sync_group * share + tf.range(share)
            x, y = tf.gather(x, mine), tf.gather(y, mine)
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True, noise=noise)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf.reduce_mean(losses)
        grads = tape.gradient(loss, self.trainable)
        if replicated:
            grads = context.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
        for var, grad in zip(self.trainable, grads):
            var.assign_sub(self.lr * grad)  # in a replica: its own copy (the variables aggregate nothing)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), loss.dtype))
        stats = tf.stack([tf.reduce_sum(losses), correct])
        return context.all_reduce(tf.distribute.ReduceOp.SUM, stats) if replicated else stats

    def _replicated_step_impl(self, images, labels, order, step, noise=None):
        """The data-parallel step: the whole batch gathered once, each replica's update on its slice."""
        per_replica = self.strategy.run(self._update_impl, args=self._gather_impl(images, labels, order, step, noise))
        return self.strategy.experimental_local_results(per_replica)[0]

    def train_step(self, data, order, step):
        with tf.device(self.device):
            return self._step(data[0], data[1], order, tf.constant(step, dtype=tf.int32), self.noise)

    def reduce_stats(self, stats):
        return tf.add_n(stats).numpy().astype(np.float64)

    def _forward_impl(self, x, y):
        logits = self.model(x, training=False)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), losses.dtype))
        return tf.stack([tf.reduce_sum(losses), correct])

    def evaluate(self, data, batch_size):
        images, labels = data
        n = int(labels.shape[0])
        with tf.device(self.device):
            totals = [
                self._forward(images[s : s + batch_size], labels[s : s + batch_size]) for s in range(0, n, batch_size)
            ]
        return self.reduce_stats(totals)

    def export_onnx(self, path, opset=None):
        import tf2onnx  # the port's exporter only (compare.port)

        side = self.spec.side
        signature = [tf.TensorSpec((None, side, side, 1), self.dtype, name="images")]
        logits = tf.function(lambda images: self.model(images, training=False))
        tf2onnx.convert.from_function(logits, input_signature=signature, opset=opset, output_path=path)
        return {"exporter": f"tf2onnx {tf2onnx.__version__}", "layout": "NHWC"}

    def predict(self, images):
        with tf.device(self.device):
            return self.model(tf.constant(nchw_to_nhwc(images).astype(self.dtype)), training=False).numpy()

    def synchronize(self):
        # Eager ops are dispatched synchronously on the host (TensorFlow's default). On a GPU the
        # kernels run on its stream; reading a variable every step updates waits for all of them.
        self.model.fc3.kernel.numpy()


BACKEND = TensorFlowBackend  # what common.registry hands to the loop
