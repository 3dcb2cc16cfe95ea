"""The bare TensorFlow loop: the fastest plain loop a practitioner would write, for the benchmark.

A custom training loop as TensorFlow's guide writes it: the same BN-LeNet,
a train step under `tf.function` (under `jit_compile=True` for XLA runs, the batch
gathered before it; eager when the run asks for eager) with
`tf.GradientTape` and `keras.optimizers.SGD.apply_gradients`, the whole split
already a tensor on the device and `tf.gather` of each batch inside the step
(the suite's batch order, so the work is the same). The epoch's loss sum and
correct count accumulate in tf.Variables and are read once, at the end: no host
synchronisation inside the epoch. Nothing of the suite's interface in between.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from common.data import batch_order
from common.init import init_params
from common.layout import nchw_to_nhwc
from common.norms import norm_layer

from .backend import TensorFlowBackend, resolve_device
from .lenet import make_norm

DESCRIPTION = (
    "bare loop: the step under tf.function (XLA: jit_compile; eager runs: plain eager), Keras SGD, tensors on the "
    "device, "
    "gather per batch, metrics read once"
)


def epoch(config, dataset, warmup_steps=5):
    """One epoch (the suite's epoch-1 batch order); returns (examples/s after the warm-up steps, the
    backend holding the trained model: tests compare its parameters with the suite's)."""
    backend = TensorFlowBackend(config)  # only to build the same BNLeNet on the same device
    backend.set_params(init_params(config.model, config.seed, config.dtype))
    model = backend.model
    n = config.train_limit or len(dataset.train_labels)
    order = batch_order(config.seed, 1, n, config.batch_size)
    with tf.device(backend.device):
        images = tf.constant(nchw_to_nhwc(dataset.train_images[:n]).astype(config.dtype))
        labels = tf.constant(dataset.train_labels[:n], dtype=tf.int32)
        indices = tf.constant(order, dtype=tf.int32)
        totals = tf.Variable(tf.zeros(2, dtype=config.dtype))
    optimizer = keras.optimizers.SGD(learning_rate=config.lr)
    variables = backend.trainable

    def batch(i):
        return tf.gather(images, indices[i]), tf.gather(labels, indices[i])

    def update(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), loss.dtype))
        totals.assign_add(tf.stack([loss, correct]))

    # as the suite runs it: XLA for the update only (the gather outside it), tf.function, or eager
    if backend.execution == "xla":
        batch, update = tf.function(batch), tf.function(update, jit_compile=True)

    def step(i):
        return update(*batch(i))

    step = tf.function(step) if backend.execution == "compiled" else step
    warm = min(warmup_steps, len(order) - 1)
    with tf.device(backend.device):
        for i in range(len(order)):
            if i == warm:
                totals.numpy()
                start = time.perf_counter()
            step(tf.constant(i))
        totals.numpy()  # the one read of the epoch
    return (len(order) - warm) * config.batch_size / (time.perf_counter() - start), backend


def matmul_seconds(config, n):
    """Seconds one n x n matrix product takes on the run's device in its dtype (the median of 5, after a warm-up):
    the machine's peak for compare.bench."""
    with tf.device(resolve_device(config.device)):
        a = tf.constant(np.random.RandomState(0).standard_normal((n, n)), dtype=config.dtype)
        product = tf.function(lambda m: tf.reduce_sum(tf.linalg.matmul(m, m)))

        def once():
            began = time.perf_counter()
            product(a).numpy()  # .numpy(): waits for the device; the sum is n^2 of the 2 n^3 operations
            return time.perf_counter() - began

        once()
        return float(np.median([once() for _ in range(5)]))


def norm_step(config, shape):
    """One training-mode forward and backward of the run's normalisation layer (config.model's norm and variant,
    built as the model builds it, in the run's execution mode: eager, tf.function or XLA) over an NCHW input of
    `shape` (run channels last, as in the model) on the run's device: (a call that runs one and waits, the
    execution's name), for compare.bench --layer."""
    backend = TensorFlowBackend(config)  # the run's device and execution mode, resolved as for a run
    rng = np.random.RandomState(0)
    with tf.device(resolve_device(config.device)):
        layer = make_norm(norm_layer(config.model, shape[1], len(shape)), config.dtype)
        x, dy = (tf.constant(nchw_to_nhwc(rng.standard_normal(shape)), dtype=config.dtype) for _ in "ab")
        layer.build(x.shape)

        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, [*layer.trainable_variables, x], output_gradients=dy)

        if backend.execution != "eager":
            step = tf.function(step, jit_compile=backend.execution == "xla")

    def once():
        step(x, dy)[0].numpy()  # dgamma, C values: the call has finished

    return once, backend.execution_name()


def triad_step(config, elements):
    """A STREAM triad, a = b + 2 c, over `elements` values of the run's dtype on its device (common.roofline),
    one XLA-compiled kernel."""
    rng = np.random.RandomState(0)
    with tf.device(resolve_device(config.device)):
        b, c = (tf.constant(rng.standard_normal(elements), dtype=config.dtype) for _ in "bc")
        triad = tf.function(lambda b, c: b + 2 * c, jit_compile=True)

    def once():
        triad(b, c)[:1].numpy()

    return once
