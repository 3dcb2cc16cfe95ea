"""python -m compare.port: trained models moved between frameworks, and what a port costs or gains.

Takes the trained snapshots of a run folder (or trains them first: a `compare.run` of the given frameworks and
variants, in a folder of its own) and loads each one elsewhere, in eval mode on the test set, against the model
in its own framework:

- **ports**: every model into every other framework's scratch and built-in model (the canonical arrays, laid
  out by each backend): test accuracy at the source and the target, the largest logit difference, prediction
  agreement. In float64 a port is exact; in float32 it agrees as the frameworks' float32 does.
- **mistakes**: each plausible mistake of a port (common.port.MISTAKES: the target's default epsilon, fc1 in the
  other flatten order, the running variance "corrected", gamma ignored, train mode, the momentum convention
  followed by one epoch of fine-tuning) applied on purpose to each built-in model ported into each other
  framework's built-in model, against the right port.
- **onnx**: each model exported with its framework's own exporter (Backend.export_onnx), checked with
  onnx.checker and run in ONNX Runtime with its graph optimisations off and on, against the model in its own
  framework; what each normalisation became in the graph; a model an exporter refuses, with the reason.
- **fold**: each BN folded into the layer before it (common.fold, the textbook's equivalent transformation), in
  the same framework, with inference examples/s of both, measured alternately in one worker.

Writes OUT/RUN_ID/port.md, port.json, fold.csv, ports.csv, mistakes.csv and onnx.csv (the exported models in onnx/).
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

from common import onnx
from common.config import DTYPES, RunConfig
from common.data import find_data_dir, load_fashion_mnist
from common.errors import BNCompareError, ConfigError, in_words
from common.fold import fold, folded_spec
from common.port import MISTAKES, WRONG_DECAY, apply
from common.registry import FRAMEWORKS, ONNX_IMPORTER, parse_frameworks

from . import HelpFormatter
from .execution import envs, extras
from .execution.executor import ROOT, start_worker, worker_records
from .job import check_run_dir, cpu_name, parse_list, parse_pythons
from .reporting import ports
from .reporting.files import atomic, write_json
from .reporting.markdown import markdown_table

VARIANTS = ("scratch", "builtin", "builtin-defaults")
TARGETS = ("scratch", "builtin")  # the models a port loads into


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
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="when it trains: compare.run's --dtype")
    p.add_argument(
        "--mistakes",
        default=",".join(MISTAKES),
        help="comma-separated, from: " + ", ".join(MISTAKES) + "; none: the ports and folds only",
    )
    p.add_argument(
        "--no-onnx", action="store_true", help="no ONNX export (default: each model exported and run in ONNX Runtime)"
    )
    p.add_argument("--opset", type=int, help="the ONNX opset every exporter writes (default: each exporter's own)")
    p.add_argument(
        "--onnx-import",
        nargs="?",
        const="tox",
        metavar="PYTHON",
        help="also bring each ONNX export back into PyTorch with onnx2torch, in PYTHON (default: the tox env "
        "onnx-import, created on first use: a CUDA build of PyTorch, about 5.6 GB)",
    )
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
        "--dtype",
        args.dtype,
        *(["--no-verify-data"] if args.no_verify_data else []),
        *[f"--python={p}" for p in args.python],
    ]
    print(f"training the models to port: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code not in (0, 1):  # 1: a framework failed, and its rows say so; the others port
        raise BNCompareError(f"training the models failed (compare.run exit {code}); see its output above")
    return port_dir / "run"


def load_params(path) -> dict:
    with np.load(path) as arrays:
        return {k[len("param/") :]: arrays[k] for k in arrays.files if k.startswith("param/")}


def save_params(path: Path, params: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"param/{k}": v for k, v in params.items()})
    return str(path)


def fold_tasks(model: dict, params_dir: Path) -> tuple:
    """(tasks for the model's framework, None) to evaluate the model and its folded network, timed, or ([], the
    reason it does not fold) with the model's own evaluation alone."""
    config = RunConfig.from_dict(model["config"])
    name = ports.own_name(model)
    own = {"name": name, "params": model["snapshot"], "config": config.to_dict(), "time": True}
    try:
        target = folded_spec(config.model)
    except ConfigError as exc:
        return [{**own, "time": False}], str(exc)
    folded = fold(load_params(model["snapshot"]), config.model, model["epsilon"] or config.model.epsilon)
    return [
        own,
        {
            "name": f"{name}_folded",
            "params": save_params(params_dir / f"{name}_folded.npz", folded),
            "config": replace(config, model=target).to_dict(),
            "time": True,
        },
    ], None


def port_tasks(model: dict, framework: str) -> list:
    """The model loaded into framework's scratch and built-in models (not into itself: that is its own
    evaluation)."""
    config = RunConfig.from_dict(model["config"])
    return [
        {
            "name": ports.port_name(model, framework, variant),
            "params": model["snapshot"],
            "config": replace(config, model=replace(config.model, variant=variant)).to_dict(),
        }
        for variant in TARGETS
        if (framework, variant) != (model["framework"], model["variant"])
    ]


def mistake_tasks(model: dict, framework: str, mistakes, params_dir: Path) -> list:
    """A built-in model ported into framework's built-in model with each of the given mistakes (common.port), and
    for the momentum mistake the right port fine-tuned for one epoch (what it is compared with)."""
    config = RunConfig.from_dict(model["config"])
    into = replace(config, model=replace(config.model, variant="builtin"))
    params = load_params(model["snapshot"])
    base = ports.port_name(model, framework, "builtin")
    tasks = []
    for mistake in mistakes:
        task = {"name": f"{base}_{mistake}", "params": model["snapshot"], "config": into.to_dict()}
        if mistake in ("flatten", "variance", "gamma"):
            task["params"] = save_params(params_dir / f"{base}_{mistake}.npz", apply(mistake, params, into))
        elif mistake == "epsilon":
            task["epsilon"] = "default"
        elif mistake == "train-mode":
            task["mode"] = "train"
        elif mistake == "momentum":
            task.update(finetune=True, config=into.replace(model=replace(into.model, decay=WRONG_DECAY)).to_dict())
            right = {"name": f"{base}_finetuned", "params": model["snapshot"], "config": into.to_dict()}
            tasks.append({**right, "finetune": True})
        tasks.append(task)
    return tasks


def import_onnx(python: str, models: list, results: dict, port_dir: Path, data_dir: str, verify: bool) -> bool:
    """--onnx-import: every ONNX export brought back into PyTorch by onnx2torch in its own worker; its result joins
    the export's ("imported": the logits' file, or the error). True where the importer's env could not run."""
    files = []
    for model in models:
        result = results.get(f"{ports.own_name(model)}_onnx", {})
        record = result.get("onnx", {})
        if record.get("path"):
            spec = RunConfig.from_dict(model["config"]).model
            files.append(
                {
                    "name": result["name"],
                    "path": record["path"],
                    "layout": record["layout"],
                    "input_size": spec.input_size,
                    "image_size": spec.image_size,
                    "count": len(ports.logits(port_dir, result)),
                }
            )
    try:
        explicit = {} if python == "tox" else {"onnx2torch": python}
        python = envs.resolve("onnx2torch", explicit, log=lambda m: print(m, file=sys.stderr), info=ONNX_IMPORTER)
    except BNCompareError as exc:
        print(f"[onnx2torch] skipped: {exc}", file=sys.stderr)
        return True
    print(f"[onnx2torch] {len(files)} ONNX model(s) back into PyTorch", file=sys.stderr)
    job = {"mode": "onnx_import", "out": str(port_dir), "files": files, "data_dir": data_dir, "verify": verify}
    for r in run_framework("onnx2torch", python, job):
        if r.get("kind") == "onnx_import":
            results[r["name"]]["imported"] = r
    missing = [f["name"] for f in files if "imported" not in results[f["name"]]]
    for name in missing:  # the worker failed (its log is on stderr): said in the table, and in the exit status
        results[name]["imported"] = {"error": "the onnx2torch worker gave no result"}
    return bool(missing)


def onnx_rows(models: list, results: dict, port_dir: Path, data_dir: str, verify: bool) -> list:
    """port.json's ONNX rows: each model's export (its worker's "port_onnx" record) checked and run in ONNX Runtime
    on the test set, graph optimisations off and on, against the model's own eval-mode logits; a model not exported
    has its reason. The test images are read here, as the workers read them (common.data)."""
    rows, images = [], {}
    for model in models:
        result = results.get(f"{ports.own_name(model)}_onnx", {})
        if result.get("error") or "onnx" not in result:
            continue  # its evaluation failed, and the command's exit status says so
        record = result["onnx"]
        row = {k: model[k] for k in ("framework", "variant", "seed", "epoch")}
        if record.get("error"):
            rows.append({**row, "exported": False, "why": record["error"]})
            continue
        config = RunConfig.from_dict(model["config"])
        key = (config.model.input_size, config.model.image_size)
        if key not in images:
            images[key] = load_fashion_mnist(data_dir, verify=verify, input_size=key[0], image_size=key[1])
        own = ports.logits(port_dir, result)
        test = images[key]
        path = str(port_dir / record["path"])
        row.update(
            opset=onnx.opset(path),
            layers=len(config.model.norm_positions),
            exported=True,
            file=record["path"],
            exporter=record["exporter"],
            checker=onnx.check(path),
            test_acc=result["test_acc"],
        )
        for level, optimize in (("plain", False), ("optimized", True)):
            try:
                logits, ops = onnx.run(path, test.test_images[: len(own)], record["layout"], optimize)
            except Exception as exc:  # ONNX Runtime's own words: the model does not run there
                row[f"{level}_error"] = in_words(exc)
                continue
            distance = ports.logit_distance(own, logits)
            row.update(
                {
                    f"{level}_test_acc": float(np.mean(logits.argmax(axis=1) == test.test_labels[: len(own)])),
                    f"{level}_max_logit_diff": distance["max_logit_diff"],
                    f"{level}_agreement": distance["agreement"],
                    f"{level}_ops": ops,
                }
            )
        imported = result.get("imported")
        if imported and imported.get("error"):
            row["import_error"] = imported["error"]
        elif imported:
            distance = ports.logit_distance(own, ports.logits(port_dir, imported))
            row.update(importer=imported["importer"], **{f"torch_{k}": v for k, v in distance.items()})
        rows.append(row)
    return rows


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
        mistakes = () if args.mistakes == "none" else parse_list(args.mistakes, "mistake", MISTAKES)
        explicit = parse_pythons(args.python)
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
        if args.opset is not None and args.opset < 7:
            raise ConfigError(f"--opset must be an ONNX opset, 7 or later, got {args.opset}")
        if args.run_dir and not (Path(args.run_dir) / "records.jsonl").is_file():
            raise ConfigError(f"{args.run_dir} holds no records.jsonl: give a compare.run folder, or none to train")
        data_dir = str(find_data_dir(args.data_dir))
        port_dir = check_run_dir(args.out, run_id)
        if not args.no_onnx:
            extras.ensure("onnxruntime")
        elif args.onnx_import:
            raise ConfigError("--onnx-import brings the ONNX exports back into PyTorch: drop --no-onnx")
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
    results, refused, not_ported, failed = evaluate(args, frameworks, models, mistakes, explicit, data_dir, port_dir)
    if args.onnx_import:
        failed |= import_onnx(args.onnx_import, models, results, port_dir, data_dir, not args.no_verify_data)
    inside = run_dir.resolve().is_relative_to(port_dir.resolve())  # trained here: said relative to the port
    source = os.path.relpath(run_dir, port_dir) if inside else str(run_dir)
    data = {
        "machine": {
            "command": " ".join(["python -m compare.port"] + list(argv if argv is not None else sys.argv[1:])),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "source": source,
        "dtype": RunConfig.from_dict(models[0]["config"]).dtype,
        **ports.compare(models, results, port_dir, frameworks),
        "onnx": [] if args.no_onnx else onnx_rows(models, results, port_dir, data_dir, not args.no_verify_data),
        "refused": refused,
        "not_ported": not_ported,
    }
    write_json(port_dir / "port.json", data)
    tables = {"fold": ports.fold_table(data["fold"]), "ports": ports.port_table(data["ports"])}
    tables["mistakes"] = ports.mistake_table(data["mistakes"])
    tables["onnx"] = ports.onnx_table(data["onnx"])
    for name, table in tables.items():
        atomic(port_dir / f"{name}.csv", lambda p, table=table: table.to_csv(p, index=False))
    text = ports.render(data)
    atomic(port_dir / "port.md", lambda p: p.write_text(text))
    print(markdown_table(tables["fold"]) if not tables["fold"].empty else "nothing folded", file=sys.stderr)
    for lines in (ports.port_markdown(tables["ports"], data["dtype"]), ports.onnx_markdown(tables["onnx"])):
        print("\n" + "\n".join(lines), file=sys.stderr)
    print(f"\nreport: {port_dir / 'port.md'}", file=sys.stderr)
    return 1 if failed or any(r.get("error") and not r.get("refused") for r in results.values()) else 0


def evaluate(args, frameworks, models: list, mistakes, explicit, data_dir: str, port_dir: Path) -> tuple:
    """Every framework's tasks in one worker each: (results by task name, the models that do not fold and why,
    the ports a framework refused and why, whether a framework could not run)."""
    results, refused, not_ported, failed = {}, [], [], False
    for framework in frameworks:
        tasks = []
        for model in models:
            if model["framework"] == framework:
                more, why = fold_tasks(model, port_dir / "params")
                tasks += more
                if why:
                    refused.append({"framework": framework, "variant": model["variant"], "why": why})
                if not args.no_onnx:
                    tasks.append(
                        {**more[0], "name": f"{more[0]['name']}_onnx", "time": False, "onnx": True, "opset": args.opset}
                    )
            tasks += port_tasks(model, framework)
            if model["variant"] == "builtin":
                tasks += mistake_tasks(model, framework, mistakes, port_dir / "params")
        try:
            python = envs.resolve(framework, explicit, log=lambda m: print(m, file=sys.stderr))
        except BNCompareError as exc:
            print(f"[{framework}] skipped: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"[{framework}] {len(tasks)} evaluation(s); the folds timed {args.repeats} round(s)", file=sys.stderr)
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
        for r in got:
            if r.get("kind") == "port":
                results[r["name"]] = r
            elif r.get("kind") == "port_onnx":
                results[r["name"]]["onnx"] = r
            elif r.get("kind") == "port_time":
                results[r["name"]]["examples_per_s"] = r["examples_per_s"]
        for task in tasks:
            if task["name"] not in results:
                results[task["name"]] = {"name": task["name"], "error": "the worker gave no result"}
        for r in got:
            if r.get("kind") == "port" and r.get("error"):
                print(f"[{framework}] {r['name']}: {r['error']}", file=sys.stderr)
                if r.get("refused"):  # a model the framework cannot build (no built-in layer that fits, ...)
                    not_ported.append({"framework": framework, "task": r["name"], "why": r["error"]})
    return results, refused, not_ported, failed


if __name__ == "__main__":
    sys.exit(main())
