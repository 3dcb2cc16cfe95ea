"""python -m compare.run: run identical seeded configurations on each framework.

Each framework runs as a worker subprocess in its own environment; records
stream back as JSON lines and are appended to <out>/<run-id>/records.jsonl as
they arrive, then the reports are built from them (compare.report).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from common import records
from common.config import ACTIVATIONS, BN_POSITIONS, DEVICES, DTYPES, EXECUTIONS, PLACEMENTS, POOLINGS, VARIANTS, ModelSpec, RunConfig
from common.data import find_data_dir
from common.errors import BNCompareError, ConfigError
from common.registry import FRAMEWORKS, parse_frameworks

from . import envs
from .progress import Progress

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"epochs": 2, "train_limit": 6000, "test_limit": 2000}


def _no_repeats(items: tuple, what: str, text: str) -> tuple:
    repeated = sorted({str(i) for i in items if items.count(i) > 1})
    if repeated:
        raise ConfigError(f"{what} {', '.join(repeated)} listed twice in {text!r}; list each once")
    return items


def _list(text: str, kind: str, choices) -> tuple:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in choices]
    if bad or not items:
        raise ConfigError(f"unknown {kind} {bad or text!r}; choose from {', '.join(choices)}")
    return _no_repeats(items, kind, text)


def _seeds(text: str) -> tuple:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return _no_repeats(seeds, "seed", text)


def check_run_dir(out: str, run_id: str) -> Path:
    """The run's folder, checked before anything is written: a clear error, never a traceback."""
    if run_id in ("", ".", "..") or "/" in run_id or os.sep in run_id or "\0" in run_id:
        raise ConfigError(f"--run-id {run_id!r} must be a plain folder name (no '/'), e.g. lr-sweep-1")
    run_dir = Path(out) / run_id
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder; pass a folder (it is created "
                          f"if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {existing} (permission denied); pass a folder "
                          f"you can write to")
    if (run_dir / "records.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; pick another --run-id or --out")
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compare.run",
        description="Train BN-LeNet with identical seeds, weights and batches on each framework "
                    "and write accuracy, throughput and train/eval divergence reports.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = RunConfig()
    m = ModelSpec()
    g = p.add_argument_group("what to run")
    g.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                   help=f"comma-separated, from: {', '.join(FRAMEWORKS)}")
    g.add_argument("--variants", default=",".join(VARIANTS),
                   help="scratch = our BN; builtin = the framework's BN set to the same decay/eps; "
                        "builtin-defaults = the framework's BN as constructed by default; none = no BN")
    g.add_argument("--seeds", default=str(d.seed), help="comma-separated seeds, e.g. 0,1,2")
    g.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['epochs']} epochs on {QUICK['train_limit']} training and "
                        f"{QUICK['test_limit']} test images (explicit options still win)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr, help="plain SGD learning rate")
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    g.add_argument("--device", choices=DEVICES, default=d.device,
                   help="auto = the GPU when the framework sees one; gpu without one is an error")
    g.add_argument("--execution", choices=EXECUTIONS, default=d.execution,
                   help="compiled = hybridized Gluon / tf.function; eager = imperative (PyTorch is always eager)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="first steps of each epoch, timed apart from the throughput figure")
    g.add_argument("--train-limit", type=int, default=None, help="use the first N training images (0 = all)")
    g.add_argument("--test-limit", type=int, default=None, help="use the first N test images (0 = all)")
    g.add_argument("--probe-size", type=int, default=d.probe_size, help="test images in the divergence probe")
    g.add_argument("--trace-steps", type=int, default=0,
                   help="also record the loss of each of the first N steps of every epoch")
    g = p.add_argument_group("model (BN-LeNet)")
    g.add_argument("--decay", type=float, default=m.decay, help="running = decay*running + (1-decay)*batch")
    g.add_argument("--epsilon", type=float, default=m.epsilon)
    g.add_argument("--bn-positions", default=",".join(m.bn_positions),
                   help=f"layers followed by BN, from: {', '.join(BN_POSITIONS)}")
    g.add_argument("--no-bias-before-bn", action="store_true", help="drop the bias of layers followed by BN")
    g.add_argument("--activation", choices=ACTIVATIONS, default=m.activation)
    g.add_argument("--pooling", choices=POOLINGS, default=m.pooling)
    g.add_argument("--bn-placement", choices=PLACEMENTS, default=m.bn_placement)
    g.add_argument("--dropout", type=float, default=m.dropout, help="after the fc1 and fc2 activations")
    g.add_argument("--freeze-gamma-beta", action="store_true", help="keep gamma=1, beta=0")
    g = p.add_argument_group("data, environments, output")
    g.add_argument("--data-dir", help="folder with the four Fashion-MNIST *-ubyte(.gz) files "
                   "(default: $FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist)")
    g.add_argument("--no-verify-data", action="store_true",
                   help="accept IDX files that are not the official Fashion-MNIST (the report says so)")
    g.add_argument("--python", action="append", default=[], metavar="FW=PATH",
                   help="interpreter for a framework (repeatable); default: this Python if it has the "
                        "framework, else its tox env, created on demand")
    g.add_argument("--reference", help="framework the drift is measured against (default: the first)")
    g.add_argument("--out", default="reports", help="reports go to OUT/RUN_ID/")
    g.add_argument("--run-id", help="default: UTC time stamp")
    g.add_argument("--no-progress", action="store_true", help="one line per epoch instead of a live bar")
    return p


def configs_from_args(args) -> list:
    variants = _list(args.variants, "variant", VARIANTS)
    positions = _list(args.bn_positions, "BN position", BN_POSITIONS)
    limits = QUICK if args.quick else {}
    out = []
    for variant in variants:
        spec = ModelSpec(variant=variant, bn_positions=positions, bias_before_bn=not args.no_bias_before_bn,
                         activation=args.activation, pooling=args.pooling, bn_placement=args.bn_placement,
                         dropout=args.dropout, freeze_gamma_beta=args.freeze_gamma_beta,
                         decay=args.decay, epsilon=args.epsilon)
        for seed in _seeds(args.seeds):
            out.append(RunConfig(
                model=spec, lr=args.lr, batch_size=args.batch_size, seed=seed, dtype=args.dtype,
                device=args.device, warmup_steps=args.warmup_steps, probe_size=args.probe_size,
                trace_steps=args.trace_steps, execution=args.execution,
                epochs=args.epochs if args.epochs is not None else limits.get("epochs", RunConfig.epochs),
                train_limit=args.train_limit if args.train_limit is not None else limits.get("train_limit", 0),
                test_limit=args.test_limit if args.test_limit is not None else limits.get("test_limit", 0)))
    return out


def parse_pythons(items) -> dict:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--python takes FW=PATH, got {item!r}")
        parse_frameworks(name)
        out[name] = path
    return out


WORKER_GRACE_SECONDS = 10  # after a forwarded signal, how long a worker may take to stop before it is killed
LOG_TAIL_LINES = 20


class RecordWriter:
    """Appends each record to records.jsonl as it arrives (a crash loses nothing), shows it, and
    keeps what the runner must know: which runs have ended and how many epochs each has done."""

    def __init__(self, path: Path, progress: Progress):
        self.path, self.progress = path, progress
        self.fh = open(path, "a", encoding="utf-8")
        self.ended, self.epochs = set(), {}

    def write(self, record: dict) -> None:
        key = (record.get("framework"), record.get("config_id"))
        if record.get("kind") == "epoch":
            self.epochs[key] = record["epoch"]
        elif record.get("kind") in ("run_end", "error"):
            self.ended.add(key)
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        self.progress.record(record)

    def end_unfinished(self, framework, configs, status, **fields) -> None:
        """A terminal record for each of these runs that has none yet."""
        for config in configs:
            if (framework, config.config_id) not in self.ended:
                self.write(records.make(
                    "run_end" if status == "interrupted" else "error", framework=framework,
                    variant=config.model.variant, seed=config.seed, config_id=config.config_id, status=status,
                    epochs_done=self.epochs.get((framework, config.config_id), 0), **fields))

    def close(self):
        self.fh.close()


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT/SIGTERM: forwarded to the running worker (killed if it has not stopped after
    WORKER_GRACE_SECONDS, or at a second signal); with no worker running, Interrupted is raised.
    The runner then records every unfinished run as interrupted and builds the report."""

    def __init__(self):
        self.signum, self.worker, self._timer = None, None, None
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        proc = self.worker
        if proc is None or proc.poll() is not None:
            raise Interrupted(self.signum)
        if first:
            proc.send_signal(signum)
            self._timer = threading.Timer(WORKER_GRACE_SECONDS, proc.kill)
            self._timer.daemon = True
            self._timer.start()
        else:
            proc.kill()

    def worker_done(self):
        self.worker = None
        if self._timer:
            self._timer.cancel()

    def ignore(self):
        """From here on (writing the last records and the report) a signal changes nothing."""
        for s in self._old:
            signal.signal(s, signal.SIG_IGN)

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _log_tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-LOG_TAIL_LINES:])


def run_framework(framework, python, configs, run_dir, data_dir, verify, writer, signals) -> None:
    """Run one worker; a crash costs only this framework's unfinished runs (recorded as crashed)."""
    job = {"framework": framework, "out": str(run_dir), "data_dir": data_dir, "verify": verify,
           "configs": [c.to_dict() for c in configs]}
    log_path = run_dir / "logs" / f"{framework}.log"
    log_path.parent.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    with open(log_path, "w") as log:
        # its own session: a terminal's Ctrl-C reaches the runner only, which forwards it once
        proc = subprocess.Popen([python, "-m", "compare.worker"], cwd=ROOT, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
        signals.worker = proc
        try:
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    log.write(f"[non-record stdout] {line}")
                    continue
                if record.get("kind") == "progress":
                    writer.progress.update(record)
                else:
                    writer.write(record)
            code = proc.wait()
        finally:
            signals.worker_done()
            if proc.poll() is None:  # only on an error in this loop itself
                proc.kill()
                proc.wait()
    if signals.signum is None:
        tail = _log_tail(log_path)
        writer.end_unfinished(framework, configs, "crashed", error_type="WorkerCrashed", exit_status=code,
                              log_tail=tail,
                              message=f"the {framework} worker exited with status {code} before finishing; "
                                      f"last lines of {log_path}: " + " | ".join(tail.splitlines()[-3:]))


def environment_record(args, argv, frameworks, pythons, data_dir) -> dict:
    import numpy
    import pandas
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"command": " ".join(["python -m compare.run"] + list(argv)), "started": datetime.now(timezone.utc).isoformat(),
            "python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "numpy": numpy.__version__, "pandas": pandas.__version__,
            "frameworks": list(frameworks), "interpreters": pythons, "data_dir": data_dir,
            "data_verified": not args.no_verify_data, "args": vars(args)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    run_id = args.run_id if args.run_id is not None else datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        frameworks = parse_frameworks(args.frameworks)
        configs = configs_from_args(args)
        explicit = parse_pythons(args.python)
        reference = args.reference or frameworks[0]
        if reference not in frameworks:
            raise ConfigError(f"--reference {reference} is not among --frameworks {','.join(frameworks)}")
        data_dir = str(find_data_dir(args.data_dir))
        run_dir = check_run_dir(args.out, run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
    except (BNCompareError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"bn-compare run {run_id}: {len(configs)} configuration(s) x {len(frameworks)} framework(s) "
          f"-> {run_dir}", file=sys.stderr)
    progress = Progress(live=not args.no_progress and sys.stderr.isatty())
    writer = RecordWriter(run_dir / "records.jsonl", progress)
    for framework in frameworks:  # the plan: what "unfinished" is measured against
        for config in configs:
            writer.write(records.make("plan", framework=framework, variant=config.model.variant, seed=config.seed,
                                      config_id=config.config_id, epochs=config.epochs, config=config.to_dict()))
    signals = Signals()
    try:
        return _run(args, argv, run_id, run_dir, frameworks, configs, explicit, reference, data_dir, writer,
                    signals)
    finally:
        signals.restore()


def _run(args, argv, run_id, run_dir, frameworks, configs, explicit, reference, data_dir, writer, signals) -> int:
    pythons = {}
    started = time.time()
    try:
        for framework in frameworks:
            try:
                pythons[framework] = envs.resolve(framework, explicit, log=lambda m: print(m, file=sys.stderr))
            except BNCompareError as exc:
                print(f"[{framework}] skipped: {exc}", file=sys.stderr)
                writer.end_unfinished(framework, configs, "failed", error_type=type(exc).__name__, message=str(exc))
                continue
            print(f"[{framework}] {pythons[framework]}", file=sys.stderr)
            run_framework(framework, pythons[framework], configs, run_dir, data_dir,
                          not args.no_verify_data, writer, signals)
            if signals.signum is not None:
                raise Interrupted(signals.signum)
    except Interrupted as exc:
        signals.ignore()
        name = signal.Signals(exc.signum).name
        for framework in frameworks:
            writer.end_unfinished(framework, configs, "interrupted", message=f"stopped by {name}")
    finally:
        signals.ignore()
        writer.close()
        env_record = environment_record(args, argv, frameworks, pythons, data_dir)
        env_record.update(reference=reference, run_id=run_id, seconds=round(time.time() - started, 1),
                          interrupted=signals.signum is not None,
                          signal=signal.Signals(signals.signum).name if signals.signum else None)
        from .report import write_json
        write_json(run_dir / "environment.json", env_record)
    from . import report
    summary, _ = report.build(run_dir)
    if signals.signum is not None:
        print(f"\ninterrupted by {signal.Signals(signals.signum).name}: what was measured is in the report; "
              f"unfinished runs are marked interrupted", file=sys.stderr)
    print(f"\nreport: {run_dir / 'report.md'}", file=sys.stderr)
    print(summary, file=sys.stderr)
    if signals.signum is not None:
        return 128 + signals.signum
    return 1 if writer.progress.errors else 0

if __name__ == "__main__":
    sys.exit(main())
