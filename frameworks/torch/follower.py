"""PyTorch's follower replicas (--replicas K, frameworks/torch/replicas.py): the program each of the K - 1 other
replicas runs, `follow`, and the agent of another machine, `serve` (--replica-nodes N, docs/clusters.md):

    python -m frameworks.torch.follower serve --address HOST:PORT

A follower builds the run's model from the plan in the process group's store, then takes the steps replica 0
commands, receiving what a step reads when it changed (Group.share); it never evaluates, probes or saves.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import socket
import sys
import time

import torch
import torch.distributed as dist

from common.config import RunConfig
from common.errors import ConfigError
from common.network import parse_address

from .backend import TorchBackend
from .replicas import LEFT, NODE_COUNTER, PLAN, SHARE, STEP, STOP, open_store, run_store, start_followers


def follow(host: str, port: int, rank: int) -> None:
    """A follower replica: read the run from the store's plan, build the model, then take the steps replica 0
    commands until it says stop (or its connection closes, which ends this process with the error)."""
    base = open_store(host, port, master=False)
    plan = json.loads(base.get(PLAN))
    store = run_store(base, plan["run"])
    torch.set_num_threads(plan["threads"])
    backend = TorchBackend(RunConfig.from_dict(plan["config"]), rank=rank, store=store)
    try:
        while True:
            command, argument = backend.group.receive()
            if command == STOP:
                return
            if command == SHARE:
                backend.receive_shared(argument)
            elif command == STEP:
                backend.train_step(backend.group.data, backend.group.order, argument)
    finally:
        dist.destroy_process_group()
        with contextlib.suppress(RuntimeError):  # replica 0 has gone: its error, not this one, is the run's
            store.add(LEFT, 1)  # replica 0 serves the store until every follower has left (Group.close)
        # release the group's objects now: left to the interpreter's teardown, one in 18 followers aborted
        # ("terminate called without an active exception")
        del backend, store, base
        gc.collect()


def serve(address: str, runs: int = 0, poll_s: float = 2.0) -> int:
    """Another machine's agent: wait for a run at ADDRESS, take the next node's share of its replicas, start them,
    wait for them, and again (`runs` runs, 0 = until stopped). Returns the number of runs whose followers failed."""
    host, port = parse_address(address, "--address")
    served = failed = 0
    print(f"replicas: serving runs of {address}", file=sys.stderr, flush=True)
    while not runs or served < runs:
        try:  # no run is forming while nothing listens there or its plan is gone: ask again
            socket.create_connection((host, port), timeout=poll_s).close()  # quietly, before the store's client
            base = open_store(host, port, master=False, timeout_s=poll_s)
            plan = json.loads(base.get(PLAN))
            store = run_store(base, plan["run"])
        except (OSError, RuntimeError):  # torch.distributed's DistError is a RuntimeError
            time.sleep(poll_s / 4)
            continue
        world, nodes = plan["config"]["replicas"], plan["nodes"]
        node = store.add(NODE_COUNTER, 1)
        if node >= nodes:  # every other node of this run has an agent already
            time.sleep(poll_s)
            continue
        share = world // nodes
        processes = start_followers(range(node * share, (node + 1) * share), host, port)
        codes = [process.wait() for process in processes]
        served, failed = served + 1, failed + any(codes)
        print(
            f"replicas: run {served}: replicas {node * share}..{(node + 1) * share - 1} exited {codes}", file=sys.stderr
        )
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m frameworks.torch.follower",
        description="PyTorch's data-parallel replicas on another machine (docs/clusters.md)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    agent = commands.add_parser("serve", help="serve this machine's share of the replicas of every run at ADDRESS")
    agent.add_argument("--address", required=True, help="HOST:PORT, the --replica-address of the runs")
    agent.add_argument("--runs", type=int, default=0, help="stop after this many runs (default: serve until stopped)")
    replica = commands.add_parser("follow", help="one replica (started by replica 0 or by serve)")
    replica.add_argument("host")
    replica.add_argument("port", type=int)
    replica.add_argument("rank", type=int)
    args = parser.parse_args(argv)
    if args.command == "follow":
        follow(args.host, args.port, args.rank)
        return 0
    try:
        return 1 if serve(args.address, args.runs) else 0
    except ConfigError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
