"""The bare Gluon loop: the fastest plain loop a practitioner would write, for the benchmark.

The same BN-LeNet, hybridized as the run asks (`static_alloc`, `static_shape`),
the whole split already an NDArray in the context, `nd.take` of each batch (the
suite's batch order, so the work is the same), `autograd.record()`,
`loss.backward()`, `gluon.Trainer.step`. The epoch's loss sum and correct count
accumulate as NDArrays and are read once, at the end: no host synchronisation
inside the epoch. Nothing of the suite's interface in between.
"""

import time

import numpy as np
from mxnet import autograd, nd

from common.data import batch_order
from common.init import init_params
from common.norms import norm_layer

from .backend import MXNetBackend, resolve_context
from .lenet import make_norm

DESCRIPTION = "bare loop: NDArrays in the context, take per batch, metrics summed as NDArrays, read once"


def epoch(config, dataset, warmup_steps=5):
    """One epoch (the suite's epoch-1 batch order); returns (examples/s after the warm-up steps, the
    backend holding the trained model: tests compare its parameters with the suite's)."""
    backend = MXNetBackend(config)  # only to build the same net, trainer and loss in the same context
    backend.set_params(init_params(config.model, config.seed, config.dtype))
    net, trainer, loss_fn, ctx = backend.net, backend.trainer, backend.loss, backend.ctx
    n = config.train_limit or len(dataset.train_labels)
    images = nd.array(dataset.train_images[:n], ctx=ctx, dtype=config.dtype)
    labels = nd.array(dataset.train_labels[:n], ctx=ctx, dtype=config.dtype)
    order = batch_order(config.seed, 1, n, config.batch_size)
    indices = nd.array(order, ctx=ctx, dtype="int32")
    loss_sum = correct = nd.zeros((1,), ctx=ctx, dtype=config.dtype)
    warm = min(warmup_steps, len(order) - 1)
    for i in range(len(order)):
        if i == warm:
            nd.waitall()
            start = time.perf_counter()
        index = indices[i]
        x, y = nd.take(images, index), nd.take(labels, index)
        with autograd.record():
            logits, *new_stats = net(x)
            loss = loss_fn(logits, y)
        loss.backward()
        trainer.step(config.batch_size)
        net.store_running(new_stats)  # the scratch layers' running statistics (nothing for the built-in)
        loss_sum = loss_sum + loss.sum()
        correct = correct + (logits.argmax(axis=1) == y).sum()
    nd.concat(loss_sum, correct, dim=0).asnumpy()  # the one read of the epoch
    return (len(order) - warm) * config.batch_size / (time.perf_counter() - start), backend


def matmul_seconds(config, n):
    """Seconds one n x n matrix product takes on the run's device in its dtype (the median of 5, after a warm-up):
    the machine's peak for compare.bench."""
    ctx = resolve_context(config.device)
    a = nd.array(np.random.RandomState(0).standard_normal((n, n)), ctx=ctx, dtype=config.dtype)

    def once():
        began = time.perf_counter()
        nd.dot(a, a).wait_to_read()
        return time.perf_counter() - began

    once()
    return float(np.median([once() for _ in range(5)]))


def norm_step(config, shape):
    """One training-mode forward and backward of the run's normalisation layer (config.model's norm and variant,
    built as the model builds it, hybridized as the run's net is) over an NCHW input of `shape` on the run's
    device, a scratch layer's new running statistics stored as the net stores them: (a call that runs one and
    waits, the execution's name), for compare.bench --layer."""
    backend = MXNetBackend(config)  # the run's device and execution mode, resolved as for a run
    ctx, rng = resolve_context(config.device), np.random.RandomState(0)
    layer = make_norm(norm_layer(config.model, shape[1], len(shape)), config.dtype)
    layer.initialize(ctx=ctx)
    layer.cast(config.dtype)
    if backend.hybridized:
        layer.hybridize(static_alloc=True, static_shape=True)
    x, dy = (nd.array(rng.standard_normal(shape), ctx=ctx, dtype=config.dtype) for _ in "ab")
    x.attach_grad()
    scratch = hasattr(layer, "state")  # our layers take the mode and return their new state
    flag = nd.array([1.0], ctx=ctx, dtype=config.dtype)

    def once():
        with autograd.record():
            out = layer(x, flag) if scratch else layer(x)
        (out[0] if scratch else out).backward(dy)
        if scratch:
            layer.store(*out[1:])
        nd.waitall()

    return once, backend.execution_name()


def triad_step(config, elements):
    """A STREAM-like triad over `elements` values of the run's dtype on its device (common.roofline): a = a - s c
    in place, as nd.sgd_update computes it, one fused kernel that reads two arrays and writes one (b + 2 c would
    be two kernels in MXNet on a CPU, moving 5 values per element instead of 3)."""
    ctx, rng = resolve_context(config.device), np.random.RandomState(0)
    a, c = (nd.array(rng.standard_normal(elements), ctx=ctx, dtype=config.dtype) for _ in "ac")

    def once():
        nd.sgd_update(a, c, lr=1e-6, out=a)  # a drifts by 1e-6 c per call: no overflow in any run
        a.wait_to_read()

    return once
