"""Which executor a command's options ask for: the local one (executor) or Ray (rayexec), and those options.

Apart from both executors so that neither imports the other: rayexec builds on executor, and only this
module knows them both (Ray is imported only when --executor ray asks for it).
"""

from __future__ import annotations

from common.errors import ConfigError

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
        "--retries",
        type=int,
        default=2,
        help="ray: how many times the runs of a lost worker or node are tried again elsewhere",
    )


def make(args, explicit: dict, cells: int, gpu: bool = False):
    """The executor the arguments ask for; a ConfigError names what is wrong."""
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.executor == "local":
        if args.address:
            raise ConfigError("--address is for --executor ray")
        return LocalExecutor(min(args.jobs, max(1, cells)))
    from .rayexec import RayExecutor

    return RayExecutor(
        args.address, threads=args.threads, retries=args.retries, gpus=1 if gpu else 0, explicit=explicit
    )
