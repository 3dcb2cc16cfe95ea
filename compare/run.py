"""python -m compare.run: run identical seeded configurations on each framework.

Each framework runs as a worker subprocess in its own environment; records
stream back as JSON lines and are appended to <out>/<run-id>/records.jsonl as
they arrive, then the reports are built from them (compare.report).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common.config import (
    DTYPES,
    VARIANTS,
    ModelSpec,
    RunConfig,
)
from common.data import find_data_dir
from common.errors import BNCompareError, ConfigError
from common.precision import MIXED_PRECISIONS, PRECISIONS, dtype_and_mixed
from common.registry import FRAMEWORKS, parse_frameworks

from . import HelpFormatter, options
from .execution import choose, extras
from .job import (
    Job,
    build,
    check_run_dir,
    environment_record,
    parse_list,
    parse_pythons,
    parse_seeds,
    plan_records,
)
from .reporting import tracking

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"epochs": 2, "train_limit": 6000, "test_limit": 2000}
# the chapter's settings by edition (docs/answers.md, "Which edition"): classic is the defaults, the MXNet original
# of the chapter and its earlier PyTorch port (lr 1.0, batch 256, 10 epochs); online is the chapter on d2l.ai today
# (PyTorch: BNLeNetScratch(lr=0.1), batch 128, 10 epochs). Both: sigmoid, plain SGD, BN after every layer.
PRESETS = {
    "classic": {"lr": 1.0, "batch_size": 256, "epochs": 10},
    "online": {"lr": 0.1, "batch_size": 128, "epochs": 10},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compare.run",
        description="Train BN-LeNet with identical seeds, weights and batches on each framework "
        "and write accuracy, throughput and train/eval divergence reports.",
        formatter_class=HelpFormatter,
    )
    d = RunConfig()
    g = p.add_argument_group("what to run")
    g.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated, from: {', '.join(FRAMEWORKS)}")
    g.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="scratch = our BN; builtin = the framework's BN set to the same decay/eps; "
        "builtin-defaults = the framework's BN as constructed by default; none = no BN",
    )
    g.add_argument("--seeds", default=str(d.seed), help="comma-separated seeds, e.g. 0,1,2")
    g.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK['epochs']} epochs on {QUICK['train_limit']} training and "
        f"{QUICK['test_limit']} test images (explicit options still win)",
    )
    g.add_argument(
        "--preset",
        choices=PRESETS,
        default="classic",
        help="the chapter's edition: classic = lr 1.0, batch 256 (the MXNet original and its PyTorch port, the "
        "defaults); online = lr 0.1, batch 128 (the chapter on d2l.ai today); 10 epochs each; --quick and explicit "
        "options still win",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--dtype", choices=DTYPES, default=None, help=f"the same as --precision {'/'.join(DTYPES)} (default {d.dtype})"
    )
    g.add_argument(
        "--precision",
        default=None,
        help="comma-separated: " + ", ".join(PRECISIONS) + " (default float32); mixed-bfloat16 is each "
        "framework's own mixed-precision mechanism, and brings float32 runs of the same seeds "
        "beside it for the report's comparison",
    )
    later = {k: f"{v} with --quick" for k, v in QUICK.items()}
    defaults = RunConfig()
    for key, value in PRESETS["online"].items():  # where the edition changes the default
        if value != getattr(defaults, key):
            later[key] = f"{later[key] + ', ' if key in later else ''}{value} with --preset online"
    options.add_options(g, RunConfig, later=later)
    options.add_options(p.add_argument_group("model (BN-LeNet)"), ModelSpec)
    g = p.add_argument_group("data, environments, output")
    g.add_argument(
        "--data-dir",
        help="folder with the four Fashion-MNIST *-ubyte(.gz) files "
        "(default: $FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument(
        "--no-verify-data",
        action="store_true",
        help="accept IDX files that are not the official Fashion-MNIST (the report says so)",
    )
    g.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="FW=PATH",
        help="interpreter for a framework (repeatable); default: this Python if it has the "
        "framework, else its tox env, created on demand",
    )
    g.add_argument("--reference", help="framework the drift is measured against (default: the first)")
    g.add_argument("--out", default="reports", help="reports go to OUT/RUN_ID/")
    g.add_argument("--run-id", help="the report's folder name (default: the UTC time stamp)")
    choose.add_arguments(g, 1)
    tracking.add_argument(g)
    g.add_argument("--no-progress", action="store_true", help="one line per epoch instead of live bars")
    return p


def precisions_from_args(args) -> list:
    """--precision's list (--dtype alone: that one); mixed-bfloat16 brings float32 along, first: the report
    sets each mixed run beside the float32 run of the same seed, initial weights and batches."""
    if args.precision is None:
        return [args.dtype or RunConfig.dtype]
    if args.dtype is not None:
        raise ConfigError(
            f"--dtype {args.dtype} and --precision {args.precision} both given; --precision replaces "
            f"--dtype (--precision {args.dtype})"
        )
    precisions = list(parse_list(args.precision, "precision", PRECISIONS))
    if any(p in MIXED_PRECISIONS for p in precisions) and "float32" not in precisions:
        precisions.insert(0, "float32")
    return precisions


def configs_from_args(args) -> list:
    """One RunConfig per variant, precision and seed; every other field from its option (compare.options), the
    learning rate, batch and epochs from --preset, epochs and the limits from --quick, where not given."""
    variants = parse_list(args.variants, "variant", VARIANTS)
    precisions = precisions_from_args(args)
    model = options.values(args, ModelSpec, parse_list)
    run = {**PRESETS[args.preset], **(QUICK if args.quick else {}), **options.values(args, RunConfig, parse_list)}
    out = []
    for variant in variants:
        spec = ModelSpec(variant=variant, **model)
        for precision, seed in ((p, s) for p in precisions for s in parse_seeds(args.seeds)):
            dtype, mixed = dtype_and_mixed(precision)
            out.append(RunConfig(model=spec, seed=seed, dtype=dtype, mixed=mixed, **run))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    run_id = args.run_id if args.run_id is not None else datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        extras.require_reporting()
        frameworks = parse_frameworks(args.frameworks)
        configs = configs_from_args(args)
        explicit = parse_pythons(args.python)
        reference = args.reference or frameworks[0]
        if reference not in frameworks:
            raise ConfigError(f"--reference {reference} is not among --frameworks {','.join(frameworks)}")
        data_dir = str(find_data_dir(args.data_dir))
        run_dir = check_run_dir(args.out, run_id)
        tracking_uri = None
        if args.mlflow is not None:
            tracking.require_mlflow()
            tracking_uri = tracking.resolve_uri(args.mlflow, run_dir)
        placement = choose.replica_nodes(args, frameworks, configs)
        runner = choose.make(
            args, explicit, len(configs) * len(frameworks), gpu=any(c.device == "gpu" for c in configs)
        )
    except (BNCompareError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        runner.shutdown()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"bn-compare run {run_id}: {len(configs)} configuration(s) x {len(frameworks)} framework(s) -> {run_dir}",
        file=sys.stderr,
    )
    tracker = tracking.Tracker(tracking_uri, run_id, run_dir, "run") if tracking_uri else None
    job = Job(run_dir, not args.no_progress and sys.stderr.isatty(), len(configs) * len(frameworks), tracker)
    # more than one precision: each run's is a coordinate, so the tables keep them apart
    coords = (
        {c.config_id: {"precision": c.precision} for c in configs} if len({c.precision for c in configs}) > 1 else None
    )
    plan_records(job.writer, frameworks, configs, coords)

    def finish(pythons, started, signal_name):
        from .reporting.files import write_json

        env_record = environment_record(args, argv, frameworks, pythons, data_dir, started)
        env_record.update(
            reference=reference,
            run_id=run_id,
            seconds=round(time.time() - started, 1),
            interrupted=signal_name is not None,
            **runner.describe(),
            signal=signal_name,
        )
        write_json(run_dir / "environment.json", env_record)
        return build(run_dir)[0]

    work = {fw: configs for fw in frameworks}
    summary = job.run(runner, work, explicit, run_dir, data_dir, not args.no_verify_data, placement, finish)
    print(f"\nreport: {run_dir / 'report.md'}", file=sys.stderr)
    print(summary, file=sys.stderr)
    return job.exit_status("what was measured is in the report; unfinished runs are marked interrupted")


if __name__ == "__main__":
    sys.exit(main())
