"""Terminal output: one console, warnings, a progress bar with ETA (training policies: callbacks.py)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

console = Console(stderr=True, highlight=False)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}")


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
                                 disable=not console.is_terminal)  # piped: log lines, no bar
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
