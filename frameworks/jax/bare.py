"""The bare JAX loop: the fastest plain loop a practitioner would write, for the benchmark.

The whole split and the epoch's (steps, batch) index matrix are already on the
device; one jitted step (`jax.jit`, the variables and optimizer state donated on a
GPU) gathers its batch, runs `model.apply(..., mutable=["batch_stats"])` under
`jax.grad` and applies `optax.sgd`; the epoch's loss sum and correct count accumulate
on the device and are read once, at the end: no host synchronisation inside the
epoch. The same BN-LeNet, initial parameters, lr, batch size and batch order (the
suite's epoch 1) as the suite; nothing of the suite's interface in between.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.data import batch_order
from common.layout import nchw_to_nhwc
from common.norms import norm_layer

from .backend import JaxBackend, enable_float64, resolve_device
from .lenet import make_norm, mode_kwargs

DESCRIPTION = (
    "bare loop: one jitted step (eager for eager runs) with optax SGD, arrays on the device, gather per "
    "batch, metrics summed on the device, read once"
)


def epoch(config, dataset, warmup_steps=5):
    """One epoch (the suite's epoch-1 batch order); returns (examples/s after the warm-up steps, the
    backend holding the trained model: tests compare its parameters with the suite's)."""
    backend = JaxBackend(config)  # only to build the same BNLeNet and parameters on the same device
    model, device = backend.model, backend.device
    frozen = {
        module: {leaf: "train" if trainable else "frozen" for leaf, trainable in leaves.items()}
        for module, leaves in backend.trainable_mask().items()
    }
    optimizer = optax.multi_transform({"train": optax.sgd(config.lr), "frozen": optax.set_to_zero()}, frozen)
    n = config.train_limit or len(dataset.train_labels)
    images = jax.device_put(nchw_to_nhwc(dataset.train_images[:n]).astype(config.dtype), device)
    labels = jax.device_put(dataset.train_labels[:n].astype(np.int32), device)
    order = jax.device_put(batch_order(config.seed, 1, n, config.batch_size).astype(np.int32), device)
    dropout_key = jax.random.key(config.seed)

    def step(carry, i):
        params, batch_stats, opt_state, totals = carry
        x, y = images[order[i]], labels[order[i]]

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                training=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(dropout_key, i)},
            )
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            correct = jnp.sum(jnp.argmax(logits, axis=1) == y).astype(logits.dtype)
            return jnp.mean(losses), (updates.get("batch_stats", {}), jnp.sum(losses), correct)

        grads, (batch_stats, loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, totals + jnp.stack([loss_sum, correct])

    if backend.compiled:
        step = jax.jit(step, donate_argnums=(0,) if device.platform != "cpu" else ())
    variables = backend.variables
    carry = (
        variables["params"],
        variables.get("batch_stats", {}),
        optimizer.init(variables["params"]),
        jax.device_put(np.zeros(2, dtype=config.dtype), device),
    )
    steps = int(order.shape[0])
    warm = min(warmup_steps, steps - 1)
    for i in range(steps):
        if i == warm:
            jax.block_until_ready(carry)
            start = time.perf_counter()
        carry = step(carry, i)
    np.asarray(carry[3])  # the one read of the epoch
    seconds = time.perf_counter() - start
    params, batch_stats = carry[:2]
    backend.variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    return (steps - warm) * config.batch_size / seconds, backend


def matmul_seconds(config, n):
    """Seconds one n x n matrix product takes on the run's device in its dtype (the median of 5, after a warm-up):
    the machine's peak for compare.bench."""
    enable_float64(config.dtype)
    a = jax.device_put(
        np.random.RandomState(0).standard_normal((n, n)).astype(config.dtype), resolve_device(config.device)
    )
    product = jax.jit(jnp.dot)

    def once():
        began = time.perf_counter()
        product(a, a).block_until_ready()
        return time.perf_counter() - began

    once()
    return float(np.median([once() for _ in range(5)]))


def norm_step(config, shape):
    """One training-mode forward and backward of the run's normalisation layer (config.model's norm and variant,
    built as the model builds it, jitted unless the run is eager) over an NCHW input of `shape` (run channels
    last, as in the model) on the run's device, the new running statistics carried to the next call as in
    training: (a call that runs one and waits, the execution's name), for compare.bench --layer."""
    backend = JaxBackend(config)  # the run's device, dtype and execution mode, resolved as for a run
    enable_float64(config.dtype)
    layer = make_norm(norm_layer(config.model, shape[1], len(shape)), config.dtype)
    kwargs = mode_kwargs(layer, True)
    rng, device = np.random.RandomState(0), resolve_device(config.device)
    x, dy = (jax.device_put(nchw_to_nhwc(rng.standard_normal(shape)).astype(config.dtype), device) for _ in "ab")
    variables = layer.init(jax.random.PRNGKey(0), x, **kwargs)

    def step(params, stats, x, dy):
        def forward(x, params):
            return layer.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"], **kwargs)

        y, backward, updates = jax.vjp(forward, x, params, has_aux=True)
        return backward(dy), updates.get("batch_stats", {})

    step = jax.jit(step) if backend.compiled else step
    carried = {"stats": variables.get("batch_stats", {})}

    def once():
        grads, carried["stats"] = step(variables["params"], carried["stats"], x, dy)
        jax.block_until_ready((grads, carried["stats"]))

    return once, backend.execution_name()


def triad_step(config, elements):
    """A STREAM triad, a = b + 2 c, over `elements` values of the run's dtype on its device (common.roofline),
    one jitted kernel."""
    enable_float64(config.dtype)
    rng, device = np.random.RandomState(0), resolve_device(config.device)
    b, c = (jax.device_put(rng.standard_normal(elements).astype(config.dtype), device) for _ in "bc")
    triad = jax.jit(lambda b, c: b + 2 * c)

    def once():
        triad(b, c).block_until_ready()

    return once
