"""python -m compare.study NAME|FILE: answer one of the textbook's BN questions with many seeded runs.

The study file (studies/NAME.toml; see compare.studies.spec) gives the question,
the grid and how to answer it. Every cell (grid point x variant x seed x
framework) runs through the same workers and loop as compare.run, into
<out>/<name>/<run-id>/records.jsonl, with its grid coordinates in its plan
record; then the tables (the run's, plus the coordinates as columns), study.csv,
study.md and study.png are built from the records.

Started again with the same --run-id, a study runs only the cells that have no
result (complete or diverged) and keeps everything already measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common.data import find_data_dir
from common.errors import BNCompareError, ConfigError
from common.registry import FRAMEWORKS, parse_frameworks

from . import HelpFormatter
from .execution import choose, extras
from .execution.executor import default_jobs
from .job import Job, check_run_dir, environment_record, parse_pythons, parse_seeds, plan_records
from .reporting import files, tables, tracking
from .reporting.plots import save, trace_figures
from .studies import analysis, answers, render, spec, summary


def build_parser() -> argparse.ArgumentParser:
    shipped = ", ".join(spec.shipped())
    p = argparse.ArgumentParser(
        prog="python -m compare.study",
        description=f"Run a study: a grid of seeded configurations on each framework, answered with "
        f"statistics over seeds. Shipped studies: {shipped}.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("study", nargs="?", help="a shipped study's name or a study file (.toml)")
    p.add_argument("--list", action="store_true", help="list the shipped studies and their questions")
    p.add_argument("--frameworks", help=f"comma-separated, from {', '.join(FRAMEWORKS)} (default: the file's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the file's)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the study file's [quick] budget: the smallest that still answers the question",
    )
    choose.add_arguments(p, default_jobs())
    tracking.add_argument(p)
    p.add_argument("--out", default="reports/studies", help="the study goes to OUT/NAME/RUN_ID/")
    p.add_argument("--run-id", help="default: UTC time stamp; an existing one is resumed")
    p.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="FW=PATH",
        help="interpreter for a framework (repeatable), as for compare.run",
    )
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST files (as for compare.run)")
    p.add_argument("--no-verify-data", action="store_true", help="accept IDX files that are not Fashion-MNIST")
    p.add_argument("--dry-run", action="store_true", help="print the cells and exit")
    p.add_argument("--no-progress", action="store_true", help="plain lines instead of live bars")
    return p


def _settings(study, args) -> dict:
    frameworks = parse_frameworks(args.frameworks) if args.frameworks else study.frameworks
    seeds = parse_seeds(args.seeds) if args.seeds else study.seeds
    return {
        "study": study.name,
        "file_text": study.text,
        "quick": bool(args.quick),
        "frameworks": list(frameworks),
        "seeds": list(seeds),
    }


def open_study_dir(out: str, name: str, run_id: str, settings: dict) -> tuple:
    """(study dir, resumed?). A new run id gets a new folder; an existing one must hold the same study
    file and budget (other frameworks or seeds add cells)."""
    study_dir = Path(out) / name / run_id
    saved = study_dir / "study.json"
    if not (study_dir / "records.jsonl").exists():
        check_run_dir(str(Path(out) / name), run_id)
        study_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(saved, settings)
        (study_dir / "study.toml").write_text(settings["file_text"])
        return study_dir, False
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"{study_dir} holds records but no readable study.json: it is not a study folder; pick another --run-id"
        ) from None
    if before.get("file_text") != settings["file_text"] or before.get("quick") != settings["quick"]:
        what = "--quick" if before.get("file_text") == settings["file_text"] else "the study file"
        raise ConfigError(
            f"{study_dir} was started with a different {what}; resuming it would mix two "
            f"studies. Start a new --run-id (or restore the file: {study_dir / 'study.toml'})"
        )
    files.write_json(
        saved,
        {
            **settings,
            "frameworks": list(dict.fromkeys(before["frameworks"] + settings["frameworks"])),
            "seeds": list(dict.fromkeys(before["seeds"] + settings["seeds"])),
        },
    )
    return study_dir, True


def finished_runs(study_dir: Path) -> set:
    """(framework, config_id) of every run whose latest attempt ended with a result."""
    if not (study_dir / "records.jsonl").is_file():
        return set()
    recs, _ = files.read_records(study_dir)
    return {
        (r["framework"], r["config_id"])
        for r in tables.latest_attempts(recs)
        if r["kind"] == "run_end" and r["status"] in analysis.DONE
    }


def work_left(study_dir: Path, frameworks, configs) -> dict:
    """framework -> the configurations still to run: those whose latest attempt has no result. A diverged
    run is a result and never runs again; an interrupted, crashed or failed one, or one with no end
    record (its runner was killed), runs again."""
    done = finished_runs(study_dir)
    return {fw: [c for c in configs if (fw, c.config_id) not in done] for fw in frameworks}


def budget(configs) -> str:
    c = configs[0]
    return (
        f"{c.epochs} epoch(s), {c.train_limit or 'all'} training / {c.test_limit or 'all'} test images, "
        f"batch {', '.join(str(b) for b in dict.fromkeys(x.batch_size for x in configs))}"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.list:
        for name in spec.shipped():
            print(f"{name:22} {spec.load(spec.STUDIES_DIR / f'{name}.toml').question}")
        return 0
    if not args.study:
        print(f"error: name a study (one of: {', '.join(spec.shipped())}) or a study file", file=sys.stderr)
        return 2
    run_id = args.run_id if args.run_id is not None else datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        plan = _plan(args, run_id)
        if args.dry_run:
            for config in plan["configs"]:
                print(config.config_id, config.model.variant, f"seed {config.seed}", plan["coords"][config.config_id])
            print(f"{len(plan['configs'])} configuration(s) x {len(plan['frameworks'])} framework(s); {plan['budget']}")
            return 0
        plan["runner"] = choose.make(
            args, plan["explicit"], plan["todo"], gpu=any(c.device == "gpu" for c in plan["configs"])
        )
    except (BNCompareError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        study_dir, resumed = open_study_dir(args.out, plan["study"].name, run_id, plan["settings"])
    except (BNCompareError, OSError) as exc:
        plan["runner"].shutdown()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _run(args, argv, plan, run_id, study_dir, resumed)


def _plan(args, run_id: str) -> dict:
    """Everything checked before a worker starts: the study and its cells, the frameworks' interpreters given,
    the data, what is left to run (all of it, for a new study), the tracker and the replicas' placement."""
    extras.require_reporting("compare.study")
    study = spec.load(spec.find(args.study))
    settings = _settings(study, args)
    configs, coords = study.cells(args.quick, settings["seeds"])
    plan = dict(
        study=study,
        settings=settings,
        frameworks=settings["frameworks"],
        configs=configs,
        coords=coords,
        explicit=parse_pythons(args.python),
        budget=budget(configs),
    )
    if args.dry_run:
        return plan
    study_dir = Path(args.out) / study.name / run_id
    plan["data_dir"] = str(find_data_dir(args.data_dir))
    plan["work"] = work_left(study_dir, settings["frameworks"], configs)  # all, if new
    plan["todo"] = sum(len(v) for v in plan["work"].values())
    plan["tracking_uri"] = None
    if args.mlflow is not None:
        tracking.require_mlflow()
        plan["tracking_uri"] = tracking.resolve_uri(args.mlflow, study_dir)
    plan["placement"] = choose.replica_nodes(args, settings["frameworks"], configs)
    return plan


def _run(args, argv, plan: dict, run_id: str, study_dir: Path, resumed: bool) -> int:
    """The study's runs on the executor, then environment.json (each start of a resumed study kept as a
    session) and the study's files."""
    study, runner, todo = plan["study"], plan["runner"], plan["todo"]
    total = len(plan["configs"]) * len(plan["frameworks"])
    print(
        f"study {study.name} ({run_id}): {total} run(s) = {len(plan['configs'])} cell(s) x "
        f"{len(plan['frameworks'])} framework(s); "
        + (f"resumed: {total - todo} already have a result, {todo} to run" if resumed else f"{todo} to run")
        + f"; {runner.describe()['jobs']} at once ({runner.name}) -> {study_dir}",
        file=sys.stderr,
    )
    labels = {cid: " ".join(f"{k}={analysis.num(v)}" for k, v in c.items()) for cid, c in plan["coords"].items()}
    tracker = (
        tracking.Tracker(plan["tracking_uri"], tracking.study_experiment(study.name, run_id), study_dir, "study")
        if plan["tracking_uri"]
        else None
    )
    live = not args.no_progress and sys.stderr.isatty()
    job = Job(study_dir, live, todo, tracker, labels=labels, epoch_lines=False, unit="run")
    for fw, mine in plan["work"].items():
        plan_records(job.writer, [fw], mine, plan["coords"])

    def finish(pythons, started, signal_name):
        env = environment_record(args, argv, plan["frameworks"], pythons, plan["data_dir"], started)
        session = {
            "command": " ".join(["python -m compare.study"] + list(argv)),
            "started": env["started"],
            "seconds": round(time.time() - started, 1),
            "runs_run": todo,
            **runner.describe(),
            "interrupted": signal_name is not None,
            "signal": signal_name,
        }
        before, _ = files.read_environment(study_dir) if resumed else ({}, None)
        sessions = before.get("sessions", []) + [session]  # each start of the study, in order
        env.update(
            session,
            run_id=run_id,
            study=study.name,
            quick=args.quick,
            seeds=plan["settings"]["seeds"],
            budget=plan["budget"],
            sessions=sessions,
            seconds=round(sum(s["seconds"] for s in sessions), 1),
        )
        files.write_json(study_dir / "environment.json", env)
        return build(study_dir, study)

    verify = not args.no_verify_data
    options = {"snapshots": "final", **plan["placement"]}
    answer = job.run(runner, plan["work"], plan["explicit"], study_dir, plan["data_dir"], verify, options, finish)
    print(f"\nstudy: {study_dir / 'study.md'}\n", file=sys.stderr)
    print("\n".join(f"- {s}" for s in answer), file=sys.stderr)
    return job.exit_status(f"run the same command with --run-id {run_id} to finish the cells without a result")


def build(study_dir: Path, study=None) -> list:
    """(Re)build the tables, study.csv/.parquet, study.png and study.md of a study folder from its records;
    returns the answer's sentences (compare.studies.summary: said once where frameworks and strata agree)."""
    study_dir = Path(study_dir)
    if study is None:
        study = spec.load(study_dir / "study.toml", name=json.loads((study_dir / "study.json").read_text())["study"])
    t, env, problems, _ = tables.load(study_dir)
    answer, frames = answers.analyse(t["runs"], study)
    said = summary.summarise(t["runs"], study, frames)
    written = tables.write_tables({**t, **frames}, study_dir)
    plots = render.plot(frames["study"], study, study_dir)
    if "trace_steps" in t:  # --trace-every: the percentile bands, ICS and landscape, the arms side by side
        plots += save(trace_figures(t["trace_layers"], t["trace_steps"]), study_dir)
    runs = t["runs"]
    unfinished = runs[runs.status != "complete"] if not runs.empty else runs
    retried = runs[runs.attempts > 1] if "attempts" in runs else runs.iloc[:0]
    text = render.render(
        study, said, answer, {**frames, "runs_retried": retried}, env, plots, written + plots, unfinished, problems
    )
    files.atomic(study_dir / "study.md", lambda p: p.write_text(text))
    return said.sentences


if __name__ == "__main__":
    sys.exit(main())
