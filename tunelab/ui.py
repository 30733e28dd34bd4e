"""Terminal output: one console, warnings, a progress bar with ETA (training policies: callbacks.py)."""

from __future__ import annotations

import os
import sys
import time

import rich.progress
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

# Logs (stderr). Not on a terminal (a log file, a pipe), lines are never wrapped at rich's default 80 columns
# (soft_wrap): a wrapped sentence in a log can't be grepped. Results (tables) go to stdout, through `out`.
console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())
_stdout = Console(highlight=False)


def show(renderable) -> None:
    """A result (a table) on stdout, apart from the logs and progress on stderr: `cmd > results.txt` keeps it."""
    _stdout.print(renderable)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}")


def clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress(rich.progress.Progress):
    """rich's live progress bar on a terminal. Elsewhere (stderr to a log file or a pipe, where a live bar
    prints nothing) one plain line per task every TUNELAB_PROGRESS_EVERY seconds (default 20) and one when
    it ends (when it completed, or said something before: a command that fails early ends in its one error
    line): `label task: done/total (pct), rate/s, elapsed, eta`. Every long command uses this class."""

    def __init__(self, *columns, label: str = "", unit: str = "", **kwargs):
        kwargs.setdefault("console", console)
        self.lines = not kwargs["console"].is_terminal
        if self.lines:
            kwargs["disable"] = True  # no live display; the lines below instead
        super().__init__(*columns, **kwargs)
        self.label, self.unit = label, unit
        self.every = float(os.environ.get("TUNELAB_PROGRESS_EVERY", "20"))
        self._last: dict = {}

    def add_task(self, description: str, *args, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        self._last[task_id] = [time.monotonic(), kwargs.get("completed", 0), time.monotonic(), False]
        return task_id

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def stop(self) -> None:
        for task_id in list(self._last):
            self._line(task_id, final=True)
        super().stop()

    def _line(self, task_id, final: bool = False) -> None:
        if not self.lines or task_id not in self._last:
            return
        start, first, last, said = self._last[task_id]
        now = time.monotonic()
        if not final and now - last < self.every:
            return
        task = next(t for t in self.tasks if t.id == task_id)
        if final:
            del self._last[task_id]  # said once
            if not said and not (task.total and task.completed >= task.total):
                return
        else:
            self._last[task_id][2:] = [now, True]
        done, total, elapsed = task.completed, task.total, now - start
        rate = (done - first) / elapsed if elapsed > 0 else 0.0
        name = " ".join(x for x in (self.label, task.description if task.description != self.label else "") if x)
        parts = [f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}",
                 f"{rate:.2f} {self.unit or 'it'}/s", f"elapsed {clock(elapsed)}"]
        if total and done < total:
            parts.append(f"eta {clock((total - done) / rate)}" if rate > 0 else "eta ?")
        elif final:
            parts.append("done" if total and done >= total else "stopped")
        self.console.print(f"{name}: " + ", ".join(parts), markup=False, highlight=False)


def _fmt(logs: dict) -> str:
    parts = []
    for key, label, fmt in (("loss", "loss", ".4f"), ("eval_loss", "eval_loss", ".4f"), ("learning_rate", "lr", ".2e"),
                            ("grad_norm", "grad", ".3f"), ("tokens_per_second", "tok/s", ".1f")):
        if key in logs and isinstance(logs[key], (int, float)):
            parts.append(f"{label} {logs[key]:{fmt}}")
    return "  ".join(parts)


class RichProgress(TrainerCallback):
    """A progress bar with ETA over optimizer steps, and one compact line per log/eval."""

    def __init__(self):
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                                 label="train", unit="steps")
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs:
            line = _fmt(logs)
            if line:
                self.progress.console.print(f"step {state.global_step:>5}  {line}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
