"""Which executor a command's options ask for: the local one (executor) or Ray (rayexec), and those options.

Apart from both executors so that neither imports the other: rayexec builds on executor, and only this
module knows them both (Ray is imported only when --executor ray asks for it).
"""

from __future__ import annotations

from common.errors import ConfigError
from common.network import parse_address
from common.registry import framework_info

from .executor import LocalExecutor


def add_arguments(group, default_jobs: int) -> None:
    """The executor options of compare.run and compare.study."""
    group.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: worker processes on this machine; ray: Ray tasks on a cluster (see docs/clusters.md)",
    )
    group.add_argument(
        "--jobs",
        type=int,
        default=default_jobs,
        help="local: workers at once, each limited to cores/jobs threads (jobs x threads <= cores)",
    )
    group.add_argument(
        "--address",
        default=None,
        help="ray: the cluster, as Ray takes it (auto, HOST:PORT, ray://HOST:10001); "
        "default: a local Ray started for this command",
    )
    group.add_argument("--threads", type=int, default=1, help="ray: CPUs (and compute threads) per worker task")
    group.add_argument(
        "--replica-nodes",
        type=int,
        default=1,
        help="PyTorch's --replicas K over N machines, K/N on each: this one runs replica 0 and listens at "
        "--replica-address; each other runs `python -m frameworks.torch.follower serve --address HOST:PORT` "
        "(docs/clusters.md). One run at a time",
    )
    group.add_argument(
        "--replica-address",
        default=None,
        help="with --replica-nodes: HOST:PORT where replica 0 listens, HOST this machine's address on the network "
        "the other machines reach",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=2,
        help="ray: how many times the runs of a lost worker or node are tried again elsewhere",
    )


def replica_nodes(args, frameworks, configs) -> dict:
    """Check --replica-nodes and --replica-address against the runs: the worker job's options that hand them to the
    framework ({"replica_nodes", "replica_address"}: its backend module's prepare takes them), {} on one machine;
    a ConfigError names what is wrong."""
    if args.replica_nodes == 1 and args.replica_address is None:
        return {}
    nodes = args.replica_nodes
    if nodes < 1:
        raise ConfigError(f"--replica-nodes must be at least 1, got {nodes}")
    if nodes == 1:
        raise ConfigError("--replica-address is for --replica-nodes 2 or more (one machine picks its own port)")
    if args.replica_address is None:
        raise ConfigError(f"--replica-nodes {nodes} needs --replica-address HOST:PORT, where replica 0 listens")
    parse_address(args.replica_address)
    if args.executor != "local":
        raise ConfigError("--replica-nodes runs with the local executor: the other machines serve the replicas")
    spread = [c for c in configs if c.replicas > 1]
    able = [f for f in frameworks if framework_info(f).nodes]
    others = sorted(set(frameworks) - set(able))
    if spread and others:
        who = " and ".join(framework_info(f).label for f in able) or "no framework"
        raise ConfigError(
            f"--replica-nodes spreads {who}'s replicas only; {', '.join(others)} run(s) theirs on one machine: "
            f"use --frameworks {','.join(able)}"
        )
    uneven = sorted({c.replicas for c in spread if c.replicas % nodes})
    if uneven:
        raise ConfigError(
            f"--replicas {', '.join(map(str, uneven))} over --replica-nodes {nodes}: every machine runs an equal "
            f"share; use a multiple of {nodes} replicas"
        )
    return {"replica_nodes": nodes, "replica_address": args.replica_address}


def make(args, explicit: dict, cells: int, gpu: bool = False):
    """The executor the arguments ask for; a ConfigError names what is wrong."""
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.executor == "local":
        if args.address:
            raise ConfigError("--address is for --executor ray")
        if args.replica_nodes > 1:  # replica 0 of every run listens at the one --replica-address
            return LocalExecutor(1)
        return LocalExecutor(min(args.jobs, max(1, cells)))
    from .rayexec import RayExecutor

    return RayExecutor(
        args.address, threads=args.threads, retries=args.retries, gpus=1 if gpu else 0, explicit=explicit
    )
