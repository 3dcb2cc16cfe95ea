"""What every command shares: its options' parsing, the run folder's checks, the machine and the environment a
run records, the plan records, and executing configurations on an executor. compare.run, compare.study,
compare.bench and compare.port are thin commands over it; no command imports another (tests/test_imports.py).
"""

from __future__ import annotations

import os
import platform
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import records
from common.errors import BNCompareError, ConfigError
from common.registry import parse_frameworks

from .execution import envs
from .execution.executor import Interrupted, RecordWriter, split_into_tasks


def _no_repeats(items: tuple, what: str, text: str) -> tuple:
    repeated = sorted({str(i) for i in items if items.count(i) > 1})
    if repeated:
        raise ConfigError(f"{what} {', '.join(repeated)} listed twice in {text!r}; list each once")
    return items


def parse_list(text: str, kind: str, choices) -> tuple:
    """A comma-separated list of known names, each once (--variants, --norm-positions, compare.bench's lists)."""
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in choices]
    if bad or not items:
        raise ConfigError(f"unknown {kind} {bad or text!r}; choose from {', '.join(choices)}")
    return _no_repeats(items, kind, text)


def parse_seeds(text: str) -> tuple:
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
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder; pass a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {out}: cannot write in {existing} (permission denied); pass a folder you can write to"
        )
    if (run_dir / "records.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; pick another --run-id or --out")
    return run_dir


def parse_pythons(items) -> dict:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--python takes FW=PATH, got {item!r}")
        parse_frameworks(name)
        out[name] = path
    return out


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_record(args, argv, frameworks, pythons, data_dir, started: float) -> dict:
    """The machine, interpreters and command of a run that began at `started` (time.time())."""
    import numpy
    import pandas

    return {
        "command": " ".join(["python -m compare.run"] + list(argv)),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "frameworks": list(frameworks),
        "interpreters": pythons,
        # this Python's own framework, whatever its version, or the pinned tox env's (envs.resolve logs which)
        "interpreter_sources": {fw: envs.source(fw, path, parse_pythons(args.python)) for fw, path in pythons.items()}
        if pythons
        else {},
        "data_dir": data_dir,
        "data_verified": not args.no_verify_data,
        "args": vars(args),
    }


def plan_records(writer: RecordWriter, frameworks, configs, coords: dict | None = None) -> None:
    """One plan record per framework x configuration, written first: what "unfinished" is measured
    against. coords: config_id -> a study's grid coordinates."""
    for framework in frameworks:
        for config in configs:
            extra = {"coords": coords[config.config_id]} if coords else {}
            writer.write(
                records.make(
                    "plan",
                    framework=framework,
                    variant=config.model.variant,
                    seed=config.seed,
                    config_id=config.config_id,
                    epochs=config.epochs,
                    config=config.to_dict(),
                    **extra,
                )
            )


def resolve_envs(work: dict, explicit, writer) -> dict:
    """framework -> interpreter; a framework without one has its runs recorded as failed."""
    pythons = {}
    for framework, configs in work.items():
        try:
            pythons[framework] = envs.resolve(framework, explicit, log=lambda m: print(m, file=sys.stderr))
        except BNCompareError as exc:
            print(f"[{framework}] skipped: {exc}", file=sys.stderr)
            writer.end_unfinished(framework, configs, "failed", error_type=type(exc).__name__, message=str(exc))
            continue
        print(f"[{framework}] {pythons[framework]}", file=sys.stderr)
    return pythons


def execute(
    runner, work: dict, explicit, run_dir, data_dir, verify, writer, signals, options: dict | None = None
) -> dict:
    """Resolve each framework's interpreter and run its configurations (work: framework -> configs) on the
    executor; after a signal, every unfinished run is recorded as interrupted. Returns framework ->
    interpreter."""
    pythons = {}
    try:
        if runner.resolves_on_nodes:
            pythons.update({fw: None for fw in work})
        else:
            pythons.update(resolve_envs({fw: configs for fw, configs in work.items() if configs}, explicit, writer))
        tasks = [
            task
            for fw, configs in work.items()
            if fw in pythons
            for task in split_into_tasks(fw, pythons[fw], configs, runner.jobs, options)
        ]
        runner.run(tasks, run_dir, data_dir, verify, writer, signals)
        if signals.signum is not None:
            raise Interrupted(signals.signum)
    except Interrupted as exc:
        signals.ignore()
        writer.progress.mute()  # the records and the report first: nothing may wait on the terminal now
        name = signal.Signals(exc.signum).name
        for framework, configs in work.items():
            writer.end_unfinished(framework, configs, "interrupted", message=f"stopped by {name}")
    finally:
        signals.ignore()
        writer.close()
    return pythons


class Job:
    """One command's workers from start to report: the records file, the progress display, the tracker and the
    signal handling that compare.run and compare.study share. `run` executes the work and calls `finish`
    (which writes environment.json and builds the report) before the executor shuts down, whatever happens;
    `exit_status` ends the tracker and says how the command ends."""

    def __init__(self, out_dir: Path, live: bool, total: int, tracker=None, **progress):
        from .execution.executor import Signals
        from .execution.progress import Progress

        self.progress = Progress(live=live, total=total, **progress)
        self.tracker = tracker
        self.writer = RecordWriter(Path(out_dir) / "records.jsonl", self.progress, tracker)
        self.signals = Signals(on_signal=self.progress.mute)

    def run(self, runner, work: dict, explicit, out_dir, data_dir, verify, options: dict, finish):
        """execute(...), then finish(pythons, started, interrupted signal name or None): its result."""
        import time

        started = time.time()
        try:
            pythons = execute(runner, work, explicit, out_dir, data_dir, verify, self.writer, self.signals, options)
            return finish(pythons, started, self.signal_name)
        finally:
            self.signals.restore()
            runner.shutdown()

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signals.signum).name if self.signals.signum else None

    def exit_status(self, interrupted_note: str) -> int:
        """After the report: end the tracker (a slow one never holds the files up); 128 + the signal after an
        interruption (saying interrupted_note), 1 where a run ended in error, else 0."""
        if self.tracker is not None:
            self.tracker.finish(interrupted=self.signals.signum is not None)
        if self.signals.signum is not None:
            print(f"\ninterrupted by {self.signal_name}: {interrupted_note}", file=sys.stderr)
            return 128 + self.signals.signum
        return 1 if self.progress.errors else 0


def build(run_dir, reference: str | None = None) -> tuple:
    """(Re)build every table, plot and report.md in run_dir. Returns (the summary as Markdown, the number
    of usable records)."""
    # imported here: a command checks its report packages before anything runs (extras.require_reporting), so
    # importing a command must not need pandas or matplotlib first
    from .reporting.files import atomic
    from .reporting.markdown import SUMMARY_COLUMNS, markdown_table, render_markdown
    from .reporting.plots import draw
    from .reporting.tables import load, write_tables

    run_dir = Path(run_dir)
    t, env, problems, usable = load(run_dir, reference)
    written = write_tables(t, run_dir)
    plots = draw(t, run_dir)
    text = render_markdown(t, env, plots, written + plots, problems)
    atomic(run_dir / "report.md", lambda p: p.write_text(text))
    return markdown_table(t["summary"], SUMMARY_COLUMNS), usable
