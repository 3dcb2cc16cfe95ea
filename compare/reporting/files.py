"""The files of a run or study folder: written whole or not at all, and read without trusting them.

records.jsonl is appended to as records arrive (a crash loses nothing) and read back line by line, a bad
line skipped and named, never fatal; environment.json and every table, plot and Markdown file are written
atomically (a .part file renamed into place), so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from common import records as records_schema

# the detail of a run whose records end without a run_end or error record
NO_END = "no end record: the runner stopped before it could write one"


def atomic(path: Path, write) -> None:
    """write(tmp) then rename tmp to path: path is the old file or the whole new one, never half of one."""
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj) -> None:
    atomic(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def read_records(run_dir: Path) -> tuple:
    """(records, skipped): every usable record of records.jsonl, and (line number, reason) for each
    line that could not be used. A bad line never stops the report."""
    path = Path(run_dir) / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a bn-compare run directory?")
    out, skipped = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append((number, "not UTF-8 text"))
            continue
        except json.JSONDecodeError:
            skipped.append((number, "not valid JSON (a line cut by a crash?)"))
            continue
        why = records_schema.problem(record)
        if why:
            skipped.append((number, why))
        else:
            out.append(record)
    for number, why in skipped:
        print(f"warning: {path}:{number}: {why}; skipped", file=sys.stderr)
    return out, skipped


def read_environment(run_dir: Path) -> tuple:
    """(environment dict, problem or None): a missing or corrupt environment.json is reported, not fatal."""
    path = Path(run_dir) / "environment.json"
    if not path.is_file():
        return {}, f"{path.name} is missing (the runner was stopped before writing it?)"
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path.name} is corrupt ({exc}); the tables are built without it"
    if not isinstance(env, dict):
        return {}, f"{path.name} holds a JSON {type(env).__name__}, not an object; the tables are built without it"
    return env, None
