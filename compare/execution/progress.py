"""Progress of a run or a study: tqdm bars on a terminal, plain lines otherwise.

Live (a terminal): one bar for the whole job (runs ended / planned, failures,
elapsed and ETA) and one bar per running worker (the steps of its current
epoch). Always: a permanent line per finished epoch and per run that did not
complete; without a terminal, also one line per ended run with the counts and
the ETA, so a log shows how far a long study is.
"""

from __future__ import annotations

import sys
import time

PROBLEMS = ("diverged", "interrupted", "crashed", "failed")


class Progress:
    def __init__(
        self,
        live: bool,
        total: int = 0,
        stream=sys.stderr,
        labels: dict | None = None,
        epoch_lines: bool = True,
        unit: str = "run",
    ):
        """total: runs planned (framework x configuration); labels: config_id -> text shown after
        the seed (a study's grid coordinates); epoch_lines: a line per finished epoch."""
        self.live, self.stream, self.total = live, stream, total
        self.labels, self.epoch_lines, self.unit = labels or {}, epoch_lines, unit
        self.errors = 0
        self.ended = 0
        self.muted = False
        self.counts = {}
        self._started = time.monotonic()
        self._bars = {}
        self._overall = None
        if live:  # imported here: a command checks its report packages, tqdm among them, before anything runs
            from tqdm import tqdm  # (compare.execution.extras.require_reporting), so importing it must not fail

            self._tqdm = tqdm
        if live and total:
            self._overall = self._tqdm(
                total=total, desc="all", unit=unit, file=stream, position=0, dynamic_ncols=True, leave=True
            )

    def mute(self) -> None:
        """Write nothing more (after an interrupt: the report comes first; a terminal or a pipe that is
        no longer read must not hold it up). Safe from any thread."""
        self.muted = True
        for bar in list(self._bars.values()) + ([self._overall] if self._overall is not None else []):
            bar.disable = True  # a disabled bar's close() writes nothing

    def _name(self, event: dict) -> str:
        label = self.labels.get(event.get("config_id"), "")
        return f"{event['framework']:>10} {event['variant']:<16} seed {event['seed']}" + (f" {label}" if label else "")

    def _write(self, text: str) -> None:
        if self.muted:
            return
        if self.live:
            self._tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def update(self, event: dict) -> None:
        """A kind "progress" line from a worker: steps done in the current epoch."""
        if not self.live or self.muted:
            return
        key = (event["framework"], event.get("config_id"), event["seed"], event["variant"])
        bar = self._bars.get(key)
        desc = f"{self._name(event)} epoch {event['epoch']}/{event['epochs']}"
        if bar is None or bar.total != event["steps"]:
            if bar is not None:
                bar.close()
            bar = self._bars[key] = self._tqdm(
                total=event["steps"], desc=desc, unit="step", file=self.stream, leave=False, dynamic_ncols=True
            )
        elif bar.desc != desc:
            bar.reset(total=event["steps"])
            bar.set_description_str(desc)
        bar.update(event["step"] - bar.n)

    def _close_bar(self, record: dict) -> None:
        bar = self._bars.pop((record["framework"], record.get("config_id"), record["seed"], record["variant"]), None)
        if bar is not None:
            bar.close()

    def _eta(self) -> str:
        elapsed = time.monotonic() - self._started
        text = f"elapsed {_clock(elapsed)}"
        if self.total and 0 < self.ended < self.total:
            text += f", ETA {_clock(elapsed / self.ended * (self.total - self.ended))}"
        return text

    def record(self, record: dict) -> None:
        """A result record: epoch summaries and unfinished runs get a permanent line."""
        kind = record.get("kind")
        if kind == "epoch" and self.epoch_lines:
            self._write(
                f"{self._name(record)} epoch {record['epoch']}: "
                f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                f"test acc {record['test_acc']:.4f} | {record['train_examples_per_s']:,.0f} ex/s | "
                f"train/eval disagreement {record['probe_disagreement']:.3f}"
            )
        if kind not in ("error", "run_end"):
            return
        self._close_bar(record)
        status = record["status"]
        self.ended += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if kind == "error":
            self.errors += 1
        if status != "complete":
            what = record.get("message", "")
            if kind == "error":
                what = f"{record['error_type']}: {what}"
            self._write(f"{self._name(record)} {status.upper()}: {what}")
        problems = ", ".join(f"{self.counts[s]} {s}" for s in PROBLEMS if s in self.counts)
        if self._overall is not None:
            self._overall.set_postfix_str(problems, refresh=False)
            self._overall.update(1)
        elif self.total and not self.epoch_lines:
            self._write(
                f"[{self.ended}/{self.total} {self.unit}s] {self._name(record)} {status}"
                f"{' (' + problems + ')' if problems else ''}; {self._eta()}"
            )

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        if self._overall is not None:
            self._overall.close()
            self._overall = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
