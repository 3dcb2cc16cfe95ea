"""python -m compare.report DIR: rebuild a run's (or a study's) tables, plots and report.md from its records.

It reads records.jsonl, environment.json and the snapshots in DIR and writes everything again
(compare.reporting: tables, Markdown, plots); with --mlflow it also fills or rebuilds MLflow from them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import ConfigError

from .job import build
from .reporting.files import read_environment


def build_parser() -> argparse.ArgumentParser:
    from . import HelpFormatter
    from .reporting import tracking

    p = argparse.ArgumentParser(
        prog="python -m compare.report",
        formatter_class=HelpFormatter,
        description="Rebuild the tables, plots and report.md of a run from its records.",
    )
    p.add_argument("run_dir", help="a run's (or study's) folder, with its records.jsonl")
    p.add_argument("--reference", help="framework the drift is measured against (default: the run's own)")
    tracking.add_argument(p, "fill (or rebuild) MLflow from the folder's records")
    return p


def main(argv=None) -> int:
    from .reporting import tracking

    args = build_parser().parse_args(argv)
    try:
        if args.mlflow is not None:
            tracking.require_mlflow()
            uri = tracking.resolve_uri(args.mlflow, Path(args.run_dir))
        summary, usable = build(args.run_dir, args.reference)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.mlflow is not None and usable:
        env, _ = read_environment(Path(args.run_dir))
        tracker = tracking.rebuild(Path(args.run_dir), uri, bool(env.get("interrupted")))
        print(
            f"mlflow: {tracker.uri}, experiment {tracker.experiment_name!r}"
            + (" (incomplete: see the warning above)" if tracker.lost else ""),
            file=sys.stderr,
        )
    print(summary)
    print(f"report: {Path(args.run_dir) / 'report.md'}", file=sys.stderr)
    if not usable:
        print("error: no usable record in records.jsonl; the report is empty", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
