"""Training policies that ride on transformers' public TrainerCallback hooks.

  FiniteGradients  stop before optimizer.step() when a gradient is nan/inf (any max_grad_norm)
  StopOnSignal     SIGINT/SIGTERM: finish the step, checkpoint, stop
  OverfitWatch     warn once when eval loss rises while train loss falls
  CommitCheckpoints  crash-safe checkpoints: the Trainer's write in RUN/.staging, renamed into place
(The run folder's layout is tunelab/rundir.py's; the progress bar is ui.py's.)
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from .fsutil import commit_dir, remove_tree
from .rundir import STAGING, rotate_checkpoints
from .ui import console, warn


class NonFinite(Exception):
    """A nan/inf loss or gradient; `rows` are the batch's row indices when known."""

    def __init__(self, what: str, rows=None):
        super().__init__(what)
        self.what, self.rows = what, rows


class FiniteGradients(TrainerCallback):
    """Checks the gradients right before optimizer.step() (the public `on_pre_optimizer_step` hook,
    which the Trainer calls whether or not it clips): a nan/inf gradient raises NonFinite, so the bad
    update never reaches the weights. Costs one norm over the trainable gradients per optimizer step
    (the Trainer's own grad_norm is not passed to callbacks)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = float(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))
        if not math.isfinite(norm):
            raise NonFinite(f"gradient norm is {norm} at step {state.global_step + 1}")


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM during training: finish the current optimizer step, save a checkpoint, stop.

    A second Ctrl-C aborts at once (KeyboardInterrupt) without saving."""

    def __init__(self):
        self.signum: int | None = None

    def handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        console.print(f"[yellow]{signal.Signals(signum).name}[/yellow]: saving a checkpoint after the current "
                      f"step, then stopping (Ctrl-C again aborts without saving)")

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # The ranks get a signal at slightly different moments: agree (one tiny all-reduce per step)
            # so that all of them stop after the same step, and all save the checkpoint together.
            from accelerate import PartialState

            t = torch.tensor([signum], dtype=torch.int64, device=PartialState().device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum = int(t.item())
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True


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


class CommitCheckpoints(TrainerCallback):
    """Crash-safe checkpoints through public Trainer hooks.

    The Trainer's `output_dir` is RUN/.staging (set once, in TrainingArguments) and its own rotation
    is off (save_total_limit=None), so it writes each checkpoint into RUN/.staging/checkpoint-N.
    `on_save`, which the Trainer calls right after that write, fsyncs the folder and renames it to
    RUN/checkpoint-N, then rotates by `limit` without ever deleting the newest or best checkpoint.
    A kill at any moment leaves RUN/checkpoint-* complete; a half-written .staging is removed by
    the next start (`resume_checkpoint` -> clean_stale) and never read.
    """

    def __init__(self, run: Path, limit: int | None, base: tuple[Path, str] | None = None):
        self.run, self.limit = run, limit
        self.staging = run / STAGING
        # (base folder, its name): recorded beside each checkpoint's adapter (models.check_adapter_base)
        self.base = base

    def _public(self, path: str | None) -> str | None:
        """A path under .staging as it will be after the commit."""
        if path and Path(path).parent == self.staging:
            return str(self.run / Path(path).name)
        return path

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        dist = PartialState()
        name = f"checkpoint-{state.global_step}"
        dist.wait_for_everyone()  # every rank has written its part (rng_state_<rank>.pth, shards)
        best = self._public(state.best_model_checkpoint)
        if best != state.best_model_checkpoint:
            state.best_model_checkpoint = best  # so that resume and load_best_model_at_end find it
            if state.is_world_process_zero:
                state.save_to_json(str(self.staging / name / "trainer_state.json"))
        if state.is_world_process_zero:
            if self.base is not None:
                from .models import write_base_fingerprint

                write_base_fingerprint(self.staging / name, *self.base)
            commit_dir(self.staging / name, self.run / name)
            remove_tree(self.staging)
            rotate_checkpoints(self.run, self.limit, best)
        dist.wait_for_everyone()


class AtMaxSteps(Exception):
    """Raised by NoStepPastMaxSteps before a step past train.max_steps."""


class NoStepPastMaxSteps(TrainerCallback):
    """transformers' Trainer resumed from a checkpoint already at max_steps trains one step more: its epoch loop
    checks should_training_stop only after a step (transformers 5.24), so `--resume` of a run
    killed between its last checkpoint and its final save ended one optimizer step past the uninterrupted run.
    Added by train.run for that resume only: raises AtMaxSteps at the start of such a step, before its data is
    computed; run then saves the checkpoint's weights as the final model.
    tests/test_reliability.py::test_the_trainer_still_steps_past_max_steps_on_resume goes red the day the Trainer
    stops doing it (then this can go)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AtMaxSteps(state.global_step)
