"""A study file (TOML): a question, a grid of configurations, and how to answer it.

    question = "How large can the learning rate go with and without BN?"
    about = "optional: more words, shown under the question"
    frameworks = ["torch", "mxnet", "tensorflow", "jax"]   # default: all
    variants = ["scratch", "none"]                  # default: ["scratch"]
    seeds = [0, 1, 2]                               # default: [0, 1, 2]
    exclude = [{ variant = "none", norm_noise = true }]   # optional: cells left out (variant and grid values)

    [base]      # fixed in every cell: any RunConfig / ModelSpec field
    activation = "relu"

    [grid]      # each field over a list of values; the cells are every combination
    lr = [0.1, 0.3, 1, 3, 10]

    [scale]     # a field that follows a grid field: lr = base lr x (batch_size / 256)
    lr = { with = "batch_size", reference = 256, rule = "linear" }   # or "sqrt"

    [quick]     # --quick: the smallest budget that still answers (fields; and quick.grid)
    epochs = 3
    train_limit = 12000

    [failure]   # a run fails if its loss became non-finite or its best test accuracy stays below
    min_best_test_acc = 0.5

    [answer]    # how the answer is computed: largest-stable (x), compare (axis, baseline, best, also), trend (x)
    kind = "largest-stable"
    x = "lr"
    metric = "best_test_acc"

    [plot]
    x = "lr"
    log_x = true
    metrics = ["best_test_acc", "final_train_loss"]

Every problem is a StudyError naming the file, the line where it can be found,
and the field.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from common.config import FIELD_NAMES, VARIANTS, ModelSpec, RunConfig, stored_as_fields
from common.errors import ConfigError
from common.registry import FRAMEWORKS

from ..reporting.metrics import RUN_METRICS, TRACE_METRICS

ROOT = Path(__file__).resolve().parents[2]  # the repository
STUDIES_DIR = ROOT / "studies"

RUN_FIELDS = tuple(f.name for f in fields(RunConfig) if f.name not in ("model", "seed"))
MODEL_FIELDS = tuple(f.name for f in fields(ModelSpec) if f.name != "variant")
FIELDS = RUN_FIELDS + MODEL_FIELDS

# Per-run metrics a study can answer with (the runs table's columns), and which way is better.
METRICS = {**RUN_METRICS, **TRACE_METRICS}
ANSWERS = ("largest-stable", "compare", "trend")
SCALE_RULES = {"linear": lambda r: r, "sqrt": math.sqrt}
TOP_KEYS = (
    "question",
    "about",
    "frameworks",
    "variants",
    "seeds",
    "exclude",
    "base",
    "grid",
    "scale",
    "quick",
    "failure",
    "answer",
    "plot",
)
QUICK_DEFAULT = {"epochs": 2, "train_limit": 6000, "test_limit": 2000}  # compare.run's --quick


class StudyError(ConfigError):
    pass


def shipped() -> list:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))


def find(name_or_path: str) -> Path:
    """A study file: a path to one, or the name of one in studies/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = STUDIES_DIR / f"{name_or_path}.toml"
    if candidate.is_file() and "/" not in name_or_path:
        return candidate
    raise StudyError(f"no study {name_or_path!r}: pass a study file or one of: {', '.join(shipped())}")


def num(value) -> str:
    """A coordinate or a figure as text: numbers by %g, the rest as they are."""
    return (
        f"{value:g}"
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        else str(value)
    )


def arm_label(axis, values) -> str:
    """An arm of a comparison: its values on the answer's axis, 'scratch, norm_noise=True'."""
    return ", ".join(f"{a}={num(v)}" if a not in ("framework", "variant") else str(v) for a, v in zip(axis, values))


def coord_value(value):
    """A grid value as a table cell: lists (norm_positions) become 'conv1,conv2'."""
    return ",".join(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    text: str
    question: str
    about: str
    frameworks: tuple
    variants: tuple
    seeds: tuple
    base: dict
    grid: dict  # field -> tuple of values, in file order
    scale: dict  # field -> {"with", "reference", "rule"}
    quick: dict  # field overrides under --quick
    quick_grid: dict
    failure: dict | None
    answer: dict
    plot: dict = field(default_factory=dict)
    exclude: tuple = ()  # of {variant or grid field: value}: a cell matching every item of one is left out

    @property
    def axes(self) -> tuple:
        """The columns that tell cells apart: the grid fields, then the scaled ones."""
        return tuple(self.grid) + tuple(self.scale)

    def cells(self, quick=False, seeds=None) -> tuple:
        """(configs, coords): every grid point x variant x seed as a RunConfig, and config_id -> the
        cell's coordinates (grid and scaled fields)."""
        base = {**self.base, **(self.quick if quick else {})}
        if quick and not self.quick:
            base.update(QUICK_DEFAULT)
        grid = {**self.grid, **(self.quick_grid if quick else {})}
        configs, coords = [], {}
        for point in itertools.product(*grid.values()):
            values = dict(zip(grid, point))
            scaled = {name: _scaled(rule, base, values) for name, rule in self.scale.items()}
            for variant in self.variants:
                cell = {"variant": variant, **{k: coord_value(v) for k, v in values.items()}}
                if any(all(cell.get(k) == v for k, v in rule.items()) for rule in self.exclude):
                    continue
                for seed in seeds or self.seeds:
                    config = build_config({**base, **values, **scaled}, variant, seed)
                    configs.append(config)
                    coords[config.config_id] = {k: coord_value(v) for k, v in {**values, **scaled}.items()}
        return configs, coords


def _scaled(rule: dict, base: dict, values: dict):
    default = (
        getattr(RunConfig(), rule["field"]) if rule["field"] in RUN_FIELDS else getattr(ModelSpec(), rule["field"])
    )
    start = base.get(rule["field"], default)
    value = start * SCALE_RULES[rule["rule"]](values[rule["with"]] / rule["reference"])
    return int(round(value)) if isinstance(default, int) else value  # an integer field stays one


def build_config(values: dict, variant: str, seed: int) -> RunConfig:
    """A cell's RunConfig from its values (a field may be spelled by its stored name: common.config.STORED_NAMES;
    the cell's coordinates keep the file's spelling, so a study written before a rename reads as it did)."""
    values = stored_as_fields(values)
    model = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    if "norm_positions" in model and isinstance(model["norm_positions"], str):
        model["norm_positions"] = tuple(p for p in model["norm_positions"].split(",") if p)
    run = {k: v for k, v in values.items() if k in RUN_FIELDS}
    return RunConfig(model=ModelSpec(variant=variant, **model), seed=seed, **run)


class _Reader:
    """Validation with positions: each error names the file, its line and the field."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def line(self, section: str | None, key: str | None = None) -> int | None:
        """The line of `key` in [section] (the top level when section is None), else of the section's
        header, else the first line that sets `key` anywhere; None if none."""
        headers = [
            (i, m.group(1).strip())
            for i, text in enumerate(self.lines, 1)
            if (m := re.match(r"^\s*\[([^\[\]]+)\]", text))
        ]
        bounds = [(0, None)] + headers
        key_re = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=") if key else None
        for n, (start, name) in enumerate(bounds):
            if name != section:
                continue
            stop = bounds[n + 1][0] if n + 1 < len(bounds) else len(self.lines) + 1
            if key_re:
                for i in range(start + 1, stop):
                    if key_re.match(self.lines[i - 1]):
                        return i
            return start or None
        if key_re:
            for i, line in enumerate(self.lines, 1):
                if key_re.match(line) or re.match(rf"^\s*{re.escape(section or '')}\.{re.escape(key)}\s*=", line):
                    return i
        return None

    def error(self, section, key, message) -> StudyError:
        number = self.line(section, key)
        where = f"{self.path}:{number}" if number else f"{self.path}"
        name = (f"[{section}] {key}" if section and key else f"[{section}]" if section else key) or ""
        return StudyError(f"{where}: {name + ': ' if name else ''}{message}")


def _known(reader, section, table, allowed) -> None:
    for key in table:
        if key not in allowed and FIELD_NAMES.get(key) not in allowed:
            raise reader.error(section, key, f"unknown field; choose from {', '.join(allowed)}")
        if FIELD_NAMES.get(key) in table:
            raise reader.error(section, key, f"is {FIELD_NAMES[key]}'s old name; give one of the two")


def _string_list(reader, data, key, choices, default) -> tuple:
    value = data.get(key, default)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise reader.error(None, key, "must be a non-empty list of names, e.g. " + repr(list(choices[:2])))
    bad = [v for v in value if v not in choices]
    if bad:
        raise reader.error(None, key, f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
    if len(set(value)) != len(value):
        raise reader.error(None, key, "lists a name twice")
    return tuple(value)


def _check_values(reader, section, values: dict, base: dict) -> None:
    """Each value must make a valid configuration on top of base."""
    for key, value in values.items():
        try:
            build_config({**base, key: value}, "scratch", 0)
        except (ConfigError, TypeError) as exc:
            raise reader.error(section, key, f"{value!r} is not valid: {exc}") from None


def load(path, name: str | None = None) -> Study:
    """The study in `path`, validated section by section; its name is the file's stem unless given."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML: {exc}") from None
    r = _Reader(path, text)
    _known(r, None, data, TOP_KEYS)
    question, frameworks, variants, seeds = _top(r, data)
    tables = {}
    for section in ("base", "grid", "scale", "quick", "failure", "answer", "plot"):
        tables[section] = data.get(section, {})
        if not isinstance(tables[section], dict):
            raise r.error(None, section, f"must be a table ([{section}])")
    base = tables["base"]
    _known(r, "base", base, FIELDS)
    _check_values(r, "base", base, {})
    grid = _grid(r, tables["grid"], base)
    scale = _scale(r, tables["scale"], grid)
    quick, quick_grid = _quick(r, tables["quick"], base, grid)
    failure = _failure(r, tables["failure"])
    axes = tuple(grid) + tuple(scale)
    answer = _answer(r, tables["answer"], grid, axes, failure, frameworks, variants)
    exclude = _exclude(r, data, grid, variants)
    _names(r, answer, grid, frameworks, variants)
    plot = _plot(r, tables["plot"], answer, axes)
    return Study(
        name=name or path.stem,
        path=path,
        text=text,
        question=question.strip(),
        about=str(data.get("about", "")).strip(),
        frameworks=frameworks,
        variants=variants,
        seeds=tuple(seeds),
        base=base,
        grid=grid,
        scale=scale,
        quick=quick,
        quick_grid=quick_grid,
        failure=failure,
        answer=answer,
        plot=plot,
        exclude=tuple({k: coord_value(v) for k, v in rule.items()} for rule in exclude),
    )


def _top(r, data) -> tuple:
    """(question, frameworks, variants, seeds): the file's top level."""
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise r.error(None, "question", 'every study states its question in words (question = "...")')
    frameworks = _string_list(r, data, "frameworks", FRAMEWORKS, list(FRAMEWORKS))
    variants = _string_list(r, data, "variants", VARIANTS, ["scratch"])
    seeds = data.get("seeds", [0, 1, 2])
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)
    ):
        raise r.error(None, "seeds", "must be a non-empty list of distinct integers >= 0, e.g. [0, 1, 2]")

    return question, frameworks, variants, seeds


def _grid(r, table: dict, base: dict) -> dict:
    """[grid]: each field over its values, each checked as a configuration takes it."""
    grid = {}
    _known(r, "grid", table, FIELDS)
    for key, values in table.items():
        if FIELD_NAMES.get(key, key) in {FIELD_NAMES.get(k, k) for k in base}:
            raise r.error("grid", key, "is also set in [base]; keep it in one place")
        if not isinstance(values, list) or not values:
            raise r.error("grid", key, "must be a non-empty list of values, e.g. [0.1, 1.0]")
        if len({repr(v) for v in values}) != len(values):
            raise r.error("grid", key, "lists a value twice")
        for value in values:
            _check_values(r, "grid", {key: value}, base)
        grid[key] = tuple(values)

    return grid


def _scale(r, table: dict, grid: dict) -> dict:
    """[scale]: the fields that follow a grid field by a rule."""
    scale = {}
    for key, rule in table.items():
        if key not in FIELDS:
            raise r.error("scale", key, f"unknown field; choose from {', '.join(FIELDS)}")
        if not isinstance(rule, dict) or set(rule) != {"with", "reference", "rule"}:
            raise r.error("scale", key, 'must be { with = "GRID FIELD", reference = NUMBER, rule = "linear" }')
        if rule["with"] not in grid or key in grid:
            raise r.error(
                "scale",
                key,
                f"'with' must name a [grid] field (not {key} itself); the grid has {', '.join(grid) or 'none'}",
            )
        if rule["rule"] not in SCALE_RULES:
            raise r.error("scale", key, f"rule {rule['rule']!r}: choose from {', '.join(SCALE_RULES)}")
        if (
            not isinstance(rule["reference"], (int, float))
            or isinstance(rule["reference"], bool)
            or rule["reference"] <= 0
        ):
            raise r.error("scale", key, "reference must be a positive number")
        scale[key] = {"field": key, **rule}

    return scale


def _quick(r, table: dict, base: dict, grid: dict) -> tuple:
    """([quick], [quick.grid]): the --quick budget's fields and grid values."""
    quick = dict(table)
    quick_grid = quick.pop("grid", {})
    _known(r, "quick", quick, FIELDS + ("grid",))
    _check_values(r, "quick", quick, base)
    if not isinstance(quick_grid, dict):
        raise r.error("quick", "grid", "must be a table ([quick.grid])")
    for key, values in quick_grid.items():
        if key not in grid:
            raise r.error("quick.grid", key, f"is not a [grid] field; the grid has {', '.join(grid) or 'none'}")
        if not isinstance(values, list) or not values:
            raise r.error("quick.grid", key, "must be a non-empty list of values")
        for value in values:
            _check_values(r, "quick.grid", {key: value}, base)
        quick_grid[key] = tuple(values)

    return quick, quick_grid


def _failure(r, table: dict):
    """[failure]: the threshold below which a run failed, or None."""
    failure = table or None
    if failure is not None:
        _known(r, "failure", failure, ("min_best_test_acc",))
        threshold = failure.get("min_best_test_acc")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
            raise r.error("failure", "min_best_test_acc", "must be a number in [0, 1]")

    return failure


def _answer(r, table: dict, grid: dict, axes: tuple, failure, frameworks, variants) -> dict:
    """[answer]: the kind, the metric and the further ones, x or the axis and its baseline, the names."""
    answer = dict(table)
    _known(r, "answer", answer, ("kind", "metric", "x", "axis", "baseline", "best", "also", "names"))
    names = answer.get("names", {})
    if not isinstance(names, dict) or not all(isinstance(v, str) and v for v in names.values()):
        raise r.error(
            "answer",
            "names",
            'is a table of words for arms and coordinates, e.g. { "variant=none" = "no BN", "activation=relu" = '
            '"ReLU" }',
        )
    answer["names"] = dict(names)
    also = answer.get("also", [])
    if "also" in answer and (
        answer.get("kind") != "compare" or not isinstance(also, list) or any(m not in METRICS for m in also)
    ):
        raise r.error(
            "answer",
            "also",
            f'is a list of further metrics to compare, for kind = "compare" only; choose from {", ".join(METRICS)}',
        )
    answer["also"] = tuple(also)
    if "best" in answer and (answer.get("kind") != "compare" or not isinstance(answer["best"], bool)):
        raise r.error(
            "answer",
            "best",
            'is true or false, and for kind = "compare" only (each arm against the '
            "best arm of its stratum, beside the comparisons)",
        )
    if answer.get("kind") not in ANSWERS:
        raise r.error("answer", "kind", f"choose from {', '.join(ANSWERS)}")
    answer.setdefault("metric", "best_test_acc")
    if answer["metric"] not in METRICS:
        raise r.error("answer", "metric", f"unknown metric {answer['metric']!r}; choose from {', '.join(METRICS)}")
    if answer["kind"] in ("largest-stable", "trend"):
        if answer.get("x") not in grid:
            raise r.error("answer", "x", f"must name a [grid] field; the grid has {', '.join(grid) or 'none'}")
        if answer["kind"] == "largest-stable" and failure is None:
            raise r.error("answer", "kind", "largest-stable needs a [failure] table (min_best_test_acc)")
    else:
        axis = answer.get("axis")
        axis = [axis] if isinstance(axis, str) else axis
        allowed = ("framework", "variant") + axes
        if not axis or not isinstance(axis, list) or any(a not in allowed for a in axis):
            raise r.error("answer", "axis", f"must name one or more of: {', '.join(allowed)}")
        answer["axis"] = tuple(axis)
        baseline = answer.get("baseline")
        if baseline is not None:
            if not isinstance(baseline, dict) and len(axis) == 1:
                baseline = {axis[0]: baseline}
            if not isinstance(baseline, dict) or set(baseline) != set(axis):
                raise r.error("answer", "baseline", f"must give a value for each of {', '.join(axis)}")
            options = {
                "framework": frameworks,
                "variant": variants,
                **{k: tuple(coord_value(v) for v in grid.get(k, ())) for k in grid},
            }
            for key, value in baseline.items():
                if key in options and coord_value(value) not in options[key]:
                    raise r.error("answer", "baseline", f"{key} = {value!r} is not among {list(options[key])}")
            answer["baseline"] = {k: coord_value(baseline[k]) for k in axis}

    return answer


def _exclude(r, data: dict, grid: dict, variants) -> list:
    """exclude: the cells left out, each rule naming variants and grid values that exist."""
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise r.error(None, "exclude", 'must be a list of tables, e.g. [{ variant = "none", norm_noise = true }]')
    options = {"variant": variants, **{k: tuple(coord_value(v) for v in grid[k]) for k in grid}}
    for rule in exclude:
        for key, value in rule.items():
            if key not in options:
                raise r.error(None, "exclude", f"{key!r} is neither 'variant' nor a [grid] field")
            if coord_value(value) not in options[key]:
                raise r.error(None, "exclude", f"{key} = {value!r} is not among {list(options[key])}")

    return exclude


def _names(r, answer: dict, grid: dict, frameworks, variants) -> None:
    """[answer] names: every key names an arm of the comparison or a coordinate of the grid."""
    axis = answer.get("axis", ())
    known = {f"{k}={num(coord_value(v))}" for k in grid for v in grid[k]}
    known |= {f"variant={v}" for v in variants}
    if answer["kind"] == "compare":
        values = [variants if a == "variant" else frameworks if a == "framework" else grid.get(a, ()) for a in axis]
        for combo in itertools.product(*values):
            coords = dict(zip(axis, (coord_value(v) for v in combo)))
            if coords.get("variant") == "none" and "norm" in coords:  # no normalisation: its norm is "none"
                coords["norm"] = "none"
            known.add(arm_label(axis, list(coords.values())))
    unknown = sorted(set(answer["names"]) - known)
    if unknown:
        raise r.error(
            "answer", "names", f"{', '.join(map(repr, unknown))} names no arm or coordinate; they are: {sorted(known)}"
        )


def _plot(r, table: dict, answer: dict, axes: tuple) -> dict:
    """[plot]: x, a log x axis or not, and the metrics drawn."""
    plot = dict(table)
    _known(r, "plot", plot, ("x", "log_x", "metrics"))
    plot.setdefault("x", answer.get("x") or (answer.get("axis") or (None,))[0])
    plot.setdefault("log_x", False)
    plot.setdefault("metrics", [answer["metric"]])
    if not isinstance(plot["log_x"], bool):
        raise r.error("plot", "log_x", "must be true or false")
    if not isinstance(plot["metrics"], list) or not plot["metrics"] or any(m not in METRICS for m in plot["metrics"]):
        raise r.error("plot", "metrics", f"must be a non-empty list from: {', '.join(METRICS)}")
    if plot["x"] is not None and plot["x"] not in ("framework", "variant") + axes:
        raise r.error("plot", "x", "must name a grid field, 'framework' or 'variant'")
    return plot
