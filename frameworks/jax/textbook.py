"""The JAX training loop as the textbook writes it, for the throughput benchmark.

A reader of the textbook's JAX tab keeps the model state in a Flax `TrainState`
(params, batch_stats, an optax SGD), jits a training step that calls
`model.apply(..., mutable=["batch_stats"])` under `jax.value_and_grad`, and feeds it
numpy batches from a shuffled host-side iterator, reading the loss and the correct
count back with float() after every batch (one host round trip per step). Same
BN-LeNet (the scratch layer for scratch), initial parameters, lr and batch size as the suite.
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from common.layout import nchw_to_nhwc

from .backend import JaxBackend

DESCRIPTION = "textbook loop: Flax TrainState, jitted step over host-fed numpy batches, float() metrics per batch"


class TrainState(train_state.TrainState):
    batch_stats: Any


def examples_per_second(config, dataset, warmup_steps=5):
    backend = JaxBackend(config)  # the same BNLeNet and initial parameters
    variables, model = backend.variables, backend.model
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(config.lr),
        batch_stats=variables.get("batch_stats", {}),
    )

    @jax.jit
    def train_step(state, X, y):
        def loss(params):
            y_hat, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, X, training=True, mutable=["batch_stats"]
            )
            l = optax.softmax_cross_entropy_with_integer_labels(y_hat, y)
            return l.mean(), (updates.get("batch_stats", {}), l.sum(), (y_hat.argmax(axis=1) == y).sum())

        (_, (batch_stats, l_sum, correct)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), l_sum, correct

    n = config.train_limit or len(dataset.train_labels)
    images, labels = nchw_to_nhwc(dataset.train_images[:n]).astype(config.dtype), dataset.train_labels[:n]
    order = np.random.permutation(n)
    metric = [0.0, 0.0, 0]
    start, timed = None, 0
    for i, first in enumerate(range(0, n - config.batch_size + 1, config.batch_size)):
        if i == warmup_steps:
            jax.block_until_ready(state)
            start = time.perf_counter()
        index = order[first : first + config.batch_size]
        X, y = jnp.asarray(images[index]), jnp.asarray(labels[index].astype(np.int32))
        state, l_sum, correct = train_step(state, X, y)
        metric[0] += float(l_sum)
        metric[1] += float(correct)
        metric[2] += len(index)
        if start is not None:
            timed += len(index)
    jax.block_until_ready(state)
    return timed / (time.perf_counter() - start)
