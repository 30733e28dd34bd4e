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
from transformers import EarlyStoppingCallback, Trainer

from .callbacks import (
    AtMaxSteps,
    CommitCheckpoints,
    FiniteGradients,
    NonFinite,
    NoStepPastMaxSteps,
    OverfitWatch,
    StopOnSignal,
)
from .config import ConfigError, RunConfig, pack_max_tokens, save_config
from .data.packing import PackedCollator, is_packed, packed_attention, split_packed
from .data.pipeline import Collator, DataStats, TokenizedDataset, prepare
from .data.preflight import PreflightError, check_examples
from .distributed import FsdpOnCpu, ShardReport, fsdp_requested
from .fastlora import fuse_lora, fused_layers
from .fsutil import atomic_write_text, commit_dir, is_disk_full, remove_tree
from .loss import chunked_causal_lm_loss
from .models import (
    context_window,
    dtype_warning,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    pick_precision,
    resolve_model,
    write_base_fingerprint,
)
from .precision import fp32_attention, keep_freed_memory, lora_sums_in_fp32
from .rundir import (
    CONFIG,
    FINAL,
    STAGING,
    SUMMARY,
    checkpoints,
    has_weights,
    newest_checkpoint,
    resume_checkpoint,
    saved_step,
)
from .ui import RichProgress, console, warn

log = logging.getLogger("tunelab")


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss, disk full); the message says what is intact."""


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
    if s.device == "cpu" and cfg.train.cpu_keep_freed_memory:
        keep_freed_memory()
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
        p = pick_precision(cfg.model.dtype, s.device)
        # bf16 autocast would round LoRA's small updates away (tunelab/precision.py): bf16-mixed, and bf16 weights
        # on a CPU (peft keeps the adapter fp32 there). Not on a GPU's bf16 weights: its measured speed and
        # memory (BENCHMARKS.md, H200) are kept as they are until measured with it.
        if p.autocast == torch.bfloat16 and (p.weights == torch.float32 or s.device == "cpu"):
            # fused layers too (registered before fusing): their fused path never runs the hook (no cost), peft's
            # fallback does (extra arguments such as a mixed batch's adapter_names), and needs it there
            lora_sums_in_fp32(model)
        if fused_lora_off(cfg, s.device) is None:
            # one matmul per sibling group, bf16 frozen weights, fp32 LoRA sums
            fuse_lora(model)
    return model


def run_pack_max_tokens(s) -> int:
    """data.pack_max_tokens for this run's device and precision (`auto` resolved: config.pack_max_tokens)."""
    return pack_max_tokens(s.cfg.data, s.device, pick_precision(s.cfg.model.dtype, s.device).name)


def fused_lora_off(cfg: RunConfig, device: str) -> str | None:
    """Why build_model leaves peft's LoRA layers as they are (tunelab/fastlora.py); None where it fuses them."""
    if not cfg.lora.enabled:
        return "full fine-tune, no LoRA layers"
    if not cfg.lora.fused:
        return "lora.fused=false"
    if device != "cpu":
        return f"{device}: the fused layers are for CPUs"
    p = pick_precision(cfg.model.dtype, device)
    if p.name != "bf16-mixed":
        return f"{p.name}: the fused layers are for bf16-mixed"
    if cfg.quantization.load_in_4bit:
        return "QLoRA: the 4-bit base keeps peft's layers"
    if fsdp_requested():  # the group's buffer would hold the whole frozen base on every rank; shards are DTensors
        return "FSDP: the frozen weights are sharded"
    return None


def fused_lora_report(model, cfg: RunConfig, device: str) -> dict:
    """summary.json `fused_lora`: what the fused path replaced, counted from the model (fastlora.fused_layers),
    or why peft's layers stayed."""
    counts = fused_layers(model)
    if counts["layers"]:
        return {"enabled": True, **counts}
    reason = fused_lora_off(cfg, device)
    if reason is None:  # fuse_lora ran (or TRL built the adapter) and found no layer it computes
        lc = cfg.lora
        reason = (f"train.method={cfg.train.method}: fused layers are for SFT runs" if cfg.train.method != "sft"
                  else "lora.use_dora=true" if lc.use_dora else f"lora.dropout={lc.dropout} > 0" if lc.dropout > 0
                  else f"lora.bias={lc.bias}" if lc.bias != "none" else "no LoRA layer the fused path computes")
    return {"enabled": False, "reason": reason, **{k: v for k, v in counts.items() if v}}


def fused_lora_line(report: dict) -> str:
    """The run log's line for fused_lora_report."""
    norms = (f", {report['rms_norms']} RMSNorm" if report.get("rms_norms") else "")
    if not report["enabled"]:
        return f"fused LoRA layers: off ({report['reason']})" + (f"; hand-written{norms[1:]}" if norms else "")
    groups = " + ".join(f"{n} {k.replace('_proj', '').replace('+', '/')}" for k, n in report["groups"].items())
    mlps = f", {report['swiglu_mlps']} SwiGLU" if report["swiglu_mlps"] else ""
    return f"fused LoRA layers: {groups} groups ({report['layers']} layers){mlps}{norms} (lora.fused)"


def training_arguments(cfg: RunConfig, out: Path, device: str, dtype: torch.dtype, has_eval: bool,
                       args_class=None, **extra):
    """transformers.TrainingArguments from the run config; `args_class` (a subclass such as TRL's
    DPOConfig) and `extra` (its own fields) serve the methods in tunelab/methods."""
    from transformers import TrainingArguments

    t = cfg.train
    early = cfg.eval.early_stopping_patience > 0
    return (args_class or TrainingArguments)(
        output_dir=str(out / STAGING),  # checkpoints are committed to `out` by callbacks.CommitCheckpoints
        # data.packing: one packed batch per optimizer step, the same examples and the same
        # trained-token normalisation as batch x accumulation (see tunelab/data/packing.py)
        per_device_train_batch_size=(t.per_device_train_batch_size
                                     * (t.gradient_accumulation_steps if cfg.data.packing else 1)),
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
        save_total_limit=None,  # rotation: callbacks.CommitCheckpoints (never deletes the newest/best)
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
        # bf16=True is torch.autocast(bfloat16) through accelerate, on CPU too; with fp32 weights that is
        # bf16-mixed (model.dtype=auto on a native-bf16 CPU, tunelab/models.py pick_precision)
        bf16=dtype == torch.bfloat16 or pick_precision(cfg.model.dtype, device).autocast == torch.bfloat16,
        fp16=dtype == torch.float16 and device == "cuda",
        use_cpu=device == "cpu",
        report_to=list(t.report_to),
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=t.dataloader_num_workers,
        # under a launcher: a rank waiting longer than this on the others ends the run
        # (tunelab train --collective-timeout)
        ddp_timeout=int(os.environ.get("TUNELAB_COLLECTIVE_TIMEOUT", "600")),
        remove_unused_columns=False,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        disable_tqdm=True,
        save_only_model=False,
        # Every trainable parameter (LoRA or full) takes part in each forward pass, so DDP needs no search
        # for unused ones; transformers' default (True for a PeftModel) costs a graph traversal per step
        # and makes every rank print a warning saying so.
        ddp_find_unused_parameters=False,
        **extra,
    )


class TunelabTrainer(FsdpOnCpu, Trainer):
    """transformers' Trainer with tunelab's step: packed rows split by `pack_max_tokens` (gradients
    synchronised once per step), the chunked loss (tunelab/loss.py), a nan/inf loss stop, and
    tokens/s + peak memory on every training log line (TensorBoard and terminal). Only public
    override points (training_step, compute_loss, evaluate, log) are used."""

    def __init__(self, *args, pack_max_tokens: int = 4096, chunked_loss: bool = False, loss_chunk_size: int = 1024,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.pack_max_tokens, self.chunked_loss, self.loss_chunk_size = pack_max_tokens, chunked_loss, loss_chunk_size
        self._tps_mark: tuple[float, int] | None = None
        self.loss_kinds: set[str] = set()  # "chunked" / "stock": how training losses were computed (summary.json)
        self._eval_seconds = 0.0  # evaluation time, kept out of tokens/s

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs.pop("row_index", None)
        if is_packed(inputs):  # split at example boundaries by data.pack_max_tokens; gradients accumulate
            pieces = split_packed(inputs, self.pack_max_tokens)
            loss = 0
            # The packed switch goes on the unwrapped model (a DDP wrapper has no config). Under DDP the
            # ranks may split a step into different numbers of pieces: only the last piece syncs
            # gradients (accelerate's no_sync), so every rank issues the same collectives.
            with packed_attention(self.accelerator.unwrap_model(model)):
                for i, piece in enumerate(pieces):
                    sync = contextlib.nullcontext() if i == len(pieces) - 1 else self.accelerator.no_sync(model)
                    with sync:
                        loss = loss + super().training_step(model, piece, num_items_in_batch)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFinite(f"loss is {loss.item()} at step {self.state.global_step + 1}", rows)
        return loss

    def autocast_smart_context_manager(self, cache_enabled=True):
        # accelerate autocasts model.forward only; the chunked loss calls the decoder directly, so
        # training_step/prediction_step enter the same autocast here (a no-op without mixed precision),
        # with attention in fp32 where its inputs come in fp32 (bf16-mixed; tunelab/precision.py)
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.autocast())
        stack.enter_context(fp32_attention(self.model, enabled=self.accelerator.mixed_precision != "no"))
        return stack

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # train.chunked_loss: logits only where labels exist, in chunks (tunelab/loss.py); eval
        # discards logits unless compute_metrics is set, so it takes the chunked path too. Under DDP the
        # forward runs through the wrapper (which arms the gradient all-reduce) and the head is applied
        # chunked to the final hidden states. FSDP and DeepSpeed keep the stock loss: outside their
        # forward the head's weight may be a shard.
        inner = self.accelerator.unwrap_model(model)
        if self.chunked_loss and (not return_outputs or self.compute_metrics is None) and not self.is_fsdp_enabled \
                and (inner is model or isinstance(model, torch.nn.parallel.DistributedDataParallel)):
            with packed_attention(inner) if is_packed(inputs) else contextlib.nullcontext():
                loss = chunked_causal_lm_loss(inner, inputs, num_items_in_batch, self.loss_chunk_size, wrapper=model)
            if loss is not None:
                if model.training:
                    self.loss_kinds.add("chunked")
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    # num_items_in_batch is then the count over all processes; the Trainer's own
                    # compute_loss scales by the process count the same way (DDP averages gradients,
                    # evaluation averages the per-process losses).
                    loss = loss * self.accelerator.num_processes
                return (loss, {"loss": loss}) if return_outputs else loss
        if model.training:
            self.loss_kinds.add("stock")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

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


def make_trainer(model, args, s: Setup, run_dir: Path | None = None, interactive: bool = True) -> TunelabTrainer:
    """The Trainer for `s`. With `run_dir`, checkpoints are committed there crash-safely (args.output_dir
    must be run_dir/.staging, see training_arguments); `interactive` adds the progress bar, the
    overfitting watch and the signal handler's callback (benchmarks leave them out)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    callbacks = run_callbacks(s.cfg, run_dir, (s.model_folder, s.cfg.model.name), interactive)
    trainer = TunelabTrainer(model=model, args=args, train_dataset=TokenizedDataset(s.train),
                             eval_dataset=TokenizedDataset(s.evals) if s.evals else None,
                             data_collator=(PackedCollator() if s.cfg.data.packing
                                            else Collator(s.tokenizer.pad_token_id)),
                             processing_class=s.tokenizer, callbacks=callbacks,
                             pack_max_tokens=run_pack_max_tokens(s),
                             chunked_loss=s.cfg.train.chunked_loss, loss_chunk_size=s.cfg.train.loss_chunk_size)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_callbacks(cfg: RunConfig, run_dir: Path | None, base: tuple[Path, str] | None = None,
                  interactive: bool = True) -> list:
    """The public-hook policies every run's trainer gets, SFT's and each method's (tunelab/methods): no
    non-finite update reaches the weights, checkpoints committed whole into `run_dir`, progress, the
    overfitting watch, the signal stop, early stopping."""
    callbacks = [FiniteGradients()]
    if run_dir is not None:
        callbacks.append(CommitCheckpoints(run_dir, cfg.train.save_total_limit, base))
    if interactive:
        callbacks += [RichProgress(), OverfitWatch(enabled=cfg.eval.overfit_warning), StopOnSignal()]
    if cfg.eval.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(cfg.eval.early_stopping_patience, cfg.eval.early_stopping_threshold))
    return callbacks


def callback(trainer, cls):
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, cls)), None)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SftRecipe:
    """What `run` does that is SFT's own: tunelab's data pipeline and preflight, its model and Trainer.
    The methods past SFT have theirs in tunelab/methods/run.py (MethodRecipe); the rest of a run (the
    run folder, resume, signals, the fault messages, the final save, summary.json) is `run`'s, for all."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.label = (("QLoRA (4-bit base)" if cfg.quantization.load_in_4bit else "LoRA") if cfg.lora.enabled
                      else "full fine-tune")  # summary.json "method"

    def setup(self, config_dir: Path | None) -> Setup:
        cfg = self.cfg
        s = setup_data(cfg, config_dir)
        report = check_examples(s)  # the preflight's fatal checks run before every training run
        if report.errors:
            raise PreflightError(report.errors[0])
        for w in report.warnings:
            warn(w)
        if s.pad_note:
            console.print(f"[dim]tokenizer: {s.pad_note}[/dim]")
        precision = pick_precision(cfg.model.dtype, s.device)
        dw = dtype_warning(precision.compute, s.device)
        if dw:
            warn(dw)
        console.print(f"precision: {precision.name} ({precision.reason})")
        if cfg.data.packing:
            auto = f" = auto on {s.device}, {precision.name}" if cfg.data.pack_max_tokens == "auto" else ""
            console.print(f"packing: up to {run_pack_max_tokens(s)} tokens per forward pass "
                          f"(data.pack_max_tokens{auto})")
        console.print(f"[bold]tunelab[/bold] {self.label} of {cfg.model.name} on {s.device}, compute dtype "
                      f"{precision.name}; {s.stats.train_rows} train / {s.stats.eval_rows} eval rows")
        console.print(f"[dim]{_plan_call('memory_line', cfg, s) or 'plan: no estimate for this model'}[/dim]")
        return s

    def trainer(self, s: Setup, out: Path):
        model = build_model(s)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        console.print(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")
        args = training_arguments(self.cfg, out, s.device, s.dtype, has_eval=bool(s.evals))
        return make_trainer(model, args, s, run_dir=out)

    def data_stats(self, s: Setup) -> dict:
        return s.stats.to_dict()

    def base_folder(self, s: Setup) -> Path | None:
        """The base whose fingerprint goes beside the saved model (None: not written)."""
        return s.model_folder

    def summarize(self, trainer, s: Setup, summary: dict) -> None:
        pass

    def before_save(self, trainer) -> None:
        pass

    def done(self, trainer, s: Setup, summary: dict, final: Path) -> None:
        before = (f"{summary['first_eval_loss']} at step {summary['first_eval_step']} -> "
                  if summary["first_eval_step"] is not None and summary["first_eval_step"] < summary["global_step"]
                  else "")
        console.print(f"[green]done[/green]: {summary['global_step']} steps, train loss {summary['train_loss']}, "
                      f"eval loss {before}{summary['eval_loss']}; model in {final}")


def run(cfg: RunConfig, out: Path, *, resume: bool = False, config_dir: Path | None = None) -> dict:
    """Train one run into `out`, any train.method. Returns the summary (also written to out/summary.json)."""
    t0 = time.perf_counter()
    # Under accelerate/torchrun every process runs this; only the main one checks and writes the run folder.
    main = int(os.environ.get("RANK", "0")) == 0
    checkpoint = resume_checkpoint(cfg, out, resume) if main else (newest_checkpoint(out) if resume else None)
    step = saved_step(checkpoint) if checkpoint is not None and cfg.train.max_steps > 0 else None
    if step is not None and step > cfg.train.max_steps:
        raise ConfigError(f"--resume: {out} is already at step {step} ({checkpoint.name}), past "
                          f"train.max_steps={cfg.train.max_steps}; to train further pass a larger "
                          f"--set train.max_steps=N")
    at_end = step == cfg.train.max_steps
    if at_end and has_weights(out / FINAL) and (out / SUMMARY).exists():
        console.print(f"--resume: {out} finished at step {cfg.train.max_steps} ({FINAL}/ written); nothing to do "
                      f"(to train further pass a larger --set train.max_steps=N)")
        return json.loads((out / SUMMARY).read_text())

    # --- setup -------------------------------------------------------------------------------
    if cfg.train.method == "sft":
        recipe = SftRecipe(cfg)
    else:  # DPO, GRPO, KTO, ORPO, SimPO, reward, classify: TRL's trainers, tunelab/methods
        from .methods.run import MethodRecipe

        recipe = MethodRecipe(cfg)
    s = recipe.setup(config_dir)
    from transformers import set_seed

    set_seed(cfg.train.seed)  # LoRA's A matrices are drawn at wrap time: seed before, not only in Trainer
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    # before anything is written: a model that won't load or a trainer that refuses leaves no run folder
    trainer = recipe.trainer(s, out)
    console.print(fused_lora_line(fused_lora_report(trainer.model, cfg, s.device)))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / CONFIG)
        atomic_write_text(out / "data_stats.json", json.dumps(recipe.data_stats(s), indent=2, ensure_ascii=False))
        remove_tree(out / STAGING)  # the Trainer creates its output_dir up front; it exists only during a save

    # --- train -------------------------------------------------------------------------------
    if checkpoint is not None:
        console.print(f"resuming from {checkpoint.name}")
    stop = callback(trainer, StopOnSignal)
    previous = {sig: signal.signal(sig, stop.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    if at_end:  # killed after its last checkpoint, before the final save: no step more (NoStepPastMaxSteps)
        trainer.add_callback(NoStepPastMaxSteps())
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except AtMaxSteps:  # the checkpoint's weights and state are loaded: they are the final model
        from transformers.trainer_utils import TrainOutput

        result = TrainOutput(trainer.state.global_step, float("nan"), {"train_runtime": 0.0})
    except torch.OutOfMemoryError as e:  # CUDA OOM: the plan's advice, not a traceback
        last = newest_checkpoint(out)
        advice = _plan_call("oom_advice", cfg, s) or "lower train.per_device_train_batch_size or data.max_seq_length"
        raise TrainingError(f"out of memory on {s.device} at step {trainer.state.global_step + 1} "
                            f"({str(e).splitlines()[0][:120]}); {advice}; last checkpoint: "
                            f"{last.name if last else 'none'}") from None
    except NonFinite as e:
        last = newest_checkpoint(out)
        rows = ""
        if e.rows is not None:
            wheres = [s.train[i].where for i in e.rows.tolist() if s.train[i].where]
            rows = f" in the batch of rows {', '.join(wheres[:4])}" if wheres else ""
        raise TrainingError(f"{e.what}{rows}: training stopped, the bad update was not applied or saved; "
                            f"last good checkpoint: {last.name if last else 'none'} (try a lower "
                            f"train.learning_rate{' or check those rows' if e.rows is not None else ''})") from None
    except Exception as e:
        if (out / STAGING).exists():
            raise save_failed(e, out, main) from None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and _is_collective_failure(e):
            raise TrainingError(f"process {os.environ.get('RANK', '?')} stopped: waiting on the other processes "
                                f"failed ({str(e).splitlines()[0][:160]}); a collective waits at most "
                                f"{trainer.args.ddp_timeout}s (tunelab train --collective-timeout). Another process "
                                f"died or hangs: see its message above") from None
        raise
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)

    # --- save --------------------------------------------------------------------------------
    summary = make_summary(trainer, result, s, out, time.perf_counter() - t0, recipe.label)
    recipe.summarize(trainer, s, summary)
    if stop.signum is not None:
        summary["status"] = "interrupted"
        summary["signal"] = signal.Signals(stop.signum).name
        summary["early_stopped"] = False
    else:
        final, staging = out / FINAL, out / ".staging-final"
        recipe.before_save(trainer)
        try:  # every process calls save_model (sharded setups gather collectively); the main one writes
            save_final_model(trainer, staging, main)
            if main:
                s.tokenizer.save_pretrained(str(staging))
                if recipe.base_folder(s) is not None:
                    write_base_fingerprint(staging, recipe.base_folder(s), cfg.model.name)
                commit_dir(staging, final)
        except Exception as e:
            if main:
                remove_tree(staging)
            if is_disk_full(e):
                raise TrainingError(f"disk full while saving {final}; the checkpoints are intact") from None
            raise
        trainer.accelerator.wait_for_everyone()
        recipe.done(trainer, s, summary, final)
    if main:
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2))
    return summary


def save_final_model(trainer: Trainer, folder: Path, main: bool) -> None:
    """The final model (adapter or full weights) in the ordinary Hugging Face layout. Under FSDP the full
    state dict is gathered here (a collective: every process calls it) and the main process saves it,
    because the Trainer's save_model writes no model file at all for fsdp_state_dict_type
    SHARDED_STATE_DICT, and for FULL_STATE_DICT it writes tied weights twice (the gathered state dict
    holds a copy per name, so save_pretrained's pointer-based dedupe misses them). Checkpoints keep the
    Trainer's (FSDP's) own layout."""
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(folder))
        return
    state = trainer.accelerator.get_state_dict(trainer.model)
    if main:
        model = trainer.accelerator.unwrap_model(trainer.model)
        tied: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(p), []).append(name)
        for names in tied.values():  # one tensor for all the names of one parameter, as without FSDP
            for name in names[1:]:
                if names[0] in state and name in state:
                    state[name] = state[names[0]]
        model.save_pretrained(str(folder), state_dict=state)


def _is_collective_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return any(k in text for k in ("timed out", "timeout", "connection closed by peer", "connection reset"))


def save_failed(e: Exception, out: Path, main: bool) -> TrainingError:
    """A checkpoint write (into out/.staging) failed: drop it and say what is intact."""
    # torch.save reports a full disk as "iostream error"/"unexpected pos", not ENOSPC: look at the
    # free space (before cleaning up) to say what happened.
    free = shutil.disk_usage(out).free
    staging = out / STAGING
    name = next((p.name for p in staging.glob("checkpoint-*")), "a checkpoint") if staging.is_dir() else "a checkpoint"
    if main:
        remove_tree(staging)
    prev = newest_checkpoint(out)
    intact = f"the previous checkpoint {prev.name} is intact" if prev else "no earlier checkpoint exists"
    if is_disk_full(e) or free < 1 << 20:
        return TrainingError(f"disk full while saving {name} in {out} ({free // 1024} KiB free); {intact}; "
                             f"free space and resume with --resume")
    return TrainingError(f"saving {name} in {out} failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                         f"{intact}")


def _plan_call(name: str, cfg: RunConfig, s: Setup) -> str | None:
    """tunelab plan's one-line memory estimate / OOM advice. Never lets the planner break training."""
    try:
        from . import plan

        return getattr(plan, name)(cfg, s.train, s.device)
    except Exception as e:  # an unknown architecture, an odd config.json: training goes on without the line
        log.debug("plan: %s failed: %s", name, e)
        return None


def make_summary(trainer, result, s: Setup, out: Path, wall: float, method: str) -> dict:
    hist = trainer.state.log_history
    train_losses = [h["loss"] for h in hist if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    overfit = callback(trainer, OverfitWatch)
    early = callback(trainer, EarlyStoppingCallback)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

    def rnd(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 5)

    return {
        "status": "completed",
        "method": method,
        "model": s.cfg.model.name,
        "device": s.device,
        "compute_dtype": pick_precision(s.cfg.model.dtype, s.device).name,  # bf16-mixed: fp32 weights, bf16 matmuls
        "precision": pick_precision(s.cfg.model.dtype, s.device).to_dict(),
        # the fused LoRA layers (tunelab/fastlora.py) counted from the model, or why peft's stayed
        "fused_lora": fused_lora_report(trainer.model, s.cfg, s.device),
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
        # the early-stopping callback ended the run (not a signal, not the end of the data)
        "early_stopped": bool(early and early.early_stopping_patience_counter >= early.early_stopping_patience),
        "overfitting_warning": overfit.message if overfit else None,
        "wall_time_s": round(wall, 2),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "peak_gpu_gib": round(peak_gpu, 3) if peak_gpu is not None else None,
        "checkpoints": [p.name for p in checkpoints(out)],
        # how the training loss was computed: "chunked" (tunelab/loss.py) or "stock" (the model's own)
        "loss_computation": "+".join(sorted(getattr(trainer, "loss_kinds", ()))) or None,
        # data.packing: most tokens per forward pass (data.pack_max_tokens, `auto` resolved for device and precision)
        "pack_max_tokens": run_pack_max_tokens(s) if s.cfg.data.packing else None,
        # FSDP: each process's share of the parameters (tunelab/distributed.py), else None
        "fsdp": shards.report if (shards := callback(trainer, ShardReport)) else None,
        "pad_token": s.tokenizer.pad_token,
        "eos_token": s.tokenizer.eos_token,
    }
