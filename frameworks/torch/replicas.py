"""Data-parallel training for PyTorch (--replicas K): K processes on this machine, torch.distributed over gloo on
127.0.0.1, DistributedDataParallel averaging the gradients.

The process that runs the loop is replica 0; it starts K - 1 followers (spawned, so each is a fresh interpreter)
that build the same model and then only take training steps. Replica 0 drives them with a small command
broadcast before each collective piece of work, and shares with them, the first time a step needs it after a
change, what a step reads: the training split, the epoch's batch order, the noisy-BN draws, and the parameters
and running statistics (after set_params or a restored probe). Everything else (evaluation, probes, the
population pass, traces, checkpoints) runs on replica 0 alone, with the layers' one-process meaning
(local sync: ghost batches of B/K, common.config.RunConfig.layer_spec).

In a step replica r takes the contiguous slice r * B/K ... (r + 1) * B/K - 1 of the batch; DDP averages the
gradients of the slices' mean losses over the K replicas, which is the gradient of the batch's mean loss, so
the update is the one-process one. The scratch BN layers normalise with their slice's statistics (local) or,
through `Replicas.mean` (an all_reduce whose backward all-reduces the gradients), the whole batch's (global), and
blend the replicas' mean into the running statistics, so every replica holds the same ones
(frameworks/torch/batchnorm.synced_batch_norm). The built-in layer under local sync is nn.BatchNorm with DDP's
default broadcast of replica 0's buffers (the running statistics are replica 0's slice's: tests/conventions.py);
under global sync it would be nn.SyncBatchNorm, which the backend refuses (it would synchronise in the one-process
probes too).

Every collective has a timeout (TIMEOUT_S): a replica that dies or hangs makes replica 0's next collective
fail with the error instead of waiting forever, and a follower exits when replica 0's connection closes.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.errors import BackendUnavailable

TIMEOUT_S = 120  # bounds every collective, so also what replica 0 may spend between two steps (evaluation, traces)
ROOT = Path(__file__).resolve().parents[2]  # the repository root, where a follower imports from
STOP, SHARE, STEP = 0, 1, 2


class _SumOverReplicas(torch.autograd.Function):
    """The sum of a tensor over the replicas; its backward sums the gradients over them too (the sum feeds every
    replica's loss, so each replica's input receives the whole batch's gradient)."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


class Replicas:
    """What a BN layer sees of the other replicas during a data-parallel step: `mean` averages a tensor over the
    K replicas (the same result on each); `pooled`: global sync, the whole batch's statistics."""

    def __init__(self, world: int, pooled: bool):
        self.world, self.pooled = world, pooled

    def mean(self, tensor, differentiable=True):
        if differentiable:
            return _SumOverReplicas.apply(tensor) / self.world
        with torch.no_grad():
            return _SumOverReplicas.apply(tensor) / self.world


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    """This process into the K replicas' process group (gloo, loopback, every collective bounded by TIMEOUT_S)."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )


def start_followers(config, port: int) -> list:
    """Start replicas 1 .. K-1 of config, each a fresh interpreter running this module (`follow`), with replica
    0's threads; their stdout is the worker's stderr (the worker's stdout carries records only)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    threads = str(torch.get_num_threads())
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "frameworks.torch.replicas",
                json.dumps(config.to_dict()),
                str(rank),
                str(port),
                threads,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
        )
        for rank in range(1, config.replicas)
    ]


def follow(config: dict, rank: int, port: int, threads: int) -> None:
    """A follower replica: build the model, then take the steps replica 0 commands until it says stop (or its
    connection closes, which ends this process with the error)."""
    torch.set_num_threads(threads)
    from common.config import RunConfig

    from .backend import TorchBackend

    backend = TorchBackend(RunConfig.from_dict(config), rank=rank, port=port)
    try:
        while True:
            command, argument = backend.group.receive()
            if command == STOP:
                return
            if command == SHARE:
                backend.group.share(backend, argument)
            elif command == STEP:
                backend.train_step(backend.group.data, backend.group.order, argument)
    finally:
        dist.destroy_process_group()


def broadcast_array(array: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """Replica 0's array (numpy or a CPU tensor) on every replica, as a CPU tensor; the others pass None."""
    header = torch.zeros(8, dtype=torch.int64)
    if array is not None:
        tensor = torch.as_tensor(array).detach().cpu().contiguous()
        header[0], header[1] = tensor.dim(), DTYPE_CODES.index(tensor.dtype)
        header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.broadcast(header, src=0)
    if array is None:
        ndim, code = int(header[0]), int(header[1])
        tensor = torch.empty(tuple(int(n) for n in header[2 : 2 + ndim]), dtype=DTYPE_CODES[code])
    dist.broadcast(tensor, src=0)
    return tensor


DTYPE_CODES = [torch.float32, torch.float64, torch.int64, torch.bfloat16]
SHARED = ("data", "order", "noise", "state")  # what a step reads, in the order `share` sends it


class Group:
    """Replica 0's handle on the K replicas (or a follower's on replica 0): the commands, the shared inputs of a
    step, and the process group's shutdown."""

    def __init__(self, config, rank: int, port: int | None):
        self.world, self.rank = config.replicas, rank
        self.processes = []
        if rank == 0:
            port = free_port()
            self.processes = start_followers(config, port)
        try:
            join(rank, self.world, port)
        except Exception:
            self.check_alive()  # a replica that failed to start is the error to report
            raise
        self.data = self.order = None
        self.stale = set(SHARED)  # replica 0: what changed since the followers last received it
        self.replicas = Replicas(self.world, pooled=config.bn_sync == "global")

    def slice(self, index):
        """This replica's contiguous slice of a batch's indices."""
        size = len(index) // self.world
        return index[self.rank * size : (self.rank + 1) * size]

    def command(self, command: int, argument: int = 0) -> None:
        dist.broadcast(torch.tensor([command, argument], dtype=torch.int64), src=0)

    def receive(self) -> tuple:
        message = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(message, src=0)
        return int(message[0]), int(message[1])

    def before_step(self, backend, data, order) -> None:
        """Replica 0, before commanding a step: send what changed since the followers last received it."""
        if data is not self.data:
            self.data, self.stale = data, self.stale | {"data"}
        if order is not self.order:
            self.order, self.stale = order, self.stale | {"order"}
        if self.stale:
            mask = sum(1 << i for i, what in enumerate(SHARED) if what in self.stale)
            self.command(SHARE, mask)
            self.share(backend, mask)
            self.stale = set()

    def share(self, backend, mask: int) -> None:
        """Replica 0 sends, a follower receives, the parts of SHARED in `mask`."""
        sending = self.rank == 0
        # replica 0 keeps its own arrays (before_step compares them by identity); a follower takes the copies
        if mask & 1:
            data = tuple(broadcast_array(t).to(backend.device) for t in (self.data if sending else (None, None)))
            self.data = self.data if sending else data
        if mask & 2:
            order = broadcast_array(self.order if sending else None).to(backend.device)
            self.order = self.order if sending else order
        if mask & 4 and backend.spec.norm_noise:  # every replica knows the layers: only the draws travel
            names = sorted(backend.model.norm_modules())
            backend.noise = {
                name: tuple(
                    broadcast_array(backend.noise[name][i] if sending else None).to(backend.device, backend.dtype)
                    for i in (0, 1)
                )
                for name in names
            }
        if mask & 8:
            state = backend.model.state_dict()
            for name in sorted(state):
                received = broadcast_array(state[name] if sending else None)
                if not sending:
                    with torch.no_grad():
                        state[name].copy_(received)

    def close(self) -> None:
        """Replica 0: tell the followers to stop and wait for them (bounded); where that fails (a replica died),
        end them; then leave the group. Never raises: it runs after the run's own error, which must show."""
        stopped = False
        if self.rank == 0:
            try:
                self.check_alive()
                self.command(STOP)
                stopped = True
            except Exception as exc:  # noqa: BLE001 - the run's error is the one to report
                print(f"replicas: could not stop the followers ({exc}); ending them", file=sys.stderr)
        for process in self.processes:
            try:
                process.wait(timeout=30 if stopped else 0.1)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()

    def check_alive(self) -> None:
        """Replica 0: a follower that has exited is an error naming it (its exit code), before a collective would
        wait on it."""
        for rank, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                raise RuntimeError(
                    f"data-parallel replica {rank} of {self.world} exited (code {process.returncode}); its error is "
                    "in the worker's log"
                )


def refuse_unless_cpu(device) -> None:
    if device.type != "cpu":
        raise BackendUnavailable(
            "--replicas runs its replicas on this machine's CPU over gloo; a GPU run would need one GPU per replica "
            "and NCCL, which this suite does not start yet: use --device cpu"
        )


if __name__ == "__main__":
    follow(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
