"""Measured figures that the guides quote, generated from committed records, so that prose cannot drift.

docs/measured/NAME/ holds what one run wrote that its figures come from: records.jsonl and environment.json
(the snapshots are left out: no quoted figure needs them). excerpt.md beside them is generated from them:

    .tox/run/bin/python -m compare.reporting.excerpt docs/measured/NAME

A guide quotes from it inside `<!-- measured: NAME -->` ... `<!-- /measured -->`, and tests/test_docs.py
fails when excerpt.md is not what its records give, or when a number in such a passage is not in excerpt.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .files import atomic
from .markdown import fmt
from .tables import load


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _span(values: list, digits: int, unit: str = "") -> str:
    low, high = (f"{v:.{digits}f}" for v in (min(values), max(values)))
    return f"{low}{unit}" if low == high else f"{low}-{high}{unit}"


def excerpt(folder: Path) -> str:
    """excerpt.md of a measured folder: its command, a table of the final epoch per framework and variant
    (accuracy and train/eval disagreement with the running average and with population statistics), and the
    ranges the guides quote, each computed here."""
    t, env, _, _ = load(Path(folder))
    s = t["summary"]
    command = env.get("command", "?").replace("python -m compare.run", "tox -e run --")
    lines = [
        f"Measured with `{command}` on {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores); "
        f"{int(s.epochs.max())} epochs, seed {', '.join(map(str, sorted(set(t['runs'].seed))))}; final epoch:",
        "",
        "| framework | variant | test acc, running average | with population statistics | "
        "train/eval disagreement | with population statistics |",
        "|---|---|---|---|---|---|",
    ]
    costs, lags = [], []
    for _, row in s.iterrows():
        pop = row.get("final_pop_test_acc")
        lines.append(
            f"| {row.framework} | {row.variant} | {fmt(row.final_test_acc, 'final_test_acc')} | "
            f"{fmt(pop, 'final_pop_test_acc') or 'n/a'} | {_percent(row.final_probe_disagreement)} | "
            + (_percent(row.final_pop_probe_disagreement) if not np.isnan(pop) else "n/a")
            + " |"
        )
        if not np.isnan(pop) and row.final_probe_disagreement > 0:
            costs.append(100 * row.final_pop_gain)
            lags.append(100 * (1 - row.final_pop_probe_disagreement / row.final_probe_disagreement))
    if costs:
        lines += [
            "",
            f"With population statistics in place of the running average, test accuracy rises by "
            f"{_span(costs, 1)} points, and {_span(lags, 0, '%')} of the train/eval disagreement on the probe "
            f"images goes away: that share is the running average's lag, the rest batch noise.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    folders = sys.argv[1:] if argv is None else argv
    for folder in folders:
        text = excerpt(Path(folder))
        atomic(Path(folder) / "excerpt.md", lambda p: p.write_text(text))
        print(f"{folder}/excerpt.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
