"""The PyTorch training loop as the textbook writes it, for the throughput benchmark.

A DataLoader over in-memory tensors, `net(X)`, `loss(y_hat, y).mean().backward()`,
`trainer.step()`, and the per-batch metric accumulation that converts to Python
floats (one device round trip per step). Same model, batch size and data as the suite.
"""

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.init import init_params

from .backend import TorchBackend

DESCRIPTION = "textbook loop: DataLoader over in-memory tensors, float() metrics per batch"


def examples_per_second(config, dataset, warmup_steps=5):
    backend = TorchBackend(config)  # the same BNLeNet and device as the suite
    backend.set_params(init_params(config.model, config.seed, config.dtype))
    net, device = backend.model, backend.device
    n = config.train_limit or len(dataset.train_labels)
    data = TensorDataset(torch.as_tensor(dataset.train_images[:n]), torch.as_tensor(dataset.train_labels[:n]))
    train_iter = DataLoader(data, batch_size=config.batch_size, shuffle=True, drop_last=True)
    loss = nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.SGD(net.parameters(), lr=config.lr)
    metric = [0.0, 0.0, 0]
    net.train()
    start, timed = None, 0
    for i, (X, y) in enumerate(train_iter):
        if i == warmup_steps:
            backend.synchronize()
            start = time.perf_counter()
        X, y = X.to(device), y.to(device)
        trainer.zero_grad()
        y_hat = net(X)
        l = loss(y_hat, y)
        l.mean().backward()
        trainer.step()
        with torch.no_grad():
            metric[0] += float(l.sum())
            metric[1] += float((y_hat.argmax(axis=1) == y).sum())
            metric[2] += y.numel()
        if start is not None:
            timed += y.numel()
    backend.synchronize()
    return timed / (time.perf_counter() - start)
