"""PyTorch backend: common.interface.Backend over BNLeNet.

Training mode is set explicitly with module.train()/eval() before each kind of
work; the probe puts only the BN layers in train mode (dropout stays off) and
restores every buffer afterwards, so it changes no state.

Execution: eager by default; compiled = the training forward through
`torch.compile` (Inductor: fused C++ kernels on the CPU, Triton on a GPU; the
backward is compiled with it, the SGD update stays eager). TorchDynamo guards
on `self.training`, so the compiled graph never freezes the mode; evaluate,
predict and the probe run the eager module (the same parameters and buffers),
so they cannot replay a training graph.
"""

import platform

import numpy as np
import torch
from torch.nn import functional as F

from common.errors import BackendUnavailable
from common.init import check_params, is_trainable, parameter_shapes
from common.interface import Backend, DataParallel, resolve_execution
from common.norms import norm_after

from . import replicas
from .lenet import BNLeNet, canonical_to_torch, make_norm
from .replicas import STEP, Group

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# Eager by default: on a CPU torch.compile speeds up only the scratch layer, needs a C++ compiler, and its
# cold compilation costs about what a default 10-epoch run gains (docs/benchmark.md, "Execution modes", has
# the figures).
DEFAULT_EXECUTION = "eager"


def check_compiler():
    """torch.compile on the CPU writes C++ and needs a compiler: say so, not an Inductor traceback."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or a private API that moved
        if type(exc).__name__ != "InvalidCxxCompiler":
            return  # cannot tell here: let torch.compile report it
        raise BackendUnavailable(
            "--execution compiled: torch.compile on the CPU needs a C++ compiler and found none (it looks for "
            "$CXX, else g++); install one (Debian/Ubuntu: apt-get install g++) or use --execution eager"
        ) from None


def resolve_device(requested):
    if requested == "gpu" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"--device gpu asked for, but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
            "use --device cpu or auto, or install a CUDA build of PyTorch"
        )
    if requested in ("gpu", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def prepare(configs, options: dict | None = None) -> None:
    """Before the job's runs: where a data-parallel run's replicas go (--replica-nodes, --replica-address: the job's
    options, compare.execution.choose); one machine without them."""
    options = options or {}
    replicas.configure(options.get("replica_nodes", 1), options.get("replica_address"))


class TorchBackend(Backend):
    name = "torch"
    data_parallel = DataParallel(  # --replicas: frameworks/torch/replicas.py
        engine="processes",
        where="this machine's CPU over gloo (a GPU run would need one GPU per replica and NCCL, which this suite "
        "does not start yet)",
        executions=("eager",),
        why_executions="DDP's step is not compiled here so far",
        global_sync=("scratch",),
        why_not_global={
            variant: "it is nn.SyncBatchNorm, which refuses the CPU in a process group ('SyncBatchNorm expected input "
            "tensor to be on GPU or XPU or privateuseone', tests/test_torch_pitfalls.py), and --replicas runs on the "
            "CPU (the project's BN, --variants scratch, synchronises through the same torch.distributed all_reduce)"
            for variant in ("builtin", "builtin-defaults")
        },
    )

    def __init__(self, config, rank=0, store=None):
        """rank, store: a follower replica of a data-parallel run (frameworks/torch/replicas.py) and its connection
        to the process group's store; the loop builds replica 0."""
        super().__init__(config)
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.mixed = config.mixed == "bfloat16"  # torch.autocast(dtype=torch.bfloat16) around every forward
        torch.manual_seed(config.seed)  # dropout masks only; weights come from common
        if self.device.type == "cuda":
            # the same seed must repeat exactly on a GPU too: no non-deterministic cuDNN algorithms
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.model = BNLeNet(config.layer_spec).to(device=self.device, dtype=self.dtype)
        self.compiled = resolve_execution(config, DEFAULT_EXECUTION) == "compiled"
        if self.compiled and self.device.type == "cpu":
            check_compiler()
        # what train_step calls: the compiled module shares self.model's parameters and buffers
        self.train_forward = torch.compile(self.model) if self.compiled else self.model
        self.spec = config.model
        self.group = self._data_parallel(config, rank, store) if config.replicas > 1 else None
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=config.lr)
        self._training = None

    def _data_parallel(self, config, rank, store):
        """Join (replica 0: start) the K replicas and wrap the model in DDP, whose forward train_step then calls."""
        self.check_replicas(config, self.device.type, self.execution_name())
        builtin = config.model.variant.startswith("builtin") and config.model.has_norm
        if rank == 0:
            torch.set_num_threads(max(1, torch.get_num_threads() // config.replicas))
        group = Group(config, rank, store)
        # scratch layers keep their running statistics equal on every replica themselves; the built-in layer
        # under local sync gets DDP's default, replica 0's buffers broadcast before every forward
        self.train_forward = torch.nn.parallel.DistributedDataParallel(self.model, forward_sync_buffers=builtin)
        return group

    def replica_statistics(self):
        builtin = self.spec.variant.startswith("builtin")
        return "replica 0's (DDP broadcasts its buffers)" if builtin else "the replicas' mean"

    def close(self):
        if self.group is not None:
            self.group.close()
            self.group = None

    # hooks of the Backend template (common.interface) -------------------------------------------------------
    def framework_version(self):
        return torch.__version__

    def device_info(self):
        if self.device.type == "cuda":
            return "gpu", torch.cuda.get_device_name(self.device)
        return "cpu", f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def execution_name(self):
        return "torch.compile" if self.compiled else "eager"

    def default_norm_constants(self):
        layer = make_norm(norm_after(self.spec, self.spec.norm_positions[0]))
        momentum = getattr(layer, "momentum", None)
        return (None if momentum is None else 1.0 - momentum), layer.eps

    def save_state(self):  # every buffer: the canonical ones and BN's num_batches_tracked
        return {k: v.clone() for k, v in self.model.named_buffers()}

    def restore_state(self, saved):
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(saved[name])

    def changed(self, what):
        """Replica 0 of a data-parallel run: the followers need `what` again before the next step (the template
        calls this after every call that changes it)."""
        if self.group is not None:
            self.group.stale.add(what)

    def receive_shared(self, mask):
        """A follower: what replica 0 shares before a step (Group.share), its noise put on this device."""
        names = sorted(self.model.norm_modules()) if self.spec.norm_noise else None
        got = self.group.share(mask, noise=names, state=self.model.state_dict())
        if "noise" in got:
            self.noise = {n: tuple(t.to(self.device, self.dtype) for t in pair) for n, pair in got["noise"].items()}
        if mask & 1:
            self.group.data = tuple(t.to(self.device) for t in self.group.data)
        if mask & 2:
            self.group.order = self.group.order.to(self.device)

    @torch.no_grad()
    def train_mode_forward(self, images, capture):
        inputs = {}

        def record(name, h):  # NCHW / NC: channels on axis 1
            inputs[name] = (h.double().cpu().numpy(), 1)

        return self._norm_forward(images, record if capture else None).cpu().numpy(), inputs

    def norm_moments(self, images):
        found, saved = {}, self.save_state()

        def record(name, h):  # on the device, in float64; only the moments travel
            h = h.double()
            axes = [0, *range(2, h.dim())]
            found[name] = (h.mean(dim=axes), h.var(dim=axes, unbiased=False))

        try:
            self._norm_forward(images, record)
        finally:
            self.restore_state(saved)
        return {name: (mean.cpu().numpy(), var.cpu().numpy()) for name, (mean, var) in found.items()}

    def _norm_forward(self, images, record):
        """The logits of numpy images with the normalisation layers in train mode (dropout off), without
        autograd; record(name, input) sees each normalisation layer's input where given."""
        x = torch.as_tensor(images).to(self.device, self.dtype)
        hooks = []
        self._mode(False)  # dropout off
        try:
            for name, module in self.model.norm_modules().items():
                if record is not None:
                    hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0])))
                module.train()  # the normalisation layers only
            with torch.no_grad():
                return self._forward(self.model, x)
        finally:
            for hook in hooks:
                hook.remove()
            self.model.eval()

    def loss_and_gradient(self, images, labels, capture, noise=None):
        x = torch.as_tensor(images).to(self.device, self.dtype)
        y = torch.as_tensor(labels).to(self.device, torch.int64)
        names = [n for n in parameter_shapes(self.spec) if is_trainable(n, self.spec)]
        state = dict(self.model.named_parameters())
        tensors = [state[canonical_to_torch(n, self.spec)] for n in names]
        activations = {} if capture else None
        self._mode(False)  # dropout off
        self.model.activation_inputs = activations
        try:
            for module in self.model.norm_modules().values():
                module.train()  # the normalisation layers only
            loss = F.cross_entropy(self._forward(self.model, x, noise), y)
            grads = torch.autograd.grad(loss, tensors)  # leaves every .grad as it was
        finally:
            self.model.activation_inputs = None
            self.model.eval()
        return (
            float(loss.detach()),
            {n: g.double().cpu().numpy() for n, g in zip(names, grads)},
            {pos: (h.detach().double().cpu().numpy(), 1) for pos, h in (activations or {}).items()},
        )

    def _forward(self, module, x, noise=None):
        """module(x, noise) under autocast when the run is mixed precision; the logits (and so the loss) in the
        parameters' dtype, float32 there (common.precision)."""
        if not self.mixed:
            return module(x, noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return module(x, noise).to(self.dtype)

    def device_noise(self, noise):
        return {n: tuple(torch.as_tensor(a).to(self.device, self.dtype) for a in pair) for n, pair in noise.items()}

    def _mode(self, training):
        if self._training is not training:
            self.model.train(training)
            self._training = training

    # parameters ---------------------------------------------------------------
    def set_params(self, params):
        check_params(params, self.spec)
        state = self.model.state_dict()
        with torch.no_grad():
            for name, value in params.items():
                state[canonical_to_torch(name, self.spec)].copy_(torch.as_tensor(np.asarray(value)))

    def get_params(self):
        state = self.model.state_dict()
        dtype = self.config.dtype
        return {
            name: state[canonical_to_torch(name, self.spec)].detach().cpu().numpy().astype(dtype)
            for name in parameter_shapes(self.spec)
        }

    def save(self, path):
        torch.save(self.model.state_dict(), path)

    def load(self, path):
        self.model.load_state_dict(torch.load(path, map_location=self.device))

    # data ---------------------------------------------------------------------
    def put(self, images, labels):
        return (
            torch.as_tensor(images).to(self.device, self.dtype),
            torch.as_tensor(labels).to(self.device, torch.int64),
        )

    def put_order(self, order):
        return torch.as_tensor(order).to(self.device)

    # work ---------------------------------------------------------------------
    def train_step(self, data, order, step):
        self._mode(True)
        index = order[step]
        if self.group is not None:  # data parallel: this replica's slice (replica 0 first commands the step)
            if self.group.rank == 0:
                self.group.check_alive()
                self.group.before_step(data, order, self.noise, self.model.state_dict())
                self.group.command(STEP, step)
            index = self.group.slice(index)
        x, y = data[0].index_select(0, index), data[1].index_select(0, index)
        noise = self.noise and {n: (s[step], m[step]) for n, (s, m) in self.noise.items()}
        self._synchronised(True)
        try:
            logits = self._forward(self.train_forward, x, noise)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP: the gradients averaged over the replicas
        finally:
            self._synchronised(False)
        self.optimizer.step()
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == y).sum().to(loss.dtype)
            stats = torch.stack([loss.detach() * len(index), correct])
            if self.group is not None:  # the whole batch's [loss_sum, correct] on every replica
                torch.distributed.all_reduce(stats)
            return stats

    def _synchronised(self, on):
        """Data parallel: the scratch BN layers see the other replicas (replicas.Replicas) during a step only."""
        if self.group is not None:
            for module in self.model.norm_modules().values():
                if hasattr(module, "replicas"):
                    module.replicas = self.group.replicas if on else None

    def reduce_stats(self, stats):
        return torch.stack(stats).sum(dim=0).double().cpu().numpy()

    @torch.inference_mode()
    def evaluate(self, data, batch_size):
        self._mode(False)
        images, labels = data
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in range(0, len(labels), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            logits = self._forward(self.model, x)
            total[0] += F.cross_entropy(logits, y, reduction="sum").double()
            total[1] += (logits.argmax(dim=1) == y).sum()
        return total.cpu().numpy()

    @torch.inference_mode()
    def predict(self, images):
        self._mode(False)
        return self._forward(self.model, torch.as_tensor(images).to(self.device, self.dtype)).cpu().numpy()

    def export_onnx(self, path, opset=None):
        # the TorchScript-based exporter (dynamo=False): the dynamo one needs onnxscript, which this env lacks
        self._mode(False)
        side = self.spec.side
        sample = torch.zeros((2, 1, side, side), dtype=self.dtype, device=self.device)
        torch.onnx.export(
            self.model,
            (sample,),
            path,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            **({"opset_version": opset} if opset else {}),
        )
        return {"exporter": f"torch.onnx (TorchScript) {torch.__version__}", "layout": "NCHW"}

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


BACKEND = TorchBackend  # what common.registry hands to the loop
