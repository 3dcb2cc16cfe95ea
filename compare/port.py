"""python -m compare.port: trained models moved, and what that costs or gains.

Takes the trained snapshots of a run folder (or trains them first: a `compare.run` of the given frameworks and
variants, in a folder of its own) and loads each one elsewhere. Today: each BN folded into the layer before it
(common.fold, the textbook's equivalent transformation) and run in the same framework, against the model itself:
test accuracy, the largest logit difference, prediction agreement, and inference examples/s of both, measured
alternately in one worker. Writes OUT/RUN_ID/port.md, port.json and fold.csv.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.data import find_data_dir
from common.errors import BNCompareError, ConfigError
from common.fold import fold, folded_spec
from common.registry import FRAMEWORKS, parse_frameworks

from . import HelpFormatter
from .execution import envs, extras
from .execution.executor import ROOT, start_worker, worker_records
from .job import check_run_dir, cpu_name, parse_list, parse_pythons
from .reporting import ports
from .reporting.files import atomic, write_json
from .reporting.markdown import markdown_table

VARIANTS = ("scratch", "builtin", "builtin-defaults")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compare.port", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "run_dir",
        nargs="?",
        help="a compare.run folder whose snapshots to take (default: train the models first, as --frameworks, "
        "--variants and --quick say)",
    )
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated, from: " + ", ".join(FRAMEWORKS))
    p.add_argument("--variants", default="scratch,builtin", help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--epoch", type=int, help="the snapshot of this epoch (default: each run's last)")
    p.add_argument("--quick", action="store_true", help="when it trains: compare.run's --quick budget")
    p.add_argument("--repeats", type=int, default=7, help="rounds of timed inference per model (alternating)")
    p.add_argument("--data-dir", help="Fashion-MNIST's folder (default: as compare.run finds it)")
    p.add_argument("--no-verify-data", action="store_true", help="accept IDX files that are not the official ones")
    p.add_argument("--python", action="append", default=[], metavar="FW=PATH", help="interpreter for a framework")
    p.add_argument("--out", default="reports", help="the port goes to OUT/RUN_ID/")
    p.add_argument("--run-id", help="its folder name (default: port- and the UTC time stamp)")
    return p


def train(args, port_dir: Path, frameworks, variants, data_dir: str) -> Path:
    """A compare.run of the models to port, in port_dir/run (a process of its own: commands import no command)."""
    command = [
        sys.executable,
        "-m",
        "compare.run",
        "--frameworks",
        ",".join(frameworks),
        "--variants",
        ",".join(variants),
        "--out",
        str(port_dir),
        "--run-id",
        "run",
        "--data-dir",
        data_dir,
        "--no-progress",
        *(["--quick"] if args.quick else []),
        *(["--no-verify-data"] if args.no_verify_data else []),
        *[f"--python={p}" for p in args.python],
    ]
    print(f"training the models to port: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code not in (0, 1):  # 1: a framework failed, and its rows say so; the others port
        raise BNCompareError(f"training the models failed (compare.run exit {code}); see its output above")
    return port_dir / "run"


def fold_tasks(model: dict, params_dir: Path) -> tuple:
    """(tasks for the model's framework, None) to evaluate the model and its folded network, or ([], the reason it
    does not fold)."""
    config = RunConfig.from_dict(model["config"])
    spec = config.model
    try:
        target = folded_spec(spec)
    except ConfigError as exc:
        return [], str(exc)
    with np.load(model["snapshot"]) as arrays:
        params = {k[len("param/") :]: arrays[k] for k in arrays.files if k.startswith("param/")}
    name = f"{model['variant']}_s{model['seed']}"
    folded = params_dir / f"{model['framework']}_{name}_folded.npz"
    folded.parent.mkdir(parents=True, exist_ok=True)
    np.savez(folded, **{f"param/{k}": v for k, v in fold(params, spec, model["epsilon"] or spec.epsilon).items()})
    evaluated = config.to_dict()
    return [
        {"name": name, "params": model["snapshot"], "config": evaluated, "time": True},
        {
            "name": f"{name}_folded",
            "params": str(folded),
            "config": replace(config, model=target).to_dict(),
            "time": True,
        },
    ], None


def run_framework(framework: str, python: str, job: dict) -> list:
    """One framework's port worker: its records (a failed worker: none, and its log on stderr)."""
    got = []
    with tempfile.TemporaryFile("w+") as log:
        proc = start_worker(python, job, log, None)
        try:
            got = list(worker_records(proc, log))
        finally:
            code = proc.wait()
        if code != 0:
            log.seek(0)
            print(f"[{framework}] port worker failed (exit {code}):\n{log.read()[-3000:]}", file=sys.stderr)
    return got


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run_id = args.run_id or "port-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        extras.require_reporting("compare.port")
        frameworks = parse_frameworks(args.frameworks)
        variants = parse_list(args.variants, "variant", VARIANTS)
        explicit = parse_pythons(args.python)
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
        if args.run_dir and not (Path(args.run_dir) / "records.jsonl").is_file():
            raise ConfigError(f"{args.run_dir} holds no records.jsonl: give a compare.run folder, or none to train")
        data_dir = str(find_data_dir(args.data_dir))
        port_dir = check_run_dir(args.out, run_id)
    except (BNCompareError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port_dir.mkdir(parents=True, exist_ok=True)
    try:
        run_dir = Path(args.run_dir) if args.run_dir else train(args, port_dir, frameworks, variants, data_dir)
    except BNCompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    models = [
        m
        for m in ports.trained_models(run_dir, args.epoch)
        if m["framework"] in frameworks and m["variant"] in variants
    ]
    if not models:
        print(f"error: {run_dir} has no complete run of {', '.join(variants)} with a snapshot to port", file=sys.stderr)
        return 1
    fold_rows, refused, status = [], [], 0
    dtype = RunConfig.from_dict(models[0]["config"]).dtype
    for framework in frameworks:
        mine = [m for m in models if m["framework"] == framework]
        tasks = []
        for model in mine:
            more, why = fold_tasks(model, port_dir / "params")
            tasks += more
            if why:
                refused.append({"framework": framework, "variant": model["variant"], "why": why})
        if not tasks:
            continue
        try:
            python = envs.resolve(framework, explicit, log=lambda m: print(m, file=sys.stderr))
        except BNCompareError as exc:
            print(f"[{framework}] skipped: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"[{framework}] {len(tasks)} evaluation(s), {args.repeats} timed round(s) each", file=sys.stderr)
        job = {
            "mode": "port",
            "framework": framework,
            "out": str(port_dir),
            "tasks": tasks,
            "repeats": args.repeats,
            "data_dir": data_dir,
            "verify": not args.no_verify_data,
        }
        got = run_framework(framework, python, job)
        results = {r["name"]: r for r in got if r.get("kind") == "port"}
        times = {r["name"]: r["examples_per_s"] for r in got if r.get("kind") == "port_time"}
        for model in mine:
            name = f"{model['variant']}_s{model['seed']}"
            own, folded = results.get(name), results.get(f"{name}_folded")
            if not own or not folded or "error" in own or "error" in folded:
                errors = [r["error"] for r in (own, folded) if r and "error" in r] or ["the worker gave no result"]
                if any(r["framework"] == framework and r["variant"] == model["variant"] for r in refused):
                    continue
                print(f"[{framework}] {model['variant']}: {'; '.join(errors)}", file=sys.stderr)
                refused.append({"framework": framework, "variant": model["variant"], "why": "; ".join(errors)})
                status = 1
                continue
            with np.load(port_dir / own["logits"]) as a, np.load(port_dir / folded["logits"]) as b:
                distance = ports.logit_distance(a["logits"], b["logits"])
            fold_rows.append(
                {
                    "framework": framework,
                    "variant": model["variant"],
                    "seed": model["seed"],
                    "epoch": model["epoch"],
                    "test_acc": own["test_acc"],
                    "folded_test_acc": folded["test_acc"],
                    **distance,
                    "examples_per_s": times.get(name, []),
                    "folded_examples_per_s": times.get(f"{name}_folded", []),
                    "execution": own.get("execution"),
                }
            )
    data = {
        "machine": {
            "command": " ".join(["python -m compare.port"] + list(argv if argv is not None else sys.argv[1:])),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "source": str(run_dir),
        "dtype": dtype,
        "fold": fold_rows,
        "refused": refused,
    }
    write_json(port_dir / "port.json", data)
    table = ports.fold_table(fold_rows)
    atomic(port_dir / "fold.csv", lambda p: table.to_csv(p, index=False))
    text = ports.render(data)
    atomic(port_dir / "port.md", lambda p: p.write_text(text))
    print(markdown_table(table) if not table.empty else "nothing folded", file=sys.stderr)
    print(f"\nreport: {port_dir / 'port.md'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
