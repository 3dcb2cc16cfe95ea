"""Runs framework workers and streams their records into one records.jsonl.

A task is one worker process: a framework, its interpreter, and the
configurations it trains in order. The local executor runs up to `jobs` tasks
at once; with more than one, each worker's framework threads are limited so
that jobs x threads never exceeds the cores (oversubscribed CPUs make every
throughput figure meaningless). `compare.run` and `compare.study` both use it.

Signals: SIGINT/SIGTERM are forwarded once to every running worker (each is
killed if it has not stopped after WORKER_GRACE_SECONDS, or at a second
signal) and no further task starts; the caller then records every unfinished
run as interrupted and builds the report.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from common import records

from .progress import Progress

ROOT = Path(__file__).resolve().parents[2]  # the repository
WORKER_GRACE_SECONDS = 10  # after a forwarded signal, how long a worker may take to stop before it is killed
LOG_TAIL_LINES = 20
# What each framework reads for its number of compute threads.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")


@dataclass
class Task:
    framework: str
    python: str
    configs: list  # RunConfig, trained in this order by one worker
    log_name: str  # logs/<log_name>.log
    options: dict | None = None  # extra job fields for the worker (e.g. which snapshots to keep)


class RecordWriter:
    """Appends each record to records.jsonl as it arrives (a crash loses nothing), shows it, and
    keeps what the runner must know: which runs have ended and how many epochs each has done.
    Safe to call from the executor's threads."""

    def __init__(self, path: Path, progress: Progress, tracker=None):
        """tracker: a compare.reporting.tracking.Tracker each record is also handed to (it never blocks)."""
        self.path, self.progress, self.tracker = path, progress, tracker
        self.fh = open(path, "a", encoding="utf-8")
        self.ended, self.epochs, self.plans = set(), {}, {}
        self._lock = threading.Lock()  # records.jsonl and the state above
        self._display = threading.Lock()  # the progress display

    def write(self, record: dict) -> None:
        key = (record.get("framework"), record.get("config_id"))
        with self._lock:
            if record.get("kind") == "plan":
                self.plans[key] = record
                self.ended.discard(key)
                self.epochs.pop(key, None)
            elif record.get("kind") == "epoch":
                self.epochs[key] = record["epoch"]
            elif record.get("kind") in ("run_end", "error"):
                self.ended.add(key)
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
            if self.tracker is not None:  # in the order written
                self.tracker.submit(record)
        with self._display:  # the terminal never holds up a record
            self.progress.record(record)

    def replan(self, framework, configs, attempt: int) -> None:
        """A new attempt at these runs: their plan again, with `attempt`; what an earlier attempt left
        of them is superseded in the reports (compare.report.latest_attempts)."""
        for config in configs:
            plan = {k: v for k, v in self.plans[(framework, config.config_id)].items() if k not in ("kind", "schema")}
            self.write(records.make("plan", **{**plan, "attempt": attempt}))

    def end_unfinished(self, framework, configs, status, **fields) -> None:
        """A terminal record for each of these runs that has none yet."""
        for config in configs:
            if (framework, config.config_id) not in self.ended:
                self.write(
                    records.make(
                        "run_end" if status == "interrupted" else "error",
                        framework=framework,
                        variant=config.model.variant,
                        seed=config.seed,
                        config_id=config.config_id,
                        status=status,
                        epochs_done=self.epochs.get((framework, config.config_id), 0),
                        **fields,
                    )
                )

    def show(self, event: dict) -> None:
        """A worker's progress line: shown, not kept."""
        with self._display:
            self.progress.update(event)

    def receive(self, record: dict) -> None:
        """What a worker wrote: a progress line is shown, a record is kept."""
        if record.get("kind") == "progress":
            self.show(record)
        else:
            self.write(record)

    def close(self):
        self.fh.close()
        self.progress.close()


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT/SIGTERM: forwarded once to every running worker, each killed if it has not stopped after
    WORKER_GRACE_SECONDS (or at once at a second signal). With no worker running, the handler raises
    Interrupted in the main thread, so that whatever it was doing (creating an environment) stops.

    The handler itself takes no lock and does no I/O: it notes the signal and hands it to a forwarding
    thread through a SimpleQueue (safe to put to from a signal handler). A signal arrives in the main
    thread between any two bytecodes, also while the handler of an earlier one is running: under
    `tox -q`, tox forwards the terminal's SIGINT again a fraction of a second after the terminal sent it,
    and a handler that held a lock while starting a timer thread was re-entered there and waited on its
    own lock forever (no report; tox killed the runner a minute later)."""

    def __init__(self, on_signal=None):
        """on_signal(): called once, by the forwarding thread, at the first signal (the runner mutes its
        progress display there, so that nothing it writes to the terminal can hold up the report)."""
        self.signum = None
        self._on_signal = on_signal
        self._workers, self._timers = set(), {}
        self._lock = threading.Lock()  # the forwarding thread's and add/remove's, never the handler's
        self._queue = queue.SimpleQueue()  # True: a second (or later) signal
        self._seen = 0
        self._forwarder = threading.Thread(target=self._forward, name="signal-forwarder", daemon=True)
        self._forwarder.start()
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop(self, proc) -> None:  # called with the lock held
        if proc.poll() is None and proc not in self._timers:
            proc.send_signal(self.signum)
            self._timers[proc] = threading.Timer(WORKER_GRACE_SECONDS, proc.kill)
            self._timers[proc].daemon = True
            self._timers[proc].start()

    def _handle(self, signum, frame):
        self._seen += 1
        if self.signum is None:
            self.signum = signum
        self._queue.put(self._seen > 1)
        if not any(proc.poll() is None for proc in tuple(self._workers)):  # poll never blocks
            raise Interrupted(self.signum)

    def _forward(self) -> None:
        while True:
            second = self._queue.get()
            if second is None:
                return
            if not second and self._on_signal:
                self._on_signal()
            with self._lock:
                for proc in [p for p in self._workers if p.poll() is None]:
                    proc.kill() if second else self._stop(proc)

    def add(self, proc) -> None:
        with self._lock:
            self._workers.add(proc)
            if self.signum is not None:  # the signal came while this worker was starting
                self._stop(proc)

    def remove(self, proc) -> None:
        with self._lock:
            self._workers.discard(proc)
            timer = self._timers.pop(proc, None)
        if timer:
            timer.cancel()

    def ignore(self):
        """From here on (writing the last records and the report) a signal changes nothing."""
        for s in self._old:
            signal.signal(s, signal.SIG_IGN)

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._queue.put(None)  # the forwarding thread ends


def _log_tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-LOG_TAIL_LINES:])


def worker_env(threads: int | None) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    )
    if threads:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
        env.update(TF_NUM_INTEROP_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1")
    return env


def worker_job(task: Task, configs: list, data_dir, verify, out) -> dict:
    """What a worker reads on its stdin; out: where it writes snapshots (None: the caller sets it)."""
    return {
        "framework": task.framework,
        "out": None if out is None else str(out),
        "data_dir": data_dir,
        "verify": verify,
        "configs": [c.to_dict() for c in configs],
        **(task.options or {}),
    }


def start_worker(python: str, job: dict, log, threads: int | None) -> subprocess.Popen:
    """A compare.execution.worker process with its job written to its stdin and its stderr to log. Its own session:
    a terminal's Ctrl-C reaches the runner only, which forwards it once."""
    proc = subprocess.Popen(
        [python, "-m", "compare.execution.worker"],
        cwd=ROOT,
        env=worker_env(threads),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def worker_records(proc: subprocess.Popen, log):
    """Each record (JSON line) the worker writes to its stdout; any other line goes to its log."""
    for line in proc.stdout:
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            log.write(f"[non-record stdout] {line}")


def run_worker(task: Task, run_dir: Path, data_dir, verify, writer, signals, threads=None) -> None:
    """Run one worker; a crash costs only this task's unfinished runs (recorded as crashed)."""
    log_path = run_dir / "logs" / f"{task.log_name}.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "a") as log:
        proc = start_worker(task.python, worker_job(task, task.configs, data_dir, verify, run_dir), log, threads)
        signals.add(proc)
        try:
            for record in worker_records(proc, log):
                writer.receive(record)
            code = proc.wait()
        finally:
            signals.remove(proc)
            if proc.poll() is None:  # only on an error in this loop itself
                proc.kill()
                proc.wait()
    if signals.signum is None:
        tail = _log_tail(log_path)
        writer.end_unfinished(
            task.framework,
            task.configs,
            "crashed",
            error_type="WorkerCrashed",
            exit_status=code,
            log_tail=tail,
            message=f"the {task.framework} worker exited with status {code} before finishing; "
            f"last lines of {log_path}: " + " | ".join(tail.splitlines()[-3:]),
        )


def split_into_tasks(framework: str, python: str, configs: list, parts: int, options: dict | None = None) -> list:
    """The configurations of one framework as up to `parts` tasks, dealt round-robin (neighbouring
    cells, which tend to cost alike, go to different workers)."""
    parts = max(1, min(parts, len(configs)))
    return [
        Task(framework, python, configs[i::parts], framework if parts == 1 else f"{framework}-{i + 1}", options)
        for i in range(parts)
    ]


def default_jobs(cores: int | None = None) -> int:
    return max(1, cores or os.cpu_count() or 1)


def threads_per_worker(jobs: int, cores: int | None = None) -> int | None:
    """Compute threads each worker may use; None (the frameworks' own default) with one job."""
    if jobs <= 1:
        return None
    return max(1, (cores or os.cpu_count() or 1) // jobs)


class LocalExecutor:
    """Up to `jobs` worker processes on this machine at once."""

    name = "local"
    resolves_on_nodes = False  # the interpreters are found here, before the tasks start

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ValueError("jobs must be at least 1")
        self.jobs = jobs
        self.threads = threads_per_worker(jobs)

    def describe(self) -> dict:
        return {"executor": self.name, "jobs": self.jobs, "threads_per_worker": self.threads}

    def shutdown(self) -> None:
        """Release what the executor holds (nothing, locally)."""

    def run(self, tasks: list, run_dir: Path, data_dir, verify, writer: RecordWriter, signals: Signals) -> None:
        """Run every task; returns when all have ended, or, after a signal, when the running ones have
        stopped (tasks not yet started never start). Unfinished runs are for the caller to record."""

        self._each(
            tasks,
            lambda task: run_worker(task, run_dir, data_dir, verify, writer, signals, self.threads),
            signals,
            self.jobs,
        )

    @staticmethod
    def _each(tasks, one, signals, workers: int) -> None:
        """one(task) for every task, `workers` at a time, in threads; the main thread waits, so that its
        signal handler runs promptly. After a signal no further task starts."""

        def guarded(task):
            if signals.signum is None:
                one(task)

        with ThreadPoolExecutor(workers, thread_name_prefix="task") as pool:
            pending = {pool.submit(guarded, task) for task in tasks}
            while pending:
                try:  # short waits, so that the main thread's signal handler runs promptly
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                except Interrupted:
                    continue  # the running workers were told to stop; wait for them
                for future in done:
                    future.result()  # an error in the executor itself (not a worker's) is a bug: raise it
