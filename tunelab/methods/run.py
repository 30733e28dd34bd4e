"""`train.method` past SFT: the same run folder, preflight, crash-safe checkpoints, resume, NaN stop
and signals as SFT (tunelab/train.py), with a TRL trainer doing the method's loss.

Nothing here computes a loss by hand: DPO is trl.DPOTrainer, KTO trl.KTOTrainer, ORPO and SimPO
trl.experimental (ORPOTrainer, CPOTrainer with loss_type=simpo), GRPO trl.GRPOTrainer, the reward
model trl.RewardTrainer; classify is transformers' Trainer on AutoModelForSequenceClassification.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..callbacks import NonFinite
from ..config import ConfigError, RunConfig
from ..models import (
    ModelError,
    check_adapter_base,
    context_window,
    dtype_warning,
    find_run,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)
from ..rundir import run_config
from ..train import Setup, build_model, prepare_quantized, run_callbacks, training_arguments
from ..ui import console, warn

LOGGED = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "reward", "reward_std",
          "kl", "accuracy", "eval_rewards/margins", "eval_rewards/accuracies", "eval_accuracy")


# ---------------------------------------------------------------------------------------------
# Where training starts: a base model, or a finished run (SFT -> DPO/GRPO)


@dataclass
class Start:
    base_folder: Path
    """The weights the run loads (the root base, or a fully fine-tuned run's model)."""
    adapter: Path | None
    """An adapter to start from (a LoRA run's final adapter), or None for a fresh one."""
    tok_folder: Path
    run: Path | None


def resolve_start(spec: str, revision: str | None = None) -> Start:
    """`model.name` may be a tunelab run folder: its model (base + adapter, or full weights) is the start
    point. Runs chain (GRPO from DPO from SFT): an adapter continued from an earlier adapter is complete
    on the root base, so only the newest adapter is applied."""
    p = Path(spec).expanduser()
    if not (p.is_dir() and (p / "config.yaml").is_file()):
        folder = resolve_model(spec, revision)
        return Start(folder, None, folder, None)
    run, weights = find_run(p)
    rc = run_config(run)
    if (weights / "config.json").is_file() and not (weights / "adapter_config.json").is_file():
        return Start(weights, None, weights, run)  # a full fine-tune: its weights are the new base
    parent = rc.model.name
    if not parent:
        raise ModelError(f"model.name {spec}: the run's config.yaml names no model")
    inner = resolve_start(parent, rc.model.revision)
    try:
        check_adapter_base(weights, inner.base_folder)
    except ModelError as e:
        raise ModelError(f"model.name {spec}: that run was trained on a different base model than its config "
                         f"names ({parent}): {e}") from None
    tok_folder = weights if (weights / "tokenizer_config.json").is_file() else inner.tok_folder
    return Start(inner.base_folder, weights, tok_folder, run)


# ---------------------------------------------------------------------------------------------
# Setup: tokenizer and data for the method (shared with `tunelab check`)


@dataclass
class MethodSetup(Setup):
    start: Start | None = None
    data_stats: dict | None = None
    report: list | None = None


def setup_method(cfg: RunConfig, config_dir: Path | None = None) -> MethodSetup:
    from ..data import preference as pref

    method = cfg.train.method
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    start = resolve_start(cfg.model.name, cfg.model.revision)
    if method in ("reward", "classify") and start.adapter is not None:
        raise ConfigError(f"model.name {cfg.model.name}: train.method={method} trains a classification head and "
                          f"can't start from a causal-LM adapter run; start from the base model")
    ctx = context_window(start.base_folder)
    if ctx and cfg.data.max_seq_length > ctx:
        raise ConfigError(f"data.max_seq_length={cfg.data.max_seq_length} is above the model's context window "
                          f"({ctx} tokens)")
    tok, note = load_tokenizer(start.tok_folder, cfg.model.pad_token)
    d = cfg.data
    report: list[str] = []
    if method in ("dpo", "orpo", "simpo", "reward"):
        train, evals, stats, samples = pref.load_pairs(d, tok, config_dir)
        report = pref.pair_report(stats, d)
    elif method == "kto":
        train, evals, stats = pref.load_unpaired(d, tok, config_dir)
        samples = []
    elif method == "grpo":
        train, evals, stats = pref.load_prompts(d, tok, config_dir)
        samples = []
    elif method == "classify":
        from .classify import load_labelled

        train, evals, stats = load_labelled(cfg, tok, config_dir)
        samples = []
    else:  # pragma: no cover - validated in config
        raise ConfigError(f"train.method={method} is not supported here")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ConfigError(f"pad token == EOS ({tok.eos_token!r}); set model.pad_token to another token")
    s = MethodSetup(cfg, start.base_folder, device, dtype, tok, note, train, evals, stats, samples)
    s.start, s.data_stats, s.report = start, stats.to_dict(), report
    return s


def check_method(cfg: RunConfig, config_path: str, warnings: list[str], examples: int = 1) -> int:
    """`tunelab check` for a method run: data layout, pair checks, reward functions; no weights loaded."""
    from ..data.preflight import show_tokens

    s = setup_method(cfg, Path(config_path).resolve().parent)
    st = s.data_stats
    console.print(f"[bold]tunelab check[/bold] {config_path}: train.method={cfg.train.method}, model "
                  f"{cfg.model.name} -> {s.start.base_folder}"
                  + (f" + adapter {s.start.adapter}" if s.start.adapter else ""))
    console.print(f"rows: read {st['rows_read']}, train {st['train_rows']}, eval {st['eval_rows']}, dropped "
                  f"{sum(st['dropped'].values())}")
    if cfg.train.method in ("dpo", "orpo", "simpo", "reward"):
        console.print(f"pairs: chosen {st['chosen_tokens_mean']} tokens on average, rejected "
                      f"{st['rejected_tokens_mean']} (chosen longer in {st['chosen_longer_share']:.0%}); longest "
                      f"prompt {st['prompt_tokens_max']} of max_seq_length {cfg.data.max_seq_length}; "
                      f"{st['unfair_truncation']} cut unfairly, {st['both_truncated']} both truncated")
        for ex in s.train[: max(0, examples)]:
            console.print("[bold]example[/bold] (prompt dim, responses as trained, special tokens as ⟦...⟧):")
            console.print(f"[dim]{show_tokens(s.tokenizer, ex.prompt_ids)}[/dim]", soft_wrap=True)
            console.print(f"[green]chosen ▶[/green]{show_tokens(s.tokenizer, ex.chosen_ids)}", soft_wrap=True)
            console.print(f"[red]rejected ▶[/red]{show_tokens(s.tokenizer, ex.rejected_ids)}", soft_wrap=True)
    if cfg.train.method == "grpo":
        from .grpo import build_rewards

        build_rewards(cfg, s, Path(config_path).resolve().parent)
        console.print(f"rewards: {', '.join(cfg.grpo.rewards)} (each ran on the first rows' reference answers)")
    dw = dtype_warning(s.dtype, s.device)
    for w in warnings + s.report + ([dw] if dw else []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print("[green]preflight passed[/green]")
    return 0


# ---------------------------------------------------------------------------------------------
# The guard every method's trainer gets: crash-safe checkpoints, NaN stop


class Guarded:
    """Mixed in before a TRL trainer class: the checks and the crash-safe save of tunelab's own Trainer."""

    def training_step(self, *args, **kwargs):
        try:
            loss = super().training_step(*args, **kwargs)
        except RuntimeError as e:
            # GRPO samples inside the step (GRPOTrainer._prepare_inputs): once the logits overflow, torch's
            # multinomial raises this before any loss exists. It is the same fault as a nan loss: one line.
            if "probability tensor contains either `inf`, `nan`" not in str(e):
                raise
            raise NonFinite(f"the next-token probabilities are nan/inf while sampling at step "
                            f"{self.state.global_step + 1}", None) from None
        if not torch.isfinite(loss).all():
            raise NonFinite(f"loss is {loss.item()} at step {self.state.global_step + 1}", None)
        return loss


def callbacks(cfg: RunConfig, out: Path) -> list:
    """The callbacks tunelab's own Trainer gets (train.run_callbacks): FiniteGradients, CommitCheckpoints
    into `out`, progress, overfitting watch, the signal stop, early stopping."""
    return run_callbacks(cfg, out)


def args_for(cfg: RunConfig, out: Path, s: MethodSetup, args_class, **extra):
    # TRL's configs default to bf16=True and gradient_checkpointing=True; training_arguments passes
    # tunelab's own values (bf16 only when model.dtype resolved to bfloat16: fp32 on CPU).
    return training_arguments(cfg, out, s.device, s.dtype, has_eval=bool(s.evals), args_class=args_class, **extra)


def load_causal(s: MethodSetup):
    """(model, peft_config) for a TRL trainer. A fresh LoRA goes as peft_config with the bare base, so
    TRL's reference is the base with the adapter disabled; a start run's adapter is loaded trainable
    (TRL then keeps a frozen copy of it as the reference); a full fine-tune has no adapter."""
    import copy

    cfg = s.cfg
    if s.start.adapter is None:
        if not cfg.lora.enabled:
            return build_model(s), None
        from peft import LoraConfig

        bare = copy.copy(s)
        bare.cfg = copy.deepcopy(cfg)
        bare.cfg.lora.enabled = False  # build_model: load (4-bit prep for QLoRA), no adapter
        lc = cfg.lora
        return build_model(bare), LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
                                             task_type="CAUSAL_LM", target_modules=list(lc.target_modules),
                                             use_dora=lc.use_dora)
    from peft import PeftModel

    from ..models import load_model

    q = cfg.quantization
    model = load_model(s.start.base_folder, s.tokenizer, dtype=s.dtype, device=s.device,
                       load_in_4bit=q.load_in_4bit, quant_type=q.quant_type, double_quant=q.double_quant,
                       compute_dtype=s.dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype),
                       attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    if q.load_in_4bit:
        prepare_quantized(model, cfg.train.gradient_checkpointing, cfg.train.gradient_checkpointing_use_reentrant)
    try:
        model = PeftModel.from_pretrained(model, str(s.start.adapter), is_trainable=True)
    except Exception as e:
        raise ModelError(f"adapter {s.start.adapter} can't be applied ({str(e).splitlines()[0][:200]})") from None
    console.print(f"[dim]starting from {s.start.adapter} (its LoRA settings; the lora: section is not used)[/dim]")
    return model, None


# ---------------------------------------------------------------------------------------------
# train.run's part for these methods (the run itself, one for every method, is tunelab/train.py's)


class MethodRecipe:
    """train.run's part for a method past SFT (train.SftRecipe is SFT's): the data for the method, a TRL
    trainer with tunelab's guards, and what the summary adds (rewards, margins, held-out accuracy)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.method = cfg.train.method
        self.label = self.method  # set to "dpo (LoRA)" etc. once the start point is known

    def setup(self, config_dir: Path | None) -> MethodSetup:
        s = setup_method(self.cfg, config_dir)
        self.config_dir = config_dir
        for w in s.report:
            warn(w)
        if s.pad_note:
            console.print(f"[dim]tokenizer: {s.pad_note}[/dim]")
        dw = dtype_warning(s.dtype, s.device)
        if dw:
            warn(dw)
        return s

    def trainer(self, s: MethodSetup, out: Path):
        cfg, method = self.cfg, self.method
        if method == "grpo":
            from .grpo import build_rewards, make_grpo_trainer

            # every reward runs once here: a broken one fails before anything is written
            rewards = build_rewards(cfg, s, self.config_dir)
            model, peft_config = load_causal(s)
            make = lambda m, a: make_grpo_trainer(m, a, s, rewards, peft_config)  # noqa: E731
        elif method == "classify" or method == "reward":
            from .classify import load_seq_cls, make_classify_trainer, make_reward_trainer

            model = load_seq_cls(s, num_labels=1 if method == "reward" else len(s.stats.labels))
            make = (lambda m, a: make_reward_trainer(m, a, s)) if method == "reward" else \
                (lambda m, a: make_classify_trainer(m, a, s))
        else:
            from .preference import make_preference_trainer

            model, peft_config = load_causal(s)
            make = lambda m, a: make_preference_trainer(m, a, s, peft_config)  # noqa: E731
        kind = (("QLoRA" if cfg.quantization.load_in_4bit else "LoRA") if cfg.lora.enabled or s.start.adapter
                else "full")
        self.label = f"{method} ({kind})"
        console.print(f"[bold]tunelab[/bold] {method.upper()} ({kind}) of {cfg.model.name} on {s.device}, compute "
                      f"dtype {str(s.dtype).replace('torch.', '')}; {s.stats.train_rows} train / "
                      f"{s.stats.eval_rows} eval rows")
        return make(model, out)

    def data_stats(self, s: MethodSetup) -> dict:
        return s.data_stats

    def base_folder(self, s: MethodSetup) -> Path | None:
        return s.start.base_folder if self.cfg.lora.enabled or s.start.adapter is not None else None

    def summarize(self, trainer, s: MethodSetup, summary: dict) -> None:
        summary["train_method"] = self.method
        hist = trainer.state.log_history
        for key in LOGGED:
            vals = [h[key] for h in hist if key in h and isinstance(h[key], (int, float))]
            if vals:
                summary[f"first_{key}"], summary[f"last_{key}"] = round(vals[0], 5), round(vals[-1], 5)

    def before_save(self, trainer) -> None:
        model = trainer.model
        if hasattr(model, "peft_config") and "ref" in model.peft_config:
            model.delete_adapter("ref")  # TRL's frozen copy of the start adapter (the DPO reference): not the result

    def done(self, trainer, s: MethodSetup, summary: dict, final: Path) -> None:
        if self.method == "classify" and s.evals:
            from .classify import held_out_accuracy

            summary.update(held_out_accuracy(trainer, s))
            console.print(f"held-out accuracy {summary['eval_accuracy']:.1%} (95% CI "
                          f"{summary['eval_accuracy_ci95'][0]:.1%}-{summary['eval_accuracy_ci95'][1]:.1%}, "
                          f"{summary['eval_rows']} rows; majority label {summary['eval_majority_label_share']:.1%})")
        shown = {k: summary.get(f"last_{k}") for k in ("rewards/margins", "rewards/accuracies", "reward", "accuracy")
                 if summary.get(f"last_{k}") is not None}
        console.print(f"[green]done[/green]: {summary['global_step']} steps, train loss {summary['train_loss']}"
                      + "".join(f", {k} {summary.get('first_' + k)} -> {v}" for k, v in shown.items())
                      + f"; model in {final}")
