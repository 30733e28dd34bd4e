"""Terminal output: one console, warnings, a progress bar with ETA, the overfitting watch."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

# Logs (stderr). Not on a terminal (a log file, a pipe), lines are never wrapped at rich's default 80 columns
# (soft_wrap): a wrapped sentence in a log can't be grepped. Results (tables) go to stdout, through `out`.
console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())
out = Console(highlight=False)


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
                                 disable=not console.is_terminal and "pytest" in sys.modules)
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


class OverfitWatch(TrainerCallback):
    """Warns once when eval loss rises twice in a row while the train loss keeps falling."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.evals: list[tuple[int, float]] = []
        self.message: str | None = None

    def _train_loss_near(self, history, step: int, window: int = 5) -> float | None:
        losses = [h["loss"] for h in history if "loss" in h and h["step"] <= step][-window:]
        return sum(losses) / len(losses) if losses else None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.enabled or not metrics or "eval_loss" not in metrics:
            return
        self.evals.append((state.global_step, metrics["eval_loss"]))
        if self.message or len(self.evals) < 3:
            return
        (s0, e0), (s1, e1), (s2, e2) = self.evals[-3:]
        t0 = self._train_loss_near(state.log_history, s0)
        t2 = self._train_loss_near(state.log_history, s2)
        if e2 > e1 > e0 and t0 is not None and t2 is not None and t2 < t0:
            self.message = (f"possible overfitting: eval loss rose {e0:.4f} -> {e2:.4f} (steps {s0}-{s2}) while "
                            f"train loss fell {t0:.4f} -> {t2:.4f}; consider early stopping "
                            f"(eval.early_stopping_patience), a lower learning rate or more data")
            warn(self.message)
