"""The run folder: its layout, its typed config, its checkpoints, and resume.

    RUN/config.yaml          the resolved config the run trained with (read back with `run_config`)
    RUN/data_stats.json      token counts of the data
    RUN/checkpoint-N/        complete Trainer checkpoints (adapter or weights, optimizer, scheduler,
                             RNG, trainer_state.json); a folder appears here whole or not at all
    RUN/final/               the final weights and tokenizer
    RUN/summary.json         what the run did
    RUN/tensorboard/         logs
    RUN/.staging/            where the Trainer writes a checkpoint before callbacks.CommitCheckpoints
                             renames it into place (never read)

Everything that reads or writes those names goes through this module: the checkpoint-N parser,
the list of complete checkpoints, the newest, rotation, the final weights, the resume check.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ConfigError, RunConfig, config_from_dict
from .fsutil import clean_stale, remove_tree

CONFIG = "config.yaml"
FINAL = "final"
SUMMARY = "summary.json"
STAGING = ".staging"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

# Keys a resumed run may change: it can be extended, nothing else.
RESUME_MUTABLE = {"train.max_steps", "train.num_train_epochs", "train.save_steps", "train.eval_steps",
                  "train.logging_steps", "train.save_total_limit", "eval.early_stopping_patience"}


def checkpoint_step(path: Path | str) -> int | None:
    """N for a folder named checkpoint-N, else None. The one parser of checkpoint names."""
    m = _CHECKPOINT.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last; tunelab commits the folder whole (see CommitCheckpoints)."""
    return ckpt.is_dir() and (ckpt / "trainer_state.json").is_file()


def checkpoints(run: Path) -> list[Path]:
    """The run's complete checkpoint-N folders, oldest first."""
    found = [(checkpoint_step(p), p) for p in run.glob("checkpoint-*") if checkpoint_step(p) is not None]
    return [p for _, p in sorted(found) if is_complete(p)]


def newest_checkpoint(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def run_config(run: Path) -> RunConfig:
    """The typed config a run trained with, read back through tunelab.config (defaults included)."""
    import yaml

    try:
        data = yaml.safe_load((run / CONFIG).read_text(encoding="utf-8")) or {}
        return config_from_dict(data)
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"{run / CONFIG}: not a readable tunelab run config ({str(e).splitlines()[0][:160]})")


def has_weights(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def find_run(path: Path) -> tuple[Path | None, Path | None]:
    """(run folder, adapter-or-weights folder) for a run folder or one of its checkpoints; (None, None)
    if neither. A run folder gives its final weights, else its newest checkpoint."""
    if is_run(path) and not (path / "adapter_config.json").is_file():
        for cand in [path / FINAL] + checkpoints(path)[::-1]:
            if has_weights(cand):
                return path, cand
        from .models import ModelError

        raise ModelError(f"{path}: a tunelab run folder without a final model or checkpoint")
    if (path / "adapter_config.json").is_file() or ((path / "config.json").is_file() and is_run(path.parent)):
        return (path.parent if is_run(path.parent) else None), path
    return None, None


def rotate_checkpoints(run: Path, limit: int | None, best: str | Path | None) -> None:
    """Keep at most `limit` complete checkpoints, never deleting the newest or the best one."""
    if not limit:
        return
    complete = checkpoints(run)
    keep = {complete[-1]} if complete else set()
    if best:
        keep.add(Path(best))
    removable = [p for p in complete if p not in keep]
    for p in removable[:max(0, len(complete) - max(limit, len(keep)))]:
        remove_tree(p)


def saved_step(ckpt: Path) -> int:
    import json

    return int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])


def resume_checkpoint(cfg: RunConfig, run: Path, resume: bool) -> Path | None:
    """Refuse to overwrite a finished or started run; on --resume, insist the config still matches
    and return the newest complete checkpoint (None: start from scratch)."""
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--output {run} exists and is not a folder")
    clean_stale(run)
    if resume and not is_run(run):
        if run.exists() and any(p for p in run.iterdir() if p.name != "tensorboard"):
            raise ConfigError(f"--resume: {run} holds files but no tunelab run (no {CONFIG})")
        from .ui import console

        console.print(f"[yellow]--resume:[/yellow] nothing to resume in {run}; starting a new run")
        resume = False
    if resume:
        old, new = run_config(run).to_dict(), cfg.to_dict()
        changed = [f"{sec}.{k}" for sec in new for k in new[sec]
                   if new[sec][k] != old.get(sec, {}).get(k) and f"{sec}.{k}" not in RESUME_MUTABLE]
        if changed:
            raise ConfigError(f"--resume: the config differs from the run's saved config in {', '.join(changed)}; "
                              f"only {', '.join(sorted(RESUME_MUTABLE))} may change")
        return newest_checkpoint(run)
    if run.exists() and any(run.iterdir()):
        raise ConfigError(f"--output {run} already holds files; pass --resume to continue that run "
                          f"or choose a new --output")
    _check_writable(run)
    return None


def _check_writable(run: Path) -> None:
    """Fail before the expensive part if the run folder can't be created or written."""
    existed = run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output {run}: cannot write there ({e.strerror or e})") from None
    finally:
        if not existed and run.is_dir() and not any(run.iterdir()):
            run.rmdir()
