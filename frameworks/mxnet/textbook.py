"""The Gluon training loop as the textbook writes it, for the throughput benchmark.

Imperative (not hybridized), a gluon DataLoader over an ArrayDataset, the same
scratch BatchNorm inside the same BN-LeNet, `trainer.step(batch_size)`, and the
per-batch metric accumulation that converts to Python floats (one wait per step).
"""

import time

from mxnet import autograd, gluon, nd

from common.init import init_params

from .backend import MXNetBackend

DESCRIPTION = "textbook loop: imperative Gluon, DataLoader over an ArrayDataset, float() metrics per batch"


def examples_per_second(config, dataset, warmup_steps=5):
    backend = MXNetBackend(config.replace(execution="eager"))  # same net, not hybridized
    backend.set_params(init_params(config.model, config.seed, config.dtype))
    net, ctx = backend.net, backend.ctx
    n = config.train_limit or len(dataset.train_labels)
    data = gluon.data.ArrayDataset(
        nd.array(dataset.train_images[:n], dtype=config.dtype), nd.array(dataset.train_labels[:n], dtype=config.dtype)
    )
    train_iter = gluon.data.DataLoader(data, batch_size=config.batch_size, shuffle=True, last_batch="discard")
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = backend.trainer
    metric = [0.0, 0.0, 0]
    start, timed = None, 0
    for i, (X, y) in enumerate(train_iter):
        if i == warmup_steps:
            nd.waitall()
            start = time.perf_counter()
        X, y = X.as_in_context(ctx), y.as_in_context(ctx)
        with autograd.record():
            y_hat, *new_stats = net(X)
            l = loss(y_hat, y)
        l.backward()
        trainer.step(X.shape[0])
        net.store_running(new_stats)  # the scratch layer's update, as in the suite
        metric[0] += float(l.sum().asscalar())
        metric[1] += float((y_hat.argmax(axis=1) == y).sum().asscalar())
        metric[2] += y.size
        if start is not None:
            timed += y.shape[0]
    nd.waitall()
    return timed / (time.perf_counter() - start)
