"""What a person watching the run sees: a live line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Optional


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressReporter:
    """Rank 0's progress: step, loss, steps/s and ETA; a rich live bar when stdout is a terminal."""

    def __init__(self, total_steps: int, start_step: int, log_every: int, enabled: bool,
                 metrics_path: Optional[str], stream: IO[str] = sys.stdout):
        self.total_steps = total_steps
        self.start_step = start_step
        self.log_every = log_every
        self.enabled = enabled
        self.stream = stream
        self.started = time.perf_counter()
        self._bar = None
        self._metrics_file = None
        if enabled and metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
            self._metrics_file = open(metrics_path, "a", buffering=1)
        if enabled and stream.isatty():
            self._bar = self._start_bar()

    def _start_bar(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                       TextColumn("{task.fields[summary]}"), TimeRemainingColumn(), transient=False)
        bar.start()
        bar.add_task("train", total=self.total_steps, completed=self.start_step, summary="")
        return bar

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.started
        return (step - self.start_step) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        rate = self.rate(step)
        summary = " | ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        if self._bar is not None:
            self._bar.update(self._bar.task_ids[0], completed=step, summary=f"{summary} | {rate:.1f} steps/s")
        elif step % self.log_every == 0 or step == self.total_steps:
            eta = (self.total_steps - step) / rate if rate > 0 else 0.0
            self.message(f"step {step}/{self.total_steps} | {summary} | {rate:.1f} steps/s | "
                         f"ETA {format_eta(eta)}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(f"[harness] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
