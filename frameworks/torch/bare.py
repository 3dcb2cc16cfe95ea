"""The bare PyTorch loop: the fastest plain loop a practitioner would write, for the benchmark.

The whole split is already a tensor on the device; each batch is an index into
it (the suite's batch order, so the work is the same); `model(x)`,
`F.cross_entropy`, `loss.backward()`, `torch.optim.SGD.step()`. The epoch's
loss sum and correct count accumulate on the device and are read once, at the
end: no host synchronisation inside the epoch. Same model, parameters, lr and
batch size as the suite; nothing of the suite's interface in between.
"""

import time

import numpy as np
import torch
from torch.nn import functional as F

from common.data import batch_order
from common.init import init_params
from common.norms import norm_layer

from .backend import DTYPES, TorchBackend, resolve_device
from .lenet import make_norm

DESCRIPTION = "bare loop: tensors on the device, index per batch, metrics summed on the device, read once"


def epoch(config, dataset, warmup_steps=5):
    """One epoch (the suite's epoch-1 batch order); returns (examples/s after the warm-up steps, the
    backend holding the trained model: tests compare its parameters with the suite's)."""
    backend = TorchBackend(config)  # only to build the same BNLeNet on the same device
    backend.set_params(init_params(config.model, config.seed, config.dtype))
    model, device = backend.model, backend.device
    forward = backend.train_forward  # torch.compile(model) when the run is compiled, as a user would write it
    n = config.train_limit or len(dataset.train_labels)
    images = torch.as_tensor(dataset.train_images[:n]).to(device, backend.dtype)
    labels = torch.as_tensor(dataset.train_labels[:n]).to(device, torch.int64)
    order = torch.as_tensor(batch_order(config.seed, 1, n, config.batch_size)).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    model.train()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    warm = min(warmup_steps, len(order) - 1)
    for i, index in enumerate(order):
        if i == warm:
            backend.synchronize()
            start = time.perf_counter()
        x, y = images[index], labels[index]
        logits = forward(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            totals[0] += loss.detach()
            totals[1] += (logits.argmax(dim=1) == y).sum()
    totals.tolist()  # the one read of the epoch
    return (len(order) - warm) * config.batch_size / (time.perf_counter() - start), backend


def matmul_seconds(config, n):
    """Seconds one n x n matrix product takes on the run's device in its dtype (the median of 5, after a warm-up):
    the machine's peak for compare.bench."""
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)

    def once():
        began = time.perf_counter()
        (a @ a).sum().item()  # .item(): waits for the device; the sum is n^2 of the 2 n^3 operations
        return time.perf_counter() - began

    once()
    return float(np.median([once() for _ in range(5)]))


def norm_step(config, shape):
    """One training-mode forward and backward of the run's normalisation layer (config.model's norm and variant,
    built as the model builds it, compiled as a run compiles its model) over an NCHW input of `shape` on the
    run's device: (a call that runs one and waits, the execution's name), for compare.bench --layer."""
    backend = TorchBackend(config)  # the run's device, dtype and execution mode, resolved as for a run
    layer = make_norm(norm_layer(config.model, shape[1], len(shape)), config.dtype).to(backend.device).train()
    forward = torch.compile(layer) if backend.compiled else layer
    generator = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(*shape, generator=generator, dtype=backend.dtype).to(backend.device) for _ in "ab")
    x.requires_grad_()

    def once():
        x.grad = None  # an accumulated gradient would add a read of N values
        layer.zero_grad(set_to_none=True)
        forward(x).backward(dy)
        backend.synchronize()

    return once, backend.execution_name()


def triad_step(config, elements):
    """A STREAM triad, a = b + 2 c, over `elements` values of the run's dtype on its device (common.roofline)."""
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    generator = torch.Generator().manual_seed(0)
    b, c = (torch.randn(elements, generator=generator, dtype=dtype).to(device) for _ in "bc")
    a = torch.empty_like(b)

    def once():
        torch.add(b, c, alpha=2.0, out=a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return once
