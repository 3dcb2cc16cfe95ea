"""The Ray executor: the same tasks as the local executor, as Ray tasks on a cluster.

Each task (a chunk of one framework's configurations) is a Ray streaming-generator
task. On whichever node Ray puts it, it finds that node's environment for the
framework (the same checkout path as the driver, with its `.tox/<framework>`
env; see docs/clusters.md), starts the same `compare.execution.worker`
subprocess in a temporary folder, and yields each record back as it comes,
preceded by the snapshot file it names, and, at the end, the worker's log. The
driver writes them exactly as the local executor does, so records.jsonl, the
reports and resumption are the same. Nothing needs a shared file system.

Faults: a task whose worker or node is lost costs only its runs without an end
record, which are planned again (a new attempt, with `attempt` in the plan
record) and resubmitted, anywhere in the cluster, up to `retries` times; then
they are recorded as crashed. SIGINT/SIGTERM on the driver cancel the running
tasks (their workers are stopped) and no further task starts.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common.errors import BackendUnavailable, ConfigError

from .executor import ROOT, WORKER_GRACE_SECONDS, LocalExecutor, Task, start_worker, worker_job, worker_records


class WorkerLost(Exception):
    """The worker subprocess of a Ray task exited before finishing (or the node running it was lost)."""


def _node() -> str:
    import ray

    return ray.util.get_node_ip_address()


def ray_task(framework: str, job: dict, explicit: dict, threads: int | None, grace: float):
    """Body of the Ray task (a generator): runs one worker on this node, yields what it writes."""
    from . import envs

    node = _node()
    try:
        python = envs.resolve(framework, explicit, create=False)
    except BackendUnavailable as exc:
        yield {
            "kind": "_failed",
            "node": node,
            "message": f"node {node} has no environment for {framework}: {exc} (on that node, in {ROOT})",
        }
        return
    with tempfile.TemporaryDirectory(prefix="bn-compare-") as tmp:
        log_path = Path(tmp) / "worker.log"
        with open(log_path, "w") as log:
            proc = start_worker(python, {**job, "out": tmp}, log, threads)
            try:
                for record in worker_records(proc, log):
                    snapshot = record.get("snapshot") if record.get("kind") == "epoch" else None
                    if snapshot and (Path(tmp) / snapshot).is_file():
                        yield {"kind": "_file", "path": snapshot, "data": (Path(tmp) / snapshot).read_bytes()}
                    yield record
                code = proc.wait()
            finally:  # cancelled (KeyboardInterrupt here) or failed: the worker stops with us
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(grace)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        text = log_path.read_text(errors="replace")
        yield {"kind": "_log", "node": node, "text": text}
        if code != 0:
            tail = " | ".join(text.rstrip().splitlines()[-3:])
            raise WorkerLost(f"the {framework} worker on node {node} exited with status {code}: {tail}")


class _RayHandle:
    """What Signals needs of a worker (poll, send_signal, kill), for a Ray task."""

    def __init__(self, ref):
        self.ref, self.done = ref, False

    def poll(self):
        return 0 if self.done else None

    def send_signal(self, signum):
        import ray

        ray.cancel(self.ref)  # KeyboardInterrupt in the task: it stops its worker

    def kill(self):
        import ray

        ray.cancel(self.ref, force=True)


class RayExecutor(LocalExecutor):
    """Tasks on a Ray cluster: `address` as Ray takes it ("auto", "ray://host:port", or None for a
    local one started here); each task asks for `threads` CPUs (its worker's threads) and one GPU
    when the run asks for the GPU."""

    name = "ray"
    resolves_on_nodes = True  # each task finds its framework's interpreter on the node it runs on

    def __init__(
        self,
        address: str | None = None,
        threads: int = 1,
        retries: int = 2,
        gpus: float = 0,
        explicit: dict | None = None,
        init_options: dict | None = None,
    ):
        from .extras import ensure

        ensure("ray")  # installed on first use (requirements/ray.txt)
        import ray

        if threads < 1 or retries < 0:
            raise ConfigError("--threads must be at least 1 and --retries at least 0")
        self.ray, self.address, self.threads, self.retries, self.gpus = ray, address, threads, retries, gpus
        self.explicit = explicit or {}  # --python FW=PATH: the same path on every node
        self._started_here = not ray.is_initialized()
        if self._started_here:
            try:
                ray.init(
                    address=address,
                    log_to_driver=False,
                    include_dashboard=False,
                    runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
                    **(init_options or {}),
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"cannot connect to Ray at {address or 'a new local cluster'}: {exc}; start "
                    f"one with `ray start --head` and pass --address auto"
                ) from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.jobs = max(1, cpus // threads)  # tasks that fit at once: how finely each framework's runs are split
        self._task = ray.remote(ray_task).options(num_cpus=threads, num_gpus=gpus, max_retries=0)

    def describe(self) -> dict:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return {
            "executor": self.name,
            "address": self.address,
            "jobs": self.jobs,
            "threads_per_worker": self.threads,
            "retries": self.retries,
            "ray_version": self.ray.__version__,
            "ray_nodes": len(nodes),
            "ray_cpus": int(self.ray.cluster_resources().get("CPU", 0)),
        }

    def shutdown(self) -> None:
        if self._started_here:
            self.ray.shutdown()

    def run_task(self, task: Task, run_dir: Path, data_dir, verify, writer, signals) -> None:
        configs = list(task.configs)
        for attempt in range(1, self.retries + 2):
            if signals.signum is not None:
                return
            if attempt > 1:  # a new attempt supersedes what the lost one left of these runs
                writer.replan(task.framework, configs, attempt)
            try:
                self._attempt(task, configs, attempt, run_dir, data_dir, verify, writer, signals)
                return
            except WorkerLost as exc:
                lost = str(exc)
            except self.ray.exceptions.RayError as exc:  # the node or the task's process was lost
                lost = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if signals.signum is not None:
                return
            configs = [c for c in configs if (task.framework, c.config_id) not in writer.ended]
            if not configs:
                return
            print(
                f"[{task.framework}] {lost}; {len(configs)} run(s) without a result"
                + (f", retrying (attempt {attempt + 1} of {self.retries + 1})" if attempt <= self.retries else ""),
                file=sys.stderr,
            )
        writer.end_unfinished(
            task.framework,
            configs,
            "crashed",
            error_type="WorkerLost",
            attempts=self.retries + 1,
            message=f"lost {self.retries + 1} time(s) (retries exhausted): {lost}",
        )

    def _attempt(self, task, configs, attempt, run_dir, data_dir, verify, writer, signals) -> None:
        job = worker_job(task, configs, data_dir, verify, out=None)  # the task writes in a folder of its node
        gen = self._task.remote(task.framework, job, self.explicit, self.threads, WORKER_GRACE_SECONDS)
        handle = _RayHandle(gen)
        signals.add(handle)
        log_path = run_dir / "logs" / f"{task.log_name}.log"
        log_path.parent.mkdir(exist_ok=True)
        try:
            for ref in gen:
                item = self.ray.get(ref)
                kind = item.get("kind")
                if kind == "_file":
                    path = run_dir / item["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(item["data"])
                elif kind == "_log":
                    with open(log_path, "a") as log:
                        log.write(f"--- attempt {attempt} on node {item['node']} ---\n{item['text']}")
                elif kind == "_failed":
                    writer.end_unfinished(
                        task.framework, configs, "failed", error_type="BackendUnavailable", message=item["message"]
                    )
                else:
                    writer.receive(item)
        except self.ray.exceptions.TaskCancelledError:
            if signals.signum is None:
                raise
        finally:
            handle.done = True
            signals.remove(handle)

    def run(self, tasks: list, run_dir: Path, data_dir, verify, writer, signals) -> None:
        self._each(
            tasks,
            lambda task: self.run_task(task, run_dir, data_dir, verify, writer, signals),
            signals,
            workers=max(1, len(tasks)),
        )
