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

Across N machines (--replica-nodes N --replica-address HOST:PORT, docs/clusters.md) replica 0 listens at HOST:PORT
and starts the first K/N replicas itself; on each other machine `python -m frameworks.torch.follower serve
--address HOST:PORT` waits for a run, takes the next node's K/N ranks and starts those followers. What a follower
needs to know (the run's configuration, the node count, the threads) is the plan replica 0 puts in the process
group's store before anyone joins, and takes out once all K have joined, so an agent never joins a run already
going; the steps are the one-machine steps (tests/test_two_nodes.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.network import parse_address

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


# keys of the store: the run that is forming (beside the runs' prefixes); in a run's prefix, the nodes that have
# taken their share and the followers that have left
PLAN, NODE_COUNTER, LEFT = "bn_compare/plan", "nodes", "left"


# where this process's replicas run (configure): the machines they span, and where replica 0 listens
PLACEMENT = {"nodes": 1, "address": None}


def configure(nodes: int = 1, address: str | None = None) -> None:
    """Before a data-parallel run: the --replica-nodes and --replica-address of the job (the backend module's
    prepare passes them from the worker's job; compare.execution.choose checked both before any run started)."""
    PLACEMENT.update(nodes=nodes, address=address)


def node_plan() -> tuple[int, str, int | None]:
    """Replica 0: how many machines the K replicas span and where replica 0 listens (one machine: 127.0.0.1, any
    port)."""
    if PLACEMENT["nodes"] == 1:
        return 1, "127.0.0.1", None
    return (PLACEMENT["nodes"], *parse_address(PLACEMENT["address"]))


def open_store(host: str, port: int, master: bool, timeout_s: float = TIMEOUT_S):
    """A store at HOST:PORT: replica 0 serves it (every interface), the others connect."""
    return dist.TCPStore(
        host,
        port,
        is_master=master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


_SERVED = {}  # replica 0: host -> (port, store) this process serves, for every run it starts


def served_store(host: str, port: int | None) -> tuple[int, object]:
    """Replica 0: the port and store this process serves at HOST (at PORT; None: the one it serves there already,
    or a free one), started by its first run and kept for the next ones (a finished run's process group keeps a
    reference to its store, so a new server there would find the address in use); each run works under a prefix
    of its own."""
    served = _SERVED.get(host)
    if served is None or port not in (None, served[0]):
        port = port or free_port()
        served = _SERVED[host] = (port, open_store(host, port, master=True))
    return served


def run_store(base, run: str):
    """A run's view of the store: its keys under its own prefix."""
    return dist.PrefixStore(f"bn_compare/{run}/", base)


def join(store, rank: int, world: int) -> None:
    """This process into the K replicas' process group (gloo, every collective bounded by TIMEOUT_S)."""
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S)
    )


def start_followers(ranks, host: str, port: int) -> list:
    """Start the given replicas, each a fresh interpreter running frameworks.torch.follower (`follow`: it reads the
    run from the plan in the store); their stdout is this process's stderr (the worker's stdout carries records
    only)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "frameworks.torch.follower", "follow", host, str(port), str(rank)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
        )
        for rank in ranks
    ]


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

    def __init__(self, config, rank: int, store=None):
        self.world, self.rank = config.replicas, rank
        self.processes, nodes = [], 1
        if rank == 0:  # replica 0 serves the store, puts the plan in it and starts this machine's followers
            nodes, host, port = node_plan()
            (port, base), run = served_store(host, port), uuid.uuid4().hex
            store = run_store(base, run)
            store.set(NODE_COUNTER, "0")
            plan = {"run": run, "config": config.to_dict(), "nodes": nodes, "threads": torch.get_num_threads()}
            base.set(PLAN, json.dumps(plan))
            self.processes = start_followers(range(1, self.world // nodes), host, port)
        try:
            join(store, rank, self.world)
        except Exception as exc:
            self.check_alive()  # a replica that failed to start is the error to report
            if rank == 0 and nodes > 1:
                raise RuntimeError(
                    f"the replicas of the other {nodes - 1} machine(s) did not join at {host}:{port} ({exc}): run "
                    f"`python -m frameworks.torch.follower serve --address {host}:{port}` on each (docs/clusters.md)"
                ) from exc
            raise
        if rank == 0:
            base.delete_key(PLAN)  # all K have joined: an agent arriving now waits for the next run
        self.store = store
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

    def before_step(self, data, order, noise, state) -> None:
        """Replica 0, before commanding a step: send what changed since the followers last received it (data and
        order by identity; noise and state where marked stale: Backend.changed marks them after every call that
        changes them). noise: {norm name: (scales, shifts)} or None; state: the model's state dict."""
        if data is not self.data:
            self.data, self.stale = data, self.stale | {"data"}
        if order is not self.order:
            self.order, self.stale = order, self.stale | {"order"}
        if self.stale:
            mask = sum(1 << i for i, what in enumerate(SHARED) if what in self.stale)
            self.command(SHARE, mask)
            self.share(mask, noise, state)
            self.stale = set()

    def share(self, mask: int, noise=None, state=None) -> dict:
        """Replica 0 sends, a follower receives, the parts of SHARED in `mask`: the training split and the epoch's
        order (kept here, self.data and self.order), the noisy-BN draws (replica 0's {name: (scales, shifts)}; a
        follower passes the names, the same layers on every replica) and the state (replica 0's state dict; a
        follower passes its own, written in place). Returns {"noise": what arrived, as CPU tensors} where noise
        travelled (a follower puts it on its device)."""
        sending, got = self.rank == 0, {}
        # replica 0 keeps its own arrays (before_step compares them by identity); a follower takes the copies
        if mask & 1:
            data = tuple(broadcast_array(t) for t in (self.data if sending else (None, None)))
            self.data = self.data if sending else data
        if mask & 2:
            order = broadcast_array(self.order if sending else None)
            self.order = self.order if sending else order
        if mask & 4 and noise:  # noise only where the run has it: every replica knows that from the spec
            got["noise"] = {
                name: tuple(broadcast_array(noise[name][i] if sending else None) for i in (0, 1))
                for name in sorted(noise)
            }
        if mask & 8:
            for name in sorted(state):
                received = broadcast_array(state[name] if sending else None)
                if not sending:
                    with torch.no_grad():
                        state[name].copy_(received)
        return got

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
        for rank, process in enumerate(self.processes, start=1):
            try:
                code = process.wait(timeout=30 if stopped else 0.1)
                if stopped and code:
                    print(f"replicas: replica {rank} exited with code {code} after the run", file=sys.stderr)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        deadline = time.monotonic() + 30
        with contextlib.suppress(RuntimeError):  # the store is replica 0's own; its error would hide the run's
            while stopped and self.store.add(LEFT, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.05)  # the other machines' followers are leaving: keep the store until they have
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
