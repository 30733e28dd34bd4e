"""The training recipe, top to bottom: setup (model, data, adapters), train, save.

It drives transformers' Trainer (checkpoint layout, resume, schedulers, 8-bit optimizers,
TensorBoard) with tunelab's own data pipeline; TRL's SFTTrainer adds nothing here but defaults
that hurt on CPU (bf16=True), so it is not used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from .config import ConfigError, RunConfig, config_from_dict, save_config
from .data.packing import PackedCollator, is_packed, packed_attention, split_packed
from .data.pipeline import Collator, DataStats, TokenizedDataset, prepare
from .data.preflight import PreflightError, check_examples
from .fsutil import atomic_write_text, clean_stale, commit_dir, is_disk_full, remove_tree
from .loss import chunked_causal_lm_loss
from .models import (context_window, dtype_warning, load_model, load_tokenizer, pick_device, pick_dtype,
                     resolve_model, write_base_fingerprint)
from .ui import console, warn

log = logging.getLogger("tunelab")

class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss, disk full); the message says what is intact."""


# Keys a resumed run may change: it can be extended, nothing else.
RESUME_MUTABLE = {"train.max_steps", "train.num_train_epochs", "train.save_steps", "train.eval_steps",
                  "train.logging_steps", "train.save_total_limit", "eval.early_stopping_patience"}


@dataclass
class Setup:
    cfg: RunConfig
    model_folder: Path
    device: str
    dtype: torch.dtype
    tokenizer: object
    pad_note: str | None
    train: list
    evals: list
    stats: DataStats
    samples: list


def setup_data(cfg: RunConfig, config_dir: Path | None = None) -> Setup:
    """Everything before the weights: resolve the model, its tokenizer, the data. Shared with `check`."""
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    folder = resolve_model(cfg.model.name, cfg.model.revision)
    ctx = context_window(folder)
    if ctx and cfg.data.max_seq_length > ctx:
        raise ConfigError(f"data.max_seq_length={cfg.data.max_seq_length} is above the model's context window "
                          f"({ctx} tokens, max_position_embeddings of {cfg.model.name})")
    tok, note = load_tokenizer(folder, cfg.model.pad_token)
    train, evals, stats, samples = prepare(cfg.data, tok, base=config_dir)
    return Setup(cfg, folder, device, dtype, tok, note, train, evals, stats, samples)


def prepare_quantized(model, gradient_checkpointing: bool, use_reentrant: bool) -> None:
    """Ready a 4-bit base for LoRA: freeze it, and turn on checkpointing with grad-requiring inputs.

    Written here instead of peft's prepare_model_for_kbit_training because that function also casts every
    parameter that is not quantized (embeddings, norms, the output head: 1.05B parameters on Llama-3-8B) to
    fp32. That costs 2 GiB of static memory and makes the whole residual stream fp32; measured on an H200
    (bench/gpu_qlora.py, BENCHMARKS.md) it made tunelab 0.85x the recipe stack's speed at 1.61x its peak
    memory. The recipe's stack (TRL) and the QLoRA paper keep them in the compute dtype; so does this.
    RMSNorm still computes its variance in fp32 inside transformers' Llama-family layers.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input


def build_model(s: Setup):
    """Load the base (4-bit for QLoRA) and wrap it with LoRA, or leave it whole for a full fine-tune."""
    cfg = s.cfg
    q = cfg.quantization
    compute = s.dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    model = load_model(s.model_folder, s.tokenizer, dtype=s.dtype, device=s.device,
                       load_in_4bit=q.load_in_4bit, quant_type=q.quant_type, double_quant=q.double_quant,
                       compute_dtype=compute, attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False  # no KV cache while training (and required for gradient checkpointing)
    gc = cfg.train.gradient_checkpointing
    if q.load_in_4bit:
        prepare_quantized(model, gc, cfg.train.gradient_checkpointing_use_reentrant)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
                              task_type="CAUSAL_LM", target_modules=list(lc.target_modules), use_dora=lc.use_dora)
        if gc:
            model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input
        try:
            model = get_peft_model(model, peft_cfg)
        except ValueError as e:
            raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0][:200]}")
    return model


def training_arguments(cfg: RunConfig, out: Path, device: str, dtype: torch.dtype, has_eval: bool):
    from transformers import TrainingArguments

    t = cfg.train
    early = cfg.eval.early_stopping_patience > 0
    return TrainingArguments(
        output_dir=str(out),
        # data.packing: one packed batch per optimizer step, the same examples and the same
        # trained-token normalisation as batch x accumulation (see tunelab/data/packing.py)
        per_device_train_batch_size=t.per_device_train_batch_size * (t.gradient_accumulation_steps if cfg.data.packing else 1),
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=1 if cfg.data.packing else t.gradient_accumulation_steps,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        eval_on_start=cfg.eval.eval_on_start and has_eval,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        optim=t.optim,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        seed=t.seed,
        data_seed=t.seed,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": t.gradient_checkpointing_use_reentrant},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16 and device == "cuda",
        use_cpu=device == "cpu",
        report_to=list(t.report_to),
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        disable_tqdm=True,
        save_only_model=False,
    )


def make_trainer(model, args, s: Setup):
    from transformers import EarlyStoppingCallback, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .ui import OverfitWatch, RichProgress

    class TunelabTrainer(Trainer):
        """Adds tokens/s and peak memory to every training log line (TensorBoard and terminal)."""

        _tps_mark: tuple[float, int] | None = None
        _eval_seconds = 0.0  # evaluation time, kept out of tokens/s

        def training_step(self, model, inputs, num_items_in_batch=None):
            rows = inputs.pop("row_index", None)
            if is_packed(inputs):  # split at example boundaries by data.pack_max_tokens; gradients accumulate
                with packed_attention(model):
                    loss = sum(super(TunelabTrainer, self).training_step(model, piece, num_items_in_batch)
                               for piece in split_packed(inputs, s.cfg.data.pack_max_tokens))
            else:
                loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                raise NonFinite(f"loss is {loss.item()} at step {self.state.global_step + 1}", rows)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # train.chunked_loss: logits only where labels exist, in chunks (tunelab/loss.py); eval
            # discards logits unless compute_metrics is set, so it takes the chunked path too.
            if s.cfg.train.chunked_loss and (not return_outputs or self.compute_metrics is None) \
                    and self.accelerator.unwrap_model(model) is model:
                with packed_attention(model) if is_packed(inputs) else contextlib.nullcontext():
                    loss = chunked_causal_lm_loss(model, inputs, num_items_in_batch, s.cfg.train.loss_chunk_size)
                if loss is not None:
                    return (loss, {"loss": loss}) if return_outputs else loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            if norm is not None and not math.isfinite(float(norm)):
                # Checked before optimizer.step(): the bad update never reaches the weights.
                raise NonFinite(f"gradient norm is {float(norm)} at step {self.state.global_step + 1}", None)
            return norm

        def _save_checkpoint(self, model, trial):
            save_checkpoint_atomically(self, model, trial, super()._save_checkpoint)

        def _save(self, output_dir=None, state_dict=None):  # every checkpoint and the final model go through it
            super()._save(output_dir, state_dict)
            write_base_fingerprint(output_dir or self.args.output_dir, s.model_folder, s.cfg.model.name)

        def evaluate(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super().evaluate(*a, **kw)
            finally:
                self._eval_seconds += time.perf_counter() - t

        def log(self, logs, start_time=None):
            if "loss" in logs:
                now = time.perf_counter() - self._eval_seconds
                seen = self.state.num_input_tokens_seen
                if self._tps_mark is not None and now > self._tps_mark[0]:
                    logs["tokens_per_second"] = round((seen - self._tps_mark[1]) / (now - self._tps_mark[0]), 2)
                self._tps_mark = (now, seen)
                logs["peak_rss_gib"] = round(peak_rss_gib(), 3)
            super().log(logs, start_time)

    callbacks = [RichProgress(), OverfitWatch(enabled=s.cfg.eval.overfit_warning), StopOnSignal()]
    if s.cfg.eval.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(s.cfg.eval.early_stopping_patience,
                                               s.cfg.eval.early_stopping_threshold))
    trainer = TunelabTrainer(model=model, args=args, train_dataset=TokenizedDataset(s.train),
                             eval_dataset=TokenizedDataset(s.evals) if s.evals else None,
                             data_collator=PackedCollator() if s.cfg.data.packing else Collator(s.tokenizer.pad_token_id),
                             processing_class=s.tokenizer,
                             callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


class NonFinite(Exception):
    def __init__(self, what: str, rows):
        super().__init__(what)
        self.what, self.rows = what, rows


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
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True


def save_checkpoint_atomically(trainer, model, trial, save) -> None:
    """Trainer._save_checkpoint, made crash-safe: write into out/.staging, fsync, rename to
    out/checkpoint-N, then rotate by save_total_limit without ever deleting the newest complete
    checkpoint (or the best one). A kill at any moment leaves only complete checkpoint folders."""
    args = trainer.args
    out = Path(args.output_dir)
    staging = out / ".staging"
    name = f"checkpoint-{trainer.state.global_step}"
    if trainer.is_world_process_zero():
        clean_stale(out)
        staging.mkdir()
    trainer.accelerator.wait_for_everyone()
    limit = args.save_total_limit
    args.output_dir, args.save_total_limit = str(staging), None
    try:
        save(model, trial)
        best = trainer.state.best_model_checkpoint
        if best and Path(best).parent == staging:
            trainer.state.best_model_checkpoint = str(out / Path(best).name)
            if trainer.is_world_process_zero():
                trainer.state.save_to_json(str(staging / name / "trainer_state.json"))
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            commit_dir(staging / name, out / name)
    except Exception as e:
        # torch.save reports a full disk as "iostream error"/"unexpected pos", not ENOSPC: look at
        # the free space (before cleaning up) to say what happened.
        free = shutil.disk_usage(out).free
        if trainer.is_world_process_zero():
            remove_tree(staging)
        prev = newest_checkpoint(out)
        intact = f"the previous checkpoint {prev.name} is intact" if prev else "no earlier checkpoint exists"
        if is_disk_full(e) or free < 1 << 20:
            raise TrainingError(f"disk full while saving {name} in {out} ({free // 1024} KiB free); {intact}; "
                                f"free space and resume with --resume") from None
        raise TrainingError(f"saving {name} in {out} failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                            f"{intact}") from None
    finally:
        args.output_dir, args.save_total_limit = str(out), limit
    if trainer.is_world_process_zero():
        remove_tree(staging)
        rotate_checkpoints(out, limit, trainer.state.best_model_checkpoint)


def rotate_checkpoints(out: Path, limit: int | None, best: str | None) -> None:
    if not limit:
        return
    complete = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
                      if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file())
    keep = {complete[-1][1]} if complete else set()
    if best:
        keep.add(Path(best))
    removable = [p for _, p in complete if p not in keep]
    excess = len(complete) - max(limit, len(keep))
    for p in removable[:max(0, excess)]:
        remove_tree(p)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint-N folder (one with trainer_state.json written last)."""
    found = []
    for p in out.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(suffix), p))
    return max(found)[1] if found else None


def prepare_run_folder(cfg: RunConfig, out: Path, resume: bool) -> Path | None:
    """Refuse to overwrite a finished or started run; on --resume, insist the config still matches."""
    saved = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} exists and is not a folder")
    clean_stale(out)
    if resume and not saved.is_file():
        if out.exists() and any(p for p in out.iterdir() if p.name != "tensorboard"):
            raise ConfigError(f"--resume: {out} holds files but no tunelab run (no config.yaml)")
        console.print(f"[yellow]--resume:[/yellow] nothing to resume in {out}; starting a new run")
        resume = False
    if resume:
        import yaml

        old = config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8"))).to_dict()
        new = cfg.to_dict()
        changed = [f"{sec}.{k}" for sec in new for k in new[sec]
                   if new[sec][k] != old.get(sec, {}).get(k) and f"{sec}.{k}" not in RESUME_MUTABLE]
        if changed:
            raise ConfigError(f"--resume: the config differs from the run's saved config in {', '.join(changed)}; "
                              f"only {', '.join(sorted(RESUME_MUTABLE))} may change")
        return newest_checkpoint(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--output {out} already holds files; pass --resume to continue that run "
                          f"or choose a new --output")
    _check_writable(out)
    return None


def _check_writable(out: Path) -> None:
    """Fail before the expensive part if the run folder can't be created or written."""
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    finally:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def run(cfg: RunConfig, out: Path, *, resume: bool = False, config_dir: Path | None = None) -> dict:
    """Train one run into `out`. Returns the summary (also written to out/summary.json)."""
    t0 = time.perf_counter()
    # Under accelerate/torchrun every process runs this; only the main one checks and writes the run folder.
    main = int(os.environ.get("RANK", "0")) == 0
    checkpoint = prepare_run_folder(cfg, out, resume) if main else (newest_checkpoint(out) if resume else None)

    # --- setup -------------------------------------------------------------------------------
    s = setup_data(cfg, config_dir)
    report = check_examples(s)  # the preflight's fatal checks run before every training run
    if report.errors:
        raise PreflightError(report.errors[0])
    for w in report.warnings:
        warn(w)
    if s.pad_note:
        console.print(f"[dim]tokenizer: {s.pad_note}[/dim]")
    dw = dtype_warning(s.dtype, s.device)
    if dw:
        warn(dw)
    method = ("QLoRA (4-bit base)" if cfg.quantization.load_in_4bit else "LoRA") if cfg.lora.enabled else "full fine-tune"
    console.print(f"[bold]tunelab[/bold] {method} of {cfg.model.name} on {s.device}, compute dtype "
                  f"{str(s.dtype).replace('torch.', '')}; {s.stats.train_rows} train / {s.stats.eval_rows} eval rows")
    from transformers import set_seed

    set_seed(cfg.train.seed)  # LoRA's A matrices are drawn at wrap time: seed before, not only in Trainer
    model = build_model(s)  # before anything is written: a model that won't load leaves no run folder behind
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "data_stats.json", json.dumps(s.stats.to_dict(), indent=2, ensure_ascii=False))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    console.print(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")

    # --- train -------------------------------------------------------------------------------
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    args = training_arguments(cfg, out, s.device, s.dtype, has_eval=bool(s.evals))
    trainer = make_trainer(model, args, s)
    if checkpoint is not None:
        console.print(f"resuming from {checkpoint.name}")
    stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal))
    previous = {sig: signal.signal(sig, stop.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFinite as e:
        last = newest_checkpoint(out)
        rows = ""
        if e.rows is not None:
            wheres = [s.train[i].where for i in e.rows.tolist() if s.train[i].where]
            rows = f" in the batch of rows {', '.join(wheres[:4])}" if wheres else ""
        raise TrainingError(f"{e.what}{rows}: training stopped, the bad update was not applied or saved; "
                            f"last good checkpoint: {last.name if last else 'none'} (try a lower "
                            f"train.learning_rate or check those rows)") from None
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)

    # --- save --------------------------------------------------------------------------------
    summary = make_summary(trainer, result, s, out, time.perf_counter() - t0, method)
    if stop.signum is not None:
        summary["status"] = "interrupted"
        summary["signal"] = signal.Signals(stop.signum).name
    else:
        final, staging = out / "final", out / ".staging-final"
        try:  # every process calls save_model (sharded setups gather collectively); the main one writes
            trainer.save_model(str(staging))
            if main:
                s.tokenizer.save_pretrained(str(staging))
                commit_dir(staging, final)
        except Exception as e:
            if main:
                remove_tree(staging)
            if is_disk_full(e):
                raise TrainingError(f"disk full while saving {final}; the checkpoints are intact") from None
            raise
        trainer.accelerator.wait_for_everyone()
        before = (f"{summary['first_eval_loss']} at step {summary['first_eval_step']} -> "
                  if summary["first_eval_step"] is not None and summary["first_eval_step"] < summary["global_step"] else "")
        console.print(f"[green]done[/green]: {summary['global_step']} steps, train loss {summary['train_loss']}, "
                      f"eval loss {before}{summary['eval_loss']}; model in {final}")
    if main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def make_summary(trainer, result, s: Setup, out: Path, wall: float, method: str) -> dict:
    hist = trainer.state.log_history
    train_losses = [h["loss"] for h in hist if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    overfit = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "OverfitWatch"), None)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

    def rnd(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 5)

    return {
        "status": "completed",
        "method": method,
        "model": s.cfg.model.name,
        "device": s.device,
        "compute_dtype": str(s.dtype).replace("torch.", ""),
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": rnd(trainer.state.epoch),
        "input_tokens_seen": int(trainer.state.num_input_tokens_seen),
        "train_loss": rnd(train_losses[-1]) if train_losses else None,
        "train_loss_mean": rnd(result.training_loss),
        "eval_loss": rnd(eval_losses[-1][1]) if eval_losses else None,
        "first_eval_loss": rnd(eval_losses[0][1]) if eval_losses else None,  # at step 0 with eval_on_start
        "first_eval_step": eval_losses[0][0] if eval_losses else None,
        "best_eval_loss": rnd(min(v for _, v in eval_losses)) if eval_losses else None,
        "best_eval_step": min(eval_losses, key=lambda x: x[1])[0] if eval_losses else None,
        "early_stopped": trainer.state.global_step < trainer.state.max_steps,
        "overfitting_warning": overfit.message if overfit else None,
        "wall_time_s": round(wall, 2),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "peak_gpu_gib": round(peak_gpu, 3) if peak_gpu is not None else None,
        "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
        "pad_token": s.tokenizer.pad_token,
        "eos_token": s.tokenizer.eos_token,
    }
