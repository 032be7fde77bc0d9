"""What a person watching the run sees: a live line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any, Optional, Sequence

from harness.sinks import Row, Sink

log = logging.getLogger("harness")


def say(text: str, source: str = "harness", stream: Optional[IO[str]] = None) -> None:
    """The one channel for lines a person reads: ``[source] text`` (launchers: stderr). Diagnostics
    go through ``logging.getLogger("harness")`` instead."""
    print(f"[{source}] {text}", file=stream or sys.stderr, flush=True)


def _number(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressReporter:
    """Rank 0's progress: step, loss, steps/s and ETA; a rich live bar when stdout is a terminal."""

    def __init__(self, total_steps: int, start_step: int, log_every: int, enabled: bool,
                 sinks: Sequence[Sink] = (), stream: Optional[IO[str]] = None):
        """``sinks`` (``harness.sinks``): where every step's values go; more can be added later.
        ``stream``: where lines go (None: ``sys.stdout`` as it is now, not as it was at import)."""
        self.total_steps = total_steps
        self.start_step = start_step
        self.log_every = log_every
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.started = time.perf_counter()
        self._bar = None
        self._sinks: list[Sink] = list(sinks) if enabled else []
        self._pending: list[tuple[int, dict[str, Any]]] = []  # steps not yet written or shown
        if enabled and self.stream.isatty():
            self._bar = self._start_bar()

    def add_sink(self, sink: Sink) -> None:
        """Also write the steps from now on to ``sink`` (opened once the resumed step is known)."""
        if self.enabled:
            self._sinks.append(sink)

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

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Record a finished step's values (numbers or one-element tensors). Tensors are read only at
        the next progress line or ``flush()`` (one device sync per line, not per step)."""
        if not self.enabled:
            return
        self._pending.append((step, dict(metrics)))
        if self._bar is not None or step % self.log_every == 0 or step == self.total_steps:
            self.flush(show=True)

    def flush(self, show: bool = False) -> None:
        """Read the pending values, append them to the metrics file, and show the newest step."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = [(step, {key: _number(value) for key, value in values.items()}) for step, values in pending]
        self._write_metrics(rows)
        if show:
            self._show(*rows[-1])

    def _write_metrics(self, rows: list[Row]) -> None:
        for sink in list(self._sinks):
            try:
                sink.write(rows)
            except Exception as error:  # a full disk or a broken logger must not stop training
                self._drop(sink, error)

    def _drop(self, sink: Sink, error: Exception) -> None:
        """Warn once, stop writing to ``sink``, close it (its own error then is part of the same failure)."""
        log.warning("could not write %s (%s: %s); training goes on without it", sink.name,
                    type(error).__name__, error)
        self._sinks.remove(sink)
        try:
            sink.close()
        except Exception:  # already warned about this sink: its buffered tail is lost
            pass

    def _show(self, step: int, values: dict[str, float]) -> None:
        rate = self.rate(step)
        summary = " | ".join(f"{key} {value:.4g}" for key, value in values.items())
        if self._bar is not None:
            self._bar.update(self._bar.task_ids[0], completed=step, summary=f"{summary} | {rate:.1f} steps/s")
        else:
            eta = (self.total_steps - step) / rate if rate > 0 else 0.0
            self.message(f"step {step}/{self.total_steps} | {summary} | {rate:.1f} steps/s | "
                         f"ETA {format_eta(eta)}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            say(text, stream=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self.flush()
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as error:  # the run is over or stopping: say so, let it end as it would
                log.warning("could not close %s (%s: %s)", sink.name, type(error).__name__, error)
