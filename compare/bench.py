"""python -m compare.bench: the suite's loop against a bare loop and a textbook loop, side by side.

For each framework, one worker runs the matrix norm x variant x execution x
batch size, one cell at a time. In each cell it runs, alternating and in the same
process, one epoch of each of three loops with the same model, parameters,
batch size and data: the suite (common.loop through the framework's backend),
the bare loop (frameworks/<fw>/bare.py: the fastest plain loop a practitioner
would write, no host read inside the epoch) and the textbook loop
(frameworks/<fw>/textbook.py: the loop a reader of the textbook would write).
suite/bare is the harness overhead; suite/textbook what the suite gains over
the textbook's way. Frameworks run one after another, never at once.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from common import records
from common.config import EXECUTIONS, NORM_BACKWARDS, VARIANTS, ModelSpec
from common.data import find_data_dir
from common.errors import BNCompareError, ConfigError
from common.norms import NORMS
from common.registry import FRAMEWORKS, parse_frameworks

from . import HelpFormatter
from .execution import envs
from .execution.executor import start_worker, worker_records
from .job import cpu_name, parse_list, parse_pythons
from .reporting.benchmark import COLUMNS, line, plot, render, row
from .reporting.files import atomic, write_json
from .reporting.layer import COLUMNS as LAYER_COLUMNS
from .reporting.layer import layer_line, layer_row, render_layers, scratch_over_builtin


def _batch_sizes(text: str) -> list:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 2 for b in sizes):
        raise ConfigError(f"--batch-sizes takes integers >= 2 separated by commas (e.g. 64,256,1024), got {text!r}")
    return list(dict.fromkeys(sizes))


def bench_framework(framework: str, python: str, job: dict, emit) -> tuple:
    """Run one framework's worker; emit(row) per finished cell. Returns (the worker's exit code, the number
    of cells it skipped: a mode the framework does not have, said on stderr)."""
    skipped = 0
    with tempfile.TemporaryFile("w+") as log:
        proc = start_worker(python, job, log, None)
        try:
            for record in worker_records(proc, log):
                if record.get("kind") in ("bench", "layer"):
                    emit(record)
                elif record.get("kind") in ("bench_repeat", "bench_skipped"):
                    skipped += record["kind"] == "bench_skipped"
                    print(f"  {record['message']}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # Ctrl-C: the worker, in a session of its own, got none; stop it too
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # tox forwards a second SIGINT: wait for the worker anyway
            proc.terminate()
            raise
        finally:
            code = proc.wait()
        if code != 0:
            log.seek(0)
            print(f"[{framework}] benchmark failed (exit {code}):\n{log.read()[-3000:]}", file=sys.stderr)
    return code, skipped


def each_framework(frameworks, explicit, job: dict, emit, rows: list, header: str, rows_per_cell: int = 1) -> int:
    """Each framework's worker over the job's cells in turn (job: all but the framework), saying `header` first;
    emit adds to rows (rows_per_cell per finished cell). 1 where a framework has no interpreter, its worker failed
    or a cell neither finished nor was skipped, else 0."""
    status = 0
    for framework in frameworks:
        python = _python(framework, explicit)
        if python is None:
            status = 1
            continue
        print(f"[{framework}] {header}", file=sys.stderr, flush=True)
        before = len(rows)
        code, skipped = bench_framework(framework, python, {**job, "framework": framework}, emit)
        if code != 0 or len(rows) - before + rows_per_cell * skipped < rows_per_cell * len(job["cells"]):
            status = 1
    return status


def _python(framework: str, explicit: dict) -> str | None:
    """The framework's interpreter (compare.execution.envs), or None where it has none, said on stderr."""
    try:
        return envs.resolve(framework, explicit, log=lambda m: print(m, file=sys.stderr))
    except BNCompareError as exc:
        print(f"[{framework}] skipped: {exc}", file=sys.stderr)
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compare.bench", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated, from: " + ", ".join(FRAMEWORKS))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument(
        "--norms",
        default="batch",
        help="comma-separated normalisations (compare.run --norm): "
        + ", ".join(NORMS)
        + "; instance runs after the convolutions only (conv1, conv2)",
    )
    p.add_argument(
        "--executions",
        default="default",
        help="comma-separated: " + ", ".join(EXECUTIONS) + " (each framework's meaning in docs/benchmark.md)",
    )
    p.add_argument("--batch-sizes", default="256", help="comma-separated, e.g. 64,256,1024,4096")
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="epochs of each loop per cell, alternating; at least 6 for a 95%% interval on the ratios",
    )
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (0 = all 60,000)")
    p.add_argument(
        "--image-size",
        type=int,
        default=28,
        help="the images resized to S x S (compare.run --image-size; 96 is the textbook's second configuration)",
    )
    p.add_argument(
        "--population-size",
        type=int,
        default=0,
        help="also measure the population pass (compare.run --population-size; runs default to 2048) in a "
        "fourth loop per repeat, against an epoch without it; 0 = not measured",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "gpu", "auto"),
        help="where every loop runs (as compare.run --device)",
    )
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST files (as for compare.run)")
    p.add_argument("--no-verify-data", action="store_true", help="accept IDX files that are not Fashion-MNIST")
    p.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="FW=PATH",
        help="interpreter for a framework (repeatable), as for compare.run",
    )
    p.add_argument(
        "--norm-backward",
        default="autodiff",
        choices=NORM_BACKWARDS,
        help="the scratch BN layer's backward (compare.run --norm-backward): autodiff, or closed-form (PyTorch, "
        "TensorFlow and JAX)",
    )
    p.add_argument(
        "--layer",
        action="store_true",
        help="time the normalisation layer alone (forward and backward, training mode, on bn1's and bn2's inputs "
        "at --image-size and each batch size) against a STREAM triad: layer.md, .csv, .json (docs/benchmark.md)",
    )
    p.add_argument("--out", help="write bench.md, .csv, .json and .png here (default reports/bench/<UTC time>)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        frameworks = parse_frameworks(args.frameworks)
        variants = parse_list(args.variants, "variant", VARIANTS)
        norms = parse_list(args.norms, "normalisation", NORMS)
        executions = parse_list(args.executions, "execution", EXECUTIONS)
        batch_sizes = _batch_sizes(args.batch_sizes)
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
        if args.train_limit and args.train_limit < 6 * max(batch_sizes):  # the 5 warm-up steps and one timed step
            raise ConfigError(
                f"--train-limit {args.train_limit} leaves no timed step at batch size {max(batch_sizes)}; "
                f"raise it to at least 6 x the largest batch size, or use 0 (all)"
            )
        if args.population_size < 0 or 0 < args.population_size < max(batch_sizes):
            raise ConfigError(
                f"--population-size {args.population_size} holds no batch of {max(batch_sizes)} images: give at "
                "least the largest batch size, or 0 (not measured)"
            )
        if args.layer and "none" in variants:
            raise ConfigError("--layer times the normalisation layer, and --variants none has none: leave it out")
        ModelSpec(image_size=args.image_size)  # a size without a feature map is refused here, naming the smallest
        explicit = parse_pythons(args.python)
        data_dir = None if args.layer else str(find_data_dir(args.data_dir))  # the layers take random inputs
    except BNCompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc)
    out = Path(args.out or Path("reports") / "bench" / started.strftime("%Y%m%d-%H%M%S"))
    machine = {
        "command": " ".join(["python -m compare.bench"] + list(argv if argv is not None else sys.argv[1:])),
        "started": started.isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    cells = [
        {"norm": n, "variant": v, "execution": e, "batch_size": b}
        for n in norms
        for v in variants
        for e in executions
        for b in batch_sizes
    ]
    if args.layer:
        return layers(args, frameworks, cells, explicit, out, machine)
    rows, measured, loops = [], [], {}

    def emit(record):
        r = row(record)
        rows.append(r)
        measured.append(record)
        loops.update({(record["framework"], loop): record[loop] for loop in ("bare", "textbook")})
        print(line(r), flush=True)

    each = "4 loops (the fourth with the population pass)" if args.population_size else "3 loops"
    status = each_framework(
        frameworks,
        explicit,
        {
            "mode": "bench",
            "cells": cells,
            "repeats": args.repeats,
            "train_limit": args.train_limit,
            "image_size": args.image_size,
            "population_size": args.population_size,
            "norm_backward": args.norm_backward,
            "device": args.device,
            "data_dir": data_dir,
            "verify": not args.no_verify_data,
        },
        emit,
        rows,
        f"{len(cells)} cell(s) x {each} x {args.repeats} repeats",
    )
    if not rows:
        print("error: no benchmark cell finished; nothing written", file=sys.stderr)
        return 1
    frame = pd.DataFrame(rows)[COLUMNS]
    out.mkdir(parents=True, exist_ok=True)
    atomic(out / "bench.csv", lambda path: frame.to_csv(path, index=False))
    rows = records.clean(rows)  # NaN (no interval) as null
    # measured: each cell's per-repeat figures, from which the rows are computed again (compare.reporting.excerpt)
    write_json(out / "bench.json", {"machine": machine, "rows": rows, "measured": records.clean(measured)})
    text = render(frame, machine, loops, args)
    plot(frame, out / "bench.png")
    atomic(out / "bench.md", lambda path: path.write_text(text + "\n![throughput against batch size](bench.png)\n"))
    if args.json:
        write_json(Path(args.json), rows)
    print(f"written: {out}/bench.md, bench.csv, bench.json, bench.png", file=sys.stderr)
    return status


def layers(args, frameworks, cells: list, explicit, out: Path, machine: dict) -> int:
    """--layer: each framework's worker times its cells' layers and the triads (compare.execution.worker.layer);
    the rows, the scratch against built-in pairs and the report (compare.reporting.layer)."""
    rows, measured = [], []

    def emit(record):
        rows.append(layer_row(record))
        measured.append(record)
        print(layer_line(rows[-1]), flush=True)

    job = {
        "mode": "layer",
        "cells": cells,
        "repeats": args.repeats,
        "train_limit": 0,
        "image_size": args.image_size,
        "norm_backward": args.norm_backward,
        "device": args.device,
    }
    header = f"{len(cells)} cell(s) x 2 layers, {args.repeats} rounds"
    status = each_framework(frameworks, explicit, job, emit, rows, header, rows_per_cell=2)
    if not rows:
        print("error: no layer was timed; nothing written", file=sys.stderr)
        return 1
    frame = pd.DataFrame(rows)
    ratios = scratch_over_builtin(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic(out / "layer.csv", lambda path: frame[LAYER_COLUMNS].to_csv(path, index=False))
    write_json(out / "layer.json", {"machine": machine, "measured": records.clean(measured)})
    text = render_layers(frame, ratios, machine)
    atomic(out / "layer.md", lambda path: path.write_text(text))
    print(f"written: {out}/layer.md, layer.csv, layer.json", file=sys.stderr)
    return status


def interruptible(argv=None) -> int:
    """main, with Ctrl-C (SIGINT) ending the benchmark cleanly: its worker stopped and waited for, exit 130, and
    nothing written (a benchmark's files are written once every framework has finished)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("compare.bench: interrupted; its worker is stopped and nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(interruptible())
