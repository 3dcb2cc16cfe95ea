"""Mirror runs and studies into MLflow, from the records the orchestrator writes.

records.jsonl stays the source of truth; MLflow is a view of it that can be
rebuilt at any time (`python -m compare.report DIR --mlflow [URI]`). Logging
happens in the orchestrator only (never in a framework's environment, never in
a timed region), on a thread of its own fed by a queue, so a slow or absent
tracker never slows or stops training and never costs a record.

The mapping:
- one MLflow experiment per run folder (named by its run id) or study folder
  ("STUDY/RUN_ID"), holding one parent run that carries the report's files as
  artifacts (report.md or study.md, the CSV tables, the plots);
- one child run per suite run (framework x configuration): its parameters the
  whole RunConfig flattened (`model.decay`, ...) plus framework, version,
  device and execution; tags framework, variant, seed, config_id and a study's
  grid coordinates; per-epoch metrics with the epoch as the step; drift from
  the reference framework once the report is built;
- status: complete and diverged -> FINISHED with a `status` tag saying which,
  interrupted -> KILLED, crashed and failed -> FAILED with the error message.

A child run is found again by its tag `bn_compare.key` (framework/config_id):
a resumed study, a run the Ray executor tries again, or a rebuild replaces the
MLflow run of that suite run instead of adding another, so the tracker always
holds one MLflow run per suite run, with the latest attempt's metrics.

Without a URI the store is MLflow's own SQLite file in the folder
(`mlflow.db`, artifacts in `mlartifacts/`); `mlflow ui --backend-store-uri
sqlite:///DIR/mlflow.db` opens it. Each call to the tracker is tried
ATTEMPTS times; when one still fails the tracker is taken as down for this
session: nothing more is sent, the runs go on, and the closing warning names
what was not logged and how to fill it in from the folder.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path

from common.errors import ConfigError

from .files import NO_END

ATTEMPTS = 3
BACKOFF_SECONDS = (0.5, 1.5)  # between attempts
REQUEST_TIMEOUT_SECONDS = "10"  # MLflow's HTTP client: one request (its own default is 120 s)
DRAIN_SECONDS = 60  # at the end, how long the orchestrator waits for what is still queued
KEY_TAG = "bn_compare.key"
# MLflow 3's UI opens an experiment in its GenAI layout unless this tag says it is model training
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PARENT_KEY = "parent"
STATUS = {
    "complete": "FINISHED",
    "diverged": "FINISHED",
    "interrupted": "KILLED",
    "crashed": "FAILED",
    "failed": "FAILED",
}
DRIFT_METRICS = ("param_rel_l2", "running_stats_rel_l2", "probe_logit_max_abs", "probe_pred_agreement")
REPORT_FILES = ("report.md", "study.md", "environment.json", "study.toml")
# The epoch metrics a reader looks for first: logged under the records' own names, as every metric, and picked as
# the runs table's columns in the UI (docs/tracking.md says how; the UI keeps the choice per experiment)
HEADLINE = ("test_acc", "train_loss", "probe_disagreement", "pop_test_acc", "train_examples_per_s")
SKIP_EPOCH_FIELDS = (
    "kind",
    "schema",
    "framework",
    "variant",
    "seed",
    "config_id",
    "epoch",
    "snapshot",
    "step_losses",
    "bn_gap",
    "recalibrated",
)


def add_argument(group, what: str = "mirror the runs into MLflow as they happen") -> None:
    """--mlflow [URI] of compare.run, compare.study and compare.report."""
    group.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help=f"also {what}: a tracking server (http://HOST:PORT), or, without a URI, "
        f"$MLFLOW_TRACKING_URI or else an SQLite store in the report folder (docs/tracking.md)",
    )


def embedded_uri(folder: Path) -> str:
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def resolve_uri(value: str | None, folder: Path) -> str:
    """--mlflow's URI: the one given, else $MLFLOW_TRACKING_URI, else the embedded store in the folder."""
    uri = value or os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(folder)
    if not uri.startswith(("http://", "https://", "sqlite:///", "file:", "databricks")):
        raise ConfigError(
            f"--mlflow {uri!r}: give a tracking server (http://HOST:PORT), a store "
            f"(sqlite:///PATH.db), or nothing for the SQLite store in the report folder"
        )
    return uri


def require_mlflow() -> None:
    """MLflow in the orchestrator's environment, installed on first use (requirements/tracking.txt)."""
    from ..execution.extras import ensure

    ensure("mlflow")


def flatten(config: dict, prefix: str = "") -> dict:
    """A RunConfig dict as MLflow parameters: nested keys joined with '.', values as strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return out


def epoch_metrics(record: dict) -> dict:
    """Every finite number of an epoch record under its own name (test_acc, ...: the names of the records, the
    tables and the docs), and per BN layer its gaps (bn1.mean_gap, ...)."""
    out = {
        k: float(v)
        for k, v in record.items()
        if k not in SKIP_EPOCH_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    for gap in record.get("bn_gap") or []:
        for k, v in gap.items():
            if k != "layer" and isinstance(v, (int, float)) and math.isfinite(v):
                out[f"{gap['layer']}.{k}"] = float(v)
    return out


class Tracker:
    """Mirrors one run or study folder into MLflow. submit() never blocks; finish() waits (bounded)."""

    def __init__(self, uri: str, experiment: str, folder: Path, kind: str = "run", warn=None):
        require_mlflow()
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_SECONDS)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the attempts are ours, bounded
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment_name, self.folder, self.kind = uri, experiment, Path(folder), kind
        self.client = MlflowClient(tracking_uri=uri)
        self.warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
        self.down = None  # the error that took the tracker down
        self.lost = []  # what was not logged
        self.runs = {}  # key -> MLflow run id
        self.ended = set()  # keys whose end record was logged
        self.plans = {}  # key -> plan record
        self.experiment_id = self.parent_id = None
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="mlflow", daemon=True)
        self._thread.start()

    # the orchestrator's side ----------------------------------------------------------------------
    def submit(self, record: dict) -> None:
        self._queue.put(record)

    def finish(self, interrupted: bool) -> None:
        """After the report is written: drift metrics (drift.csv), the report's files on the parent run,
        the parent's status; then wait for the queue (at most DRAIN_SECONDS) and say what was not logged."""
        self._queue.put(("finish", interrupted))
        self._queue.put(None)
        self._thread.join(DRAIN_SECONDS)
        if self._thread.is_alive():
            self.lost.append(f"whatever was still queued after {DRAIN_SECONDS} s")
        if self.lost:
            self.warn(
                f"MLflow at {self.uri} did not take {len(self.lost)} item(s)"
                + (f" ({self.down})" if self.down else "")
                + ": "
                + "; ".join(self.lost[:5])
                + (f"; and {len(self.lost) - 5} more" if len(self.lost) > 5 else "")
                + f". records.jsonl has everything: fill the tracker with `python -m compare.report "
                f"{self.folder} --mlflow {self.uri}`"
            )

    # the tracker's thread ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            what = (
                f"{item.get('kind')} record of {item.get('framework')} {item.get('variant')} seed "
                f"{item.get('seed')}" + (f" epoch {item['epoch']}" if item.get("kind") == "epoch" else "")
                if isinstance(item, dict)
                else "the report's files and drift"
            )
            if self.down:
                self.lost.append(what)
                continue
            try:
                self._handle(item)
            except Exception as exc:  # the tracker's failure is never the run's
                self.down = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                self.lost.append(what)
                self.warn(
                    f"MLflow at {self.uri} failed {ATTEMPTS} times ({self.down}); the runs go on, "
                    f"nothing more is sent to it"
                )

    def _call(self, fn, *args, **kwargs):
        for attempt in range(ATTEMPTS):
            try:
                return fn(*args, **kwargs)
            except Exception:
                if attempt == ATTEMPTS - 1:
                    raise
                time.sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])

    def _handle(self, item) -> None:
        if isinstance(item, tuple):
            self._finish(item[1])
            return
        kind = item.get("kind")
        if kind not in ("plan", "run_start", "epoch", "run_end", "error"):
            return
        key = f"{item['framework']}/{item['config_id']}"
        if kind == "plan":
            self.plans[key] = item
            self._start(key, item)
            return
        run_id = self.runs.get(key) or self._start(key, self.plans.get(key) or item)
        if kind == "run_start":
            backend = item.get("backend") or {}
            self._params(
                run_id, {"framework": item["framework"], **{f"backend.{k}": str(v) for k, v in backend.items()}}
            )
        elif kind == "epoch":
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            metrics = [Metric(k, v, stamp, item["epoch"]) for k, v in epoch_metrics(item).items()]
            for i in range(0, len(metrics), 500):  # MLflow's batch limit is 1000
                self._call(self.client.log_batch, run_id, metrics=metrics[i : i + 500])
        else:
            status = item["status"]
            tags = {"status": status, "epochs_done": str(item.get("epochs_done", ""))}
            if item.get("message"):
                tags["message"] = str(item["message"])[:4000]
            if item.get("error_type"):
                tags["error_type"] = item["error_type"]
            self._end(key, run_id, status, tags)

    def _end(self, key: str, run_id: str, status: str, tags: dict) -> None:
        self._tags(run_id, tags)
        self._call(self.client.set_terminated, run_id, status=STATUS[status])
        self.ended.add(key)

    # MLflow objects ------------------------------------------------------------------------------------
    def _experiment(self) -> str:
        if self.experiment_id is None:
            found = self._call(self.client.get_experiment_by_name, self.experiment_name)
            if found is not None:
                self.experiment_id = found.experiment_id
            else:
                location = (self.folder / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite:") else None
                self.experiment_id = self._call(
                    self.client.create_experiment,
                    self.experiment_name,
                    artifact_location=location,
                    tags={
                        EXPERIMENT_KIND_TAG: MODEL_TRAINING,
                        "bn_compare.folder": str(self.folder.resolve()),
                        "bn_compare.kind": self.kind,
                    },
                )
        return self.experiment_id

    def _find(self, key: str):
        runs = self._call(
            self.client.search_runs, [self._experiment()], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=10
        )
        return list(runs)

    def _parent(self) -> str:
        if self.parent_id is None:
            found = self._find(PARENT_KEY)
            if found:
                self.parent_id = found[0].info.run_id
                self._call(self.client.update_run, self.parent_id, status="RUNNING")
            else:
                run = self._call(
                    self.client.create_run,
                    self._experiment(),
                    run_name=self.experiment_name,
                    tags={KEY_TAG: PARENT_KEY, "bn_compare.kind": self.kind},
                )
                self.parent_id = run.info.run_id
        return self.parent_id

    def _start(self, key: str, plan: dict) -> str:
        """The child run of a suite run, new: an earlier MLflow run of the same suite run (an attempt that
        a resume or a retry replaces, or a rebuild) is deleted first, so there is one per suite run."""
        parent = self._parent()
        for old in self._find(key):
            self._call(self.client.delete_run, old.info.run_id)
        coords = plan.get("coords") or {}
        name = f"{plan['framework']} {plan['variant']} seed {plan['seed']}" + "".join(
            f" {k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in coords.items()
        )
        tags = {
            KEY_TAG: key,
            "mlflow.parentRunId": parent,
            "framework": plan["framework"],
            "variant": plan["variant"],
            "seed": str(plan["seed"]),
            "config_id": plan["config_id"],
            "status": "running",
            **{f"coord.{k}": str(v) for k, v in coords.items()},
        }
        run = self._call(self.client.create_run, self._experiment(), run_name=name, tags=tags)
        self.runs[key] = run.info.run_id
        config = plan.get("config")
        if isinstance(config, dict):
            self._params(run.info.run_id, {"framework": plan["framework"], **flatten(config)})
        return run.info.run_id

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        have = self._call(self.client.get_run, run_id).data.params
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow's batch limit is 100 parameters
            self._call(self.client.log_batch, run_id, params=new[i : i + 100])

    def _tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _finish(self, interrupted: bool) -> None:
        from mlflow.entities import Metric

        for key, run_id in self.runs.items():  # no end record: the runner was killed (the reports say so too)
            if key not in self.ended:
                self._end(key, run_id, "interrupted", {"status": "interrupted", "message": NO_END})
        drift_csv = self.folder / "drift.csv"
        if drift_csv.is_file() and drift_csv.stat().st_size > 1:
            import pandas as pd

            drift = pd.read_csv(drift_csv)
            stamp = int(time.time() * 1000)
            for (fw, cid), group in drift.groupby(["framework", "config_id"]) if not drift.empty else []:
                key = f"{fw}/{cid}"
                run_id = self.runs.get(key) or next((r.info.run_id for r in self._find(key)), None)
                metrics = [
                    Metric(f"drift.{m}", float(row[m]), stamp, int(row["epoch"]))
                    for _, row in group.iterrows()
                    for m in DRIFT_METRICS
                    if m in row and isinstance(row[m], (int, float)) and math.isfinite(row[m])
                ]
                if run_id and metrics:
                    self._call(self.client.log_batch, run_id, metrics=metrics)
        parent = self._parent()
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and (path.suffix in (".csv", ".png") or path.name in REPORT_FILES):
                self._call(self.client.log_artifact, parent, str(path))
        self._call(self.client.set_terminated, parent, status="KILLED" if interrupted else "FINISHED")


def study_experiment(study: str, run_id: str) -> str:
    """A study's experiment: "STUDY study RUN_ID", whole in MLflow's breadcrumb (which cuts a name at '/')."""
    return f"{study} study {run_id}"


def experiment_name(folder: Path) -> tuple:
    """(experiment name, kind) of a run or study folder: its run id, or study_experiment's."""
    folder = Path(folder)
    saved = folder / "study.json"
    if saved.is_file():
        try:
            return study_experiment(json.loads(saved.read_text())["study"], folder.name), "study"
        except (OSError, ValueError, KeyError):
            pass
    return folder.name, "run"


def rebuild(folder: Path, uri: str | None, interrupted: bool) -> Tracker:
    """Mirror a folder's records.jsonl (each run's latest attempt) and its report into MLflow, replacing
    what the tracker held of them."""
    from .files import read_records
    from .tables import latest_attempts

    name, kind = experiment_name(folder)
    tracker = Tracker(resolve_uri(uri, folder), name, folder, kind)
    records, _ = read_records(folder)
    for record in latest_attempts(records):
        tracker.submit(record)
    tracker.finish(interrupted)
    return tracker
