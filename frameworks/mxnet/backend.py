"""MXNet Gluon backend: common.interface.Backend over BNLeNet.

Training mode is set at every call: train_step runs under
`autograd.record(train_mode=True)`; evaluate/predict call the net with
training=False outside recording; the probe runs under
`autograd.train_mode()` with training=False, bn_training=True (BN on batch
statistics, dropout off), without recording, and restores the running
statistics afterwards (built-in BN on GPU updates them in the forward).
Execution: hybridized (static graph) unless the run asks for eager.

Data parallel (--replicas K, docs/data-parallel.md): Gluon's own way, the parameters initialised on K CPU
contexts, each step's batch cut into K contiguous slices (gluon.utils.split_and_load), a forward and backward per
context, and the Trainer's kvstore summing the gradients over the contexts before the one update (step(B): the
batch's mean gradient). The scratch BN layers normalise with their slice's statistics (local sync) and the running
statistics stored on every context are the replicas' mean of what the slices returned; the built-in layer is
nn.BatchNorm (each context keeps its own running statistics; replica 0's are read). Global sync is refused for
both: Gluon calls each context's forward from Python one after another, and its one collective, the kvstore, is
outside autograd, so a layer written from its operators cannot pool the statistics in the middle of a forward;
Gluon's SyncBatchNorm does it inside one operator whose calls wait for each other at a barrier, but it fails in
float64 and a float32 BN-LeNet step over two CPU contexts hung there (measured). Everything else (evaluation,
probes, the population pass) runs on context 0.

Every read of the running statistics (export, save, evaluate, predict, probe)
first waits for all queued work: the built-in BatchNorm on CPU writes them
inside its backward, and a save right after a step was seen to write the old
values while a later read returned the new ones (the engine does not order
reads after that write). Once per epoch, so it costs nothing measurable.
"""

import platform
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from common.errors import BackendUnavailable
from common.init import check_params, is_trainable, parameter_shapes
from common.interface import Backend, DataParallel, moments, resolve_execution
from common.norms import norm_after

from .lenet import BNLeNet, check_dtype, make_norm

# Hybridized (static_alloc, static_shape) by default: faster than imperative for both layers and compiled in
# well under a second (docs/benchmark.md, "Execution modes", has the figures).
DEFAULT_EXECUTION = "compiled"


def resolve_context(requested):
    gpus = mx.context.num_gpus()
    if requested == "gpu" and gpus == 0:
        raise BackendUnavailable(
            f"--device gpu asked for, but this MXNet ({mx.__version__}) sees no GPU (the PyPI 'mxnet' wheel is "
            "CPU-only); use --device cpu or auto, or install a CUDA build such as mxnet-cu112"
        )
    return mx.gpu(0) if requested in ("gpu", "auto") and gpus > 0 else mx.cpu()


def _param(net, name):
    layer, suffix = name.split(".")
    return getattr(getattr(net, layer), suffix)


class MXNetBackend(Backend):
    name = "mxnet"
    data_parallel = DataParallel(  # --replicas K: K CPU contexts and the kvstore (module docstring)
        engine="contexts",
        where="K CPU contexts",
        executions=("hybridized", "imperative"),
        global_sync=(),
        why_not_global={
            "scratch": "Gluon runs each context's forward from Python one after another and its collective (the "
            "kvstore) is outside autograd, so a layer made of its operators cannot pool the slices' statistics "
            "mid-forward (and Gluon's own SyncBatchNorm is refused too: --variants builtin says why)",
            **{
                variant: "Gluon's SyncBatchNorm (contrib) fails in float64 (its operator: 'data type do not match "
                "... Expected: double v.s. given float') and, in float32, a two-context BN-LeNet training step on the "
                "CPU hung at its barrier (MXNet 1.9.1)"
                for variant in ("builtin", "builtin-defaults")
            },
        },
    )

    def __init__(self, config):
        super().__init__(config)
        self.ctx = resolve_context(config.device)
        self.dtype = config.dtype
        self.spec = config.model
        mx.random.seed(config.seed)  # dropout masks only; weights come from common
        check_dtype(config.model, config.precision)
        self.contexts = self._data_parallel(config) if config.replicas > 1 else [self.ctx]
        self.net = BNLeNet(config.layer_spec)
        self.net.initialize(ctx=self.contexts)
        self.net.cast(self.dtype)
        self.hybridized = resolve_execution(config, DEFAULT_EXECUTION) == "compiled"
        if self.hybridized:
            self.net.hybridize(static_alloc=True, static_shape=True)
        trainable = [p for p in self.net.collect_params().values() if p.grad_req != "null"]
        # the kvstore sums each parameter's gradients over the contexts (data parallel; one context: nothing to sum)
        self.trainer = gluon.Trainer(trainable, "sgd", {"learning_rate": config.lr}, kvstore="local")
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()

    def _data_parallel(self, config):
        """The K CPU contexts of a data-parallel run, or the reason it cannot run (the module docstring)."""
        hybridized = resolve_execution(config, DEFAULT_EXECUTION) == "compiled"
        self.check_replicas(config, self.ctx.device_type, "hybridized" if hybridized else "imperative")
        return [mx.cpu(i) for i in range(config.replicas)]

    def replica_statistics(self):
        if self.spec.variant == "scratch":
            return "the replicas' mean"
        return "context 0's (Gluon keeps one copy per context)"

    # hooks of the Backend template (common.interface) -------------------------------------------------------
    def framework_version(self):
        return mx.__version__

    def device_info(self):
        if self.ctx.device_type == "gpu":
            return "gpu", f"GPU {self.ctx.device_id}"
        return "cpu", f"CPU ({platform.processor() or platform.machine()})"

    def execution_name(self):
        return "hybridized" if self.hybridized else "imperative"

    def default_norm_constants(self):
        kwargs = make_norm(norm_after(self.spec, self.spec.norm_positions[0]))._kwargs
        return kwargs.get("momentum"), kwargs["eps"]

    def train_mode_forward(self, images, capture):
        inputs = {}  # each layer's input (NCHW / NC: channels on axis 1)
        logits = self._norm_forward(images, inputs.__setitem__ if capture else None).asnumpy()
        return logits, {name: (h.asnumpy(), 1) for name, h in inputs.items()}

    def norm_moments(self, images):
        # a train-mode forward without autograd changes no state here: the scratch layers return their new running
        # statistics (train_step stores them) and the built-in layer writes its own in its backward (see the module
        # docstring); tests/test_population.py checks that nothing changed, for both
        found = {}  # moments on the host: NumPy's took 3 ms where MXNet's took 26 ms (conv1, batch 256)
        self._norm_forward(images, lambda name, h: found.__setitem__(name, moments(h.asnumpy(), 1)))
        return found

    def _norm_forward(self, images, record):
        """The logits of numpy images with the normalisation layers in train mode (dropout off): the network's
        own forward as NDArray operations (BNLeNet.imperative: hooks fire on its layers, which keep their
        compiled graphs, and the network keeps its own); record(name, input) sees each normalisation layer's
        input."""
        x = nd.array(images, ctx=self.ctx, dtype=self.dtype)
        nd.waitall()  # see the module docstring
        blocks = self.net.norm_modules() if record else {}
        hooks = [
            b.register_forward_pre_hook(lambda block, args, name=name: record(name, args[0]))
            for name, b in blocks.items()
        ]
        try:
            with autograd.train_mode():
                return self.net.imperative(x, False, True)[0]
        finally:
            for hook in hooks:
                hook.detach()

    def loss_and_gradient(self, images, labels, capture, noise=None):
        x = nd.array(images, ctx=self.ctx, dtype=self.dtype)
        y = nd.array(labels, ctx=self.ctx, dtype=self.dtype)
        names = [n for n in parameter_shapes(self.spec) if is_trainable(n, self.spec)]
        activations = {} if capture else None
        nd.waitall()  # see the module docstring
        self.net.activation_inputs = activations
        try:
            # BN on batch statistics, the flags keep dropout off; imperative past the training graph (net.imperative)
            with autograd.record(train_mode=True):
                loss = self.loss(self.net.imperative(x, False, True, noise)[0], y).mean()
            loss.backward()
            result = (
                float(loss.asscalar()),
                {n: _param(self.net, n).grad(self.ctx).asnumpy() for n in names},
                {pos: (h.asnumpy(), 1) for pos, h in (activations or {}).items()},
            )
        finally:
            self.net.activation_inputs = None
        nd.waitall()  # the built-in BatchNorm's backward writes running statistics: done before they are restored
        return result

    def set_params(self, params):
        check_params(params, self.spec)
        for name, value in params.items():
            _param(self.net, name).set_data(nd.array(value, ctx=self.ctx, dtype=self.dtype))

    def get_params(self):
        nd.waitall()  # see the module docstring
        return {
            name: _param(self.net, name).data().asnumpy().astype(self.dtype) for name in parameter_shapes(self.spec)
        }

    def save(self, path):
        nd.waitall()  # see the module docstring
        self.net.save_parameters(path)

    def load(self, path):
        self.net.load_parameters(path, ctx=self.contexts)

    def put(self, images, labels):
        return (nd.array(images, ctx=self.ctx, dtype=self.dtype), nd.array(labels, ctx=self.ctx, dtype=self.dtype))

    def put_order(self, order):
        return nd.array(order, ctx=self.ctx, dtype="int32")

    def device_noise(self, noise):
        return {n: tuple(nd.array(a, ctx=self.ctx, dtype=self.dtype) for a in pair) for n, pair in noise.items()}

    def train_step(self, data, order, step):
        index = order[step]
        x, y = nd.take(data[0], index), nd.take(data[1], index)
        noise = self.noise and {n: (a[step], b[step]) for n, (a, b) in self.noise.items()}
        if len(self.contexts) > 1:
            return self._replicated_step(x, y, noise)
        with autograd.record(train_mode=True):
            logits, *new_stats = self.net(x, None, None, noise)  # Block.__call__ passes no keywords
            loss = self.loss(logits, y)
        loss.backward()
        self.trainer.step(x.shape[0])  # the loss is per example: step(n) makes it the batch mean
        self.net.store_running(new_stats)
        correct = (logits.argmax(axis=1) == y).sum()
        return nd.concat(loss.sum(), correct, dim=0)

    def _replicated_step(self, x, y, noise):
        """The data-parallel step: slice r of the batch on context r, the gradients summed over the contexts by
        the kvstore, the scratch layers' new running statistics averaged over the replicas; [loss_sum, correct]
        of the whole batch on context 0."""
        xs, ys = (gluon.utils.split_and_load(t, self.contexts, even_split=True) for t in (x, y))
        noises = [
            noise and {n: tuple(a.as_in_context(c) for a in pair) for n, pair in noise.items()} for c in self.contexts
        ]
        with autograd.record(train_mode=True):
            outputs = [self.net(xr, None, None, nr) for xr, nr in zip(xs, noises)]
            losses = [self.loss(out[0], yr) for out, yr in zip(outputs, ys)]
        autograd.backward(losses)
        self.trainer.step(x.shape[0])
        home = self.ctx
        self.net.store_running(
            [
                nd.add_n(*(out[i].as_in_context(home) for out in outputs)) / len(outputs)
                for i in range(1, len(outputs[0]))
            ]
        )
        totals = [
            nd.concat(loss.sum(), (out[0].argmax(axis=1) == yr).sum(), dim=0).as_in_context(home)
            for loss, out, yr in zip(losses, outputs, ys)
        ]
        return nd.add_n(*totals)

    def reduce_stats(self, stats):
        return (
            nd.add_n(*stats).asnumpy().astype(np.float64) if len(stats) > 1 else stats[0].asnumpy().astype(np.float64)
        )

    def evaluate(self, data, batch_size):
        images, labels = data
        nd.waitall()  # see the module docstring
        total = []
        for start in range(0, labels.shape[0], batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            logits = self._eval_logits(x)
            total.append(nd.concat(self.loss(logits, y).sum(), (logits.argmax(axis=1) == y).sum(), dim=0))
        return self.reduce_stats(total)

    def export_onnx(self, path, opset=None):
        # MXNet's exporter takes a symbol file: the hybridized graph as net.export writes it, with its mode flags
        # as a second input (BNLeNet.inputs)
        import onnx  # mx.onnx's own dependency

        written = onnx.defs.onnx_opset_version()
        if opset and opset != written:
            raise BackendUnavailable(
                f"mx.onnx {mx.__version__} writes the opset of the installed onnx {onnx.__version__} ({written}) and "
                f"takes no other: --opset {written}, or none"
            )
        side = self.spec.side
        prefix = str(Path(path).with_suffix(""))
        if not self.hybridized:
            self.net.hybridize(static_alloc=True, static_shape=True)
        self.predict(np.zeros((2, 1, side, side), dtype=self.dtype))
        self.net.export(prefix)
        try:
            mx.onnx.export_model(
                f"{prefix}-symbol.json",
                f"{prefix}-0000.params",
                in_shapes=[(2, 1, side, side), (2,)],
                in_types=[np.dtype(self.dtype)] * 2,
                onnx_file_path=path,
                dynamic=True,
                dynamic_input_shapes=[(None, 1, side, side), (2,)],
            )
        finally:
            Path(f"{prefix}-symbol.json").unlink(missing_ok=True)
            Path(f"{prefix}-0000.params").unlink(missing_ok=True)
        return {"exporter": f"mx.onnx {mx.__version__}", "layout": "NCHW"}

    def predict(self, images):
        nd.waitall()  # see the module docstring
        return self._eval_logits(nd.array(images, ctx=self.ctx, dtype=self.dtype)).asnumpy()

    def _eval_logits(self, x):
        """The eval-mode logits of x. Under ghost batches of G (--ghost-batch, or local sync's B/K) the scratch
        layer's graph computes its training branch beside the eval one and folds the batch into slices of G, which
        fails on a batch G does not divide (the last of the test set): such a batch is padded with zero images to
        whole slices, and their rows dropped; eval mode normalises every image on its own, so the others' logits
        are unchanged."""
        n, ghost = x.shape[0], self.config.layer_spec.ghost_batch
        pad = -n % ghost if ghost else 0
        if pad:
            x = nd.concat(x, nd.zeros((pad, *x.shape[1:]), ctx=x.context, dtype=x.dtype), dim=0)
        logits = self.net(x, False)[0]
        return logits[:n] if pad else logits

    def synchronize(self):
        nd.waitall()


BACKEND = MXNetBackend  # what common.registry hands to the loop
