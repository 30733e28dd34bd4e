"""The training recipe, top to bottom: setup (model, data, adapters), train, save.

It drives transformers' Trainer (checkpoint layout, resume, schedulers, 8-bit optimizers,
TensorBoard) with tunelab's own data pipeline; TRL's SFTTrainer adds nothing here but defaults
that hurt on CPU (bf16=True), so it is not used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, config_from_dict, save_config
from .data.pipeline import Collator, DataStats, TokenizedDataset, prepare
from .data.preflight import PreflightError, check_examples
from .models import (context_window, dtype_warning, load_model, load_tokenizer, pick_device, pick_dtype,
                     resolve_model)
from .ui import console, warn

log = logging.getLogger("tunelab")

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
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc,
            gradient_checkpointing_kwargs={"use_reentrant": cfg.train.gradient_checkpointing_use_reentrant})
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
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
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

    callbacks = [RichProgress(), OverfitWatch(enabled=s.cfg.eval.overfit_warning)]
    if s.cfg.eval.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(s.cfg.eval.early_stopping_patience,
                                               s.cfg.eval.early_stopping_threshold))
    trainer = TunelabTrainer(model=model, args=args, train_dataset=TokenizedDataset(s.train),
                             eval_dataset=TokenizedDataset(s.evals) if s.evals else None,
                             data_collator=Collator(s.tokenizer.pad_token_id), processing_class=s.tokenizer,
                             callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


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
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {out} holds no tunelab run (no config.yaml)")
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
    return None


def run(cfg: RunConfig, out: Path, *, resume: bool = False, config_dir: Path | None = None) -> dict:
    """Train one run into `out`. Returns the summary (also written to out/summary.json)."""
    t0 = time.perf_counter()
    checkpoint = prepare_run_folder(cfg, out, resume)

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
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "data_stats.json").write_text(json.dumps(s.stats.to_dict(), indent=2, ensure_ascii=False))

    from transformers import set_seed

    set_seed(cfg.train.seed)  # LoRA's A matrices are drawn at wrap time: seed before, not only in Trainer
    model = build_model(s)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    console.print(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")

    # --- train -------------------------------------------------------------------------------
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    args = training_arguments(cfg, out, s.device, s.dtype, has_eval=bool(s.evals))
    trainer = make_trainer(model, args, s)
    if checkpoint is not None:
        console.print(f"resuming from {checkpoint.name}")
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # --- save --------------------------------------------------------------------------------
    final = out / "final"
    trainer.save_model(str(final))
    s.tokenizer.save_pretrained(str(final))
    summary = make_summary(trainer, result, s, out, time.perf_counter() - t0, method)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[green]done[/green]: {summary['global_step']} steps, train loss {summary['train_loss']}, "
                  f"eval loss {summary['eval_loss']}; adapter in {final}")
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
