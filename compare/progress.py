"""Progress display: a live bar per framework/epoch on a terminal, one line per epoch otherwise."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, live: bool, stream=sys.stderr, width: int = 24):
        self.live, self.stream, self.width = live, stream, width
        self.errors = 0
        self._last_len = 0
        self._start = {}

    def _clear(self):
        if self.live and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0

    def update(self, event: dict) -> None:
        """A kind "progress" line from a worker."""
        if not self.live:
            return
        key = (event["framework"], event["variant"], event["seed"], event["epoch"])
        self._start.setdefault(key, (event["time"], event["step"]))
        t0, s0 = self._start[key]
        done = event["step"] / event["steps"]
        filled = int(done * self.width)
        rate = ""
        if event["time"] > t0 and event["step"] > s0:
            rate = f" {(event['step'] - s0) / (event['time'] - t0):6.1f} steps/s"
        text = (f"{event['framework']:>10} {event['variant']:<16} seed {event['seed']} "
                f"epoch {event['epoch']}/{event['epochs']} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{event['step']}/{event['steps']}{rate}")
        self.stream.write("\r" + text.ljust(self._last_len))
        self.stream.flush()
        self._last_len = len(text)

    def record(self, record: dict) -> None:
        """A result record: epoch summaries and errors get a permanent line."""
        kind = record.get("kind")
        if kind == "epoch":
            self._clear()
            self.stream.write(
                f"{record['framework']:>10} {record['variant']:<16} seed {record['seed']} epoch {record['epoch']}: "
                f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                f"test acc {record['test_acc']:.4f} | {record['train_examples_per_s']:,.0f} ex/s | "
                f"train/eval disagreement {record['probe_disagreement']:.3f}\n")
        elif kind in ("error", "run_end") and record["status"] != "complete":
            what = record.get("message", "")
            if kind == "error":
                self.errors += 1
                what = f"{record['error_type']}: {what}"
            self._clear()
            self.stream.write(f"{record['framework']:>10} {record['variant']:<16} seed {record['seed']} "
                              f"{record['status'].upper()}: {what}\n")
        self.stream.flush()
