"""Typed run configuration: the dataclasses below are at once the YAML schema and the `--set` CLI.

A run is one YAML file with the sections `model`, `data`, `lora`, `quantization`, `train`, `eval`.
Every field is documented where it is declared. Loading is strict: an unknown key, a value of the
wrong type or an impossible combination is a one-line `ConfigError` naming the file and line (or
the `--set` flag), raised before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .methods.sections import (
    METHODS,
    ClassifyConfig,
    DpoConfig,
    GrpoConfig,
    KtoConfig,
    OrpoConfig,
    SimpoConfig,
    check_sections,
)
from .methods.sections import (
    SECTIONS as METHOD_SECTIONS,
)


class ConfigError(ValueError):
    """A user mistake in a config file or flag. The CLI prints it as one line and exits 2."""


LLAMA_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """`smollm2-135m` (embedded), a local HF folder, a .gguf file, or a hub id (needs the network)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    dtype: str = "auto"
    """Weights/compute dtype: auto, float32, bfloat16, float16, or bf16-mixed (fp32 weights and optimizer state,
    bf16 matmuls under autocast). auto: bf16 on a GPU that has it; bf16-mixed on a CPU with native bf16
    (AVX512_BF16/AMX); float32 on a CPU that would emulate bf16."""
    pad_token: str = "auto"
    """Pad token. auto keeps the tokenizer's pad if it differs from EOS, otherwise picks an unused special token."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, flash_attention_2."""
    device: str = "auto"
    """auto, cpu or cuda."""
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    path: str = ""
    """A .jsonl/.json/.csv/.parquet file, a datasets folder saved with save_to_disk, or a hub id."""
    split: str = "train"
    format: str = "alpaca"
    """alpaca (instruction/input/output), chat (messages with role/content), sharegpt (conversations with
    from/value; human/gpt/system roles), prompt_completion."""
    template: str = "alpaca"
    """Prompt template: alpaca (RECIPE.md text), chat_template (the tokenizer's), or plain (prompt as is)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Map of tunelab field -> column in your data, e.g. {instruction: Q, output: A}."""
    system_prompt: str | None = None
    """System message for the chat_template template (alpaca/plain ignore it)."""
    train_on: str = "all_assistant"
    """Multi-turn chat: train every assistant turn (all_assistant, TRL's assistant_only_loss) or only
    the last one (last_assistant; earlier turns are context)."""
    shuffle: bool = True
    seed: int = 42
    only_empty_input: bool = False
    """Keep only rows whose `input` is empty (the recipe does this)."""
    max_rows: int | None = None
    """Use only the first N rows (after shuffling)."""
    test_size: float = 0.0
    """Fraction held out for evaluation (train_test_split with `seed`)."""
    eval_path: str | None = None
    """A separate evaluation file instead of `test_size`."""
    max_seq_length: int = 2048
    """Longer examples are truncated at this many tokens."""
    skip_bad_rows: bool = False
    """Drop rows with a field missing, null or of the wrong type (counted in `tunelab check`'s stats)
    instead of stopping at the first one with its file:line."""
    drop_untrainable: bool = False
    """Drop examples whose response is cut away entirely by truncation (default: refuse to train)."""
    num_proc: int = 1
    """Processes for tokenization (the recipe's dataset_num_proc)."""
    packing: bool = False
    """Padding-free packing: each optimizer step's examples (batch size x accumulation, the same
    ones as unpacked) go end to end in one row, positions restarting per example, attention never
    crossing one; same gradient, no padding computed, larger matrix products (faster on CPU)."""
    pack_max_tokens: int | str = "auto"
    """With packing: most tokens per forward pass; a longer step is split at example boundaries
    into several passes (gradient accumulation): the same gradients, less activation memory. `auto`:
    on a CPU 1024 (3.1-3.2x the recipe's stack at 0.86-0.89x its memory with bf16-mixed; pieces of 4096
    were another 1.1-1.2x faster at 1.5-1.7x the memory), 512 where the run computes in float32 (an
    AVX2-only CPU: fp32 keeps 1.7x the bytes per token; 25.6x the recipe's stack at 0.92x its memory,
    1,024 28.1x at 1.35x); 4096 on a GPU (BENCHMARKS.md has the measured trade-offs)."""
    min_response_chars: int | None = None
    """Drop rows whose response is shorter than this many characters (as `tunelab data filter`)."""
    max_response_chars: int | None = None
    """Drop rows whose response is longer than this many characters."""
    scripts: list[str] = field(default_factory=list)
    """Keep only rows whose main script is one of these: Latin, Hangul, Han, Kana, Cyrillic, ... (empty = all)."""
    drop_response_repeats_instruction: bool = False
    """Drop rows whose response is, or starts by echoing, the instruction."""
    refusal_phrases: str | None = None
    """A text file of refusal phrases (one a line, # comments); rows whose response holds one are dropped."""
    sources: list[Any] = field(default_factory=list)
    """Several files mixed instead of `path`: a list of {path, weight or rows, format?, fields?, split?},
    interleaved by weight (datasets.interleave_datasets) or taken by row count, reproducibly by `seed`."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """false = full fine-tune."""
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    bias: str = "none"
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LORA_MODULES))
    use_dora: bool = False
    fused: bool = True
    """bf16-mixed on a CPU: compute sibling LoRA projections (q/k/v, gate/up) in one matmul with the frozen
    weights in bf16 and LoRA's sums in fp32 (tunelab/fastlora.py); false = peft's own layers."""


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = False
    """QLoRA: load the base in 4 bit with bitsandbytes."""
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    """bnb_4bit_compute_dtype: auto (same as model.dtype), float32, bfloat16, float16."""


@dataclass
class TrainConfig:
    """Names are transformers.TrainingArguments names and mean the same."""

    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    max_steps: int = 100
    """Optimizer steps; -1 trains `num_train_epochs` epochs instead."""
    num_train_epochs: float = 1.0
    eval_steps: int = 10
    save_steps: int = 50
    logging_steps: int = 1
    optim: str = "adamw_torch"
    weight_decay: float = 0.01
    lr_scheduler_type: str = "constant_with_warmup"
    seed: int = 42
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    gradient_checkpointing_use_reentrant: bool = True
    group_by_length: bool = False
    """Batch examples of similar length together (less padding without packing; changes the data order)."""
    chunked_loss: bool = True
    """Compute logits and cross-entropy only where labels exist, chunk by chunk, never the whole
    [batch, seq, vocab] logits tensor (falls back to the model's own loss for unsupported models)."""
    loss_chunk_size: int = 256
    """Rows of logits per chunk for chunked_loss (memory: chunk x vocab x 4 bytes; 256: SmolLM2's 49,152-token
    vocabulary at 1,024-token pieces peaked 0.33-0.38 GiB lower than at 1024; speed 0.93x and 1.15x in two
    runs, i.e. within this host's noise: BENCHMARKS.md)."""
    cpu_keep_freed_memory: bool = True
    """CPU, glibc: keep freed memory in the process for reuse (mallopt) instead of handing large blocks back
    to the kernel, whose fresh pages each cost a page fault when a step allocates them again."""
    save_total_limit: int | None = None
    dataloader_num_workers: int = 0
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    method: str = "sft"
    """sft, dpo, orpo, kto, simpo, grpo, reward or classify; method settings live in their own section
    (dpo:, kto:, orpo:, simpo:, grpo:, classify:), see tunelab/methods/sections.py."""


@dataclass
class EvalConfig:
    early_stopping_patience: int = 0
    """Stop after this many evaluations without an eval-loss improvement (0 = off)."""
    early_stopping_threshold: float = 0.0
    overfit_warning: bool = True
    """Warn when eval loss rises while train loss falls."""
    eval_on_start: bool = False
    tasks: list[str] = field(default_factory=list)
    """Benchmark tasks the run will be judged on (as `tunelab eval --tasks`: arc_easy, mmlu, gsm8k, a .yaml);
    `tunelab check` warns when the training data holds their items (13-gram overlap)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every section, except the method sections of other methods (a saved run config or `tunelab
        config`'s output is a valid config: another method's section there is an error)."""
        others = set(METHOD_SECTIONS) - {self.train.method}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in others}


# ---------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, strict typing, --set overrides.

CHOICES = {
    "model.dtype": ["auto", "float32", "bfloat16", "float16", "bf16-mixed"],
    "model.device": ["auto", "cpu", "cuda"],
    "model.attn_implementation": ["sdpa", "eager", "flash_attention_2"],
    "data.format": ["alpaca", "chat", "sharegpt", "prompt_completion"],
    "data.template": ["alpaca", "chat_template", "plain"],
    "data.train_on": ["all_assistant", "last_assistant"],
    "lora.bias": ["none", "all", "lora_only"],
    "quantization.quant_type": ["nf4", "fp4"],
    "quantization.compute_dtype": ["auto", "float32", "bfloat16", "float16"],
    "train.lr_scheduler_type": ["constant_with_warmup", "linear", "cosine", "constant",
                                "cosine_with_restarts", "polynomial", "inverse_sqrt"],
    "train.method": METHODS,
    "train.optim": ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit",
                    "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"],
}
DATA_FIELDS = ["instruction", "input", "output", "messages", "conversations", "prompt", "completion", "chosen",
               "rejected", "label"]


def _fail(where: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{where}: {msg}" if where else msg)


def _compose_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every key, as dotted paths."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        _fail(f"{source}{line}", f"malformed YAML: {problem}")
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                line = k.start_mark.line + 1
                if key in seen:  # PyYAML would keep the last silently; a second `train:` drops the first's keys
                    what = "section" if not prefix else "key"
                    _fail(f"{source}:{line}", f"duplicate {what} '{key}' (first at line {seen[key]}); "
                          f"merge the two into one")
                seen[key] = line
                lines[key] = line
                walk(v, key)

    if node is not None:
        walk(node, "")
    data = yaml.safe_load(text) if node is not None else {}
    return data, lines


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:  # structured values checked by their own validator (data.sources)
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args[:-1]:  # int | str: an integer, else the string (`auto`)
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        return _coerce(value, args[-1], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(where, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(where, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(where, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(where, f"expected a string, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            _fail(where, f"expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(where, f"expected a mapping, got {value!r}")
        return {str(k): _coerce(v, str, where) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _apply(cfg: RunConfig, data: Any, where_of) -> None:
    """Write a nested dict onto cfg, strictly. where_of(dotted) -> 'file:line' for messages."""
    if data is None:
        return
    if not isinstance(data, dict):
        _fail(where_of(""), "a run config must be a mapping of sections (model, data, lora, ...)")
    sections = _field_types(RunConfig)
    for sec, body in data.items():
        if sec not in sections:
            _fail(where_of(sec), f"unknown section '{sec}'{_did_you_mean(str(sec), sections)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            _fail(where_of(sec), f"section '{sec}' must be a mapping of keys")
        obj = getattr(cfg, sec)
        types_ = _field_types(type(obj))
        for key, value in body.items():
            dotted = f"{sec}.{key}"
            if key not in types_:
                _fail(where_of(dotted), f"unknown key '{dotted}'{_did_you_mean(str(key), types_)}")
            setattr(obj, key, _coerce(value, types_[key], where_of(dotted) + f": {dotted}"))


def validate(cfg: RunConfig, where_of=lambda k: k, written: set[str] | None = None) -> list[str]:
    """Check values that a type can't express. Returns warnings; raises ConfigError on errors.
    `written`: the dotted keys the file and --set flags hold (a method section's presence is checked)."""
    warnings: list[str] = []
    for dotted, options in CHOICES.items():
        sec, key = dotted.split(".")
        value = getattr(getattr(cfg, sec), key)
        if value not in options:
            _fail(where_of(dotted), f"{dotted}={value!r} is not one of: {', '.join(options)}"
                  + (_did_you_mean(value, options).replace(" (known:", " (choose from:")
                     if isinstance(value, str) and difflib.get_close_matches(value, options, n=1, cutoff=0.6)
                     else ""))
    d, lo, q, t, e = cfg.data, cfg.lora, cfg.quantization, cfg.train, cfg.eval

    def positive(sec, name, value, allow_zero=False):
        if value < 0 or (value == 0 and not allow_zero):
            _fail(where_of(f"{sec}.{name}"), f"{sec}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "eval_steps", "save_steps", "logging_steps", "learning_rate"):
        positive("train", name, getattr(t, name))
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers"):
        positive("train", name, getattr(t, name), allow_zero=True)
    positive("data", "max_seq_length", d.max_seq_length)
    positive("data", "num_proc", d.num_proc)
    if isinstance(d.pack_max_tokens, str):
        if d.pack_max_tokens != "auto":
            _fail(where_of("data.pack_max_tokens"),
                  f"data.pack_max_tokens must be a positive integer or auto, got {d.pack_max_tokens!r}")
    else:
        positive("data", "pack_max_tokens", d.pack_max_tokens)
    positive("train", "loss_chunk_size", t.loss_chunk_size)
    if d.max_rows is not None:
        positive("data", "max_rows", d.max_rows)
    for name in ("min_response_chars", "max_response_chars"):  # row filters (tunelab/datatools/filters.py)
        if getattr(d, name) is not None:
            positive("data", name, getattr(d, name), allow_zero=True)
    if (d.min_response_chars is not None and d.max_response_chars is not None
            and d.min_response_chars > d.max_response_chars):
        _fail(where_of("data.min_response_chars"), f"data.min_response_chars ({d.min_response_chars}) is above "
              f"data.max_response_chars ({d.max_response_chars})")
    if d.scripts:
        from .datatools.common import SCRIPT_NAMES

        for sc in d.scripts:
            if sc.lower() not in {n.lower() for n in SCRIPT_NAMES}:
                _fail(where_of("data.scripts"),
                      f"data.scripts: unknown script '{sc}' (known: {', '.join(SCRIPT_NAMES)})")
    if lo.enabled:
        positive("lora", "r", lo.r)
        positive("lora", "alpha", lo.alpha)
        if not lo.target_modules:
            _fail(where_of("lora.target_modules"), "lora.target_modules is empty")
    if not 0.0 <= lo.dropout < 1.0:
        _fail(where_of("lora.dropout"), f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if t.max_steps == 0 or t.max_steps < -1:
        _fail(where_of("train.max_steps"), f"train.max_steps must be > 0, or -1 to train by epochs; got {t.max_steps}")
    if t.max_steps == -1:
        positive("train", "num_train_epochs", t.num_train_epochs)
    if t.max_steps > 0 and t.warmup_steps > t.max_steps:
        _fail(where_of("train.warmup_steps"),
              f"train.warmup_steps ({t.warmup_steps}) is larger than train.max_steps ({t.max_steps})")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        _fail(where_of("train.save_total_limit"), "train.save_total_limit must be >= 1 (or omitted)")
    if not 0.0 <= d.test_size < 1.0:
        _fail(where_of("data.test_size"), f"data.test_size must be in [0, 1), got {d.test_size}")
    if d.test_size > 0 and d.eval_path:
        _fail(where_of("data.eval_path"), "set either data.test_size or data.eval_path, not both")
    if not d.path and not d.sources:
        _fail(where_of("data.path"), "data.path is required (a data file, a saved datasets folder or a hub id)")
    if d.sources:  # several files mixed (tunelab/datatools/mix.py)
        from .datatools.mix import validate_sources

        if d.path:
            _fail(where_of("data.sources"), "set either data.path or data.sources, not both")
        problem = validate_sources(d.sources)
        if problem:
            _fail(where_of("data.sources"), problem)
        if any(s.get("format") == "chat" for s in d.sources) and d.template != "chat_template":
            _fail(where_of("data.template"), "a chat source in data.sources needs data.template=chat_template")
    for k in d.fields:
        if k not in DATA_FIELDS:
            _fail(where_of(f"data.fields.{k}"), f"unknown data field '{k}'{_did_you_mean(k, DATA_FIELDS)}")
    if d.format in ("chat", "sharegpt") and d.template != "chat_template":
        _fail(where_of("data.template"), f"data.format={d.format} needs data.template=chat_template")
    if q.load_in_4bit and not lo.enabled:
        _fail(where_of("quantization.load_in_4bit"),
              "a 4-bit base can't be fully fine-tuned: set lora.enabled=true (QLoRA) or load_in_4bit=false")
    if e.early_stopping_patience < 0:
        _fail(where_of("eval.early_stopping_patience"), "eval.early_stopping_patience must be >= 0")
    if e.early_stopping_patience and not (d.test_size > 0 or d.eval_path):
        _fail(where_of("eval.early_stopping_patience"),
              "early stopping needs evaluation data: set data.test_size or data.eval_path")
    check_sections(cfg, where_of, _fail, _did_you_mean, written)
    if t.method == "sft" and not 1e-5 <= t.learning_rate <= 5e-4:
        warnings.append(f"train.learning_rate={t.learning_rate:g} is outside the usual 1e-5..5e-4 for LoRA/SFT")
    return warnings


PACK_MAX_TOKENS_AUTO = {"cpu": 1024, "cpu-float32": 512, "gpu": 4096}
"""data.pack_max_tokens: auto, per device kind and, on a CPU, precision (measured: BENCHMARKS.md, issue 16
sections). float32 on a CPU (auto's choice where bf16 would be emulated) runs peft's layers and keeps 39 KiB per
token and layer for the backward pass against the fused bf16-mixed layers' 23 (tunelab/plan.py): at 1,024 its
peak RSS was 1.35x the recipe's stack's, at 512 0.92x for 9% less speed (AVX2-only run, BENCHMARKS.md)."""


def pack_max_tokens(data: DataConfig, device: str, precision: str) -> int:
    """data.pack_max_tokens in tokens for `device` ("cpu", "cuda", or a GPU's name) and the run's `precision`
    (precision.pick_precision's name: float32, bf16-mixed, bfloat16, float16): `auto` resolved."""
    if data.pack_max_tokens == "auto":
        kind = "gpu" if device != "cpu" else "cpu-float32" if precision == "float32" else "cpu"
        return PACK_MAX_TOKENS_AUTO[kind]
    return int(data.pack_max_tokens)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set a.b=c` flags -> nested dict. Values are parsed as YAML scalars (2e-4, true, [a, b])."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            _fail("--set", f"expected KEY=VALUE, got '{pair}'")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            _fail("--set", f"expected a dotted key like train.learning_rate, got '{key}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


PATH_KEYS = ("model.name", "data.path", "data.eval_path")
"""Keys that may hold a local path; in a config file they resolve as `resolve_config_path` says."""


def resolve_config_path(value: str, config_dir: Path) -> str:
    """Where a relative path written in a config file points: the config file's folder first (so a
    config works from any current folder), then the current folder (configs written for the folder
    they are run from keep working). What exists in neither is kept as written: a hub id, or a
    missing file that the reader names. Absolute and ~ paths are used as they are. A path given
    with --set is relative to the current folder, like any path typed on the command line."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    near = config_dir / path
    if near.exists():
        return str(Path(os.path.normpath(near)))
    return value


def _resolve_paths(cfg: RunConfig, config_dir: Path, lines: dict[str, int]) -> None:
    for dotted in PATH_KEYS:
        sec, key = dotted.split(".")
        value = getattr(getattr(cfg, sec), key)
        if dotted in lines and isinstance(value, str):
            setattr(getattr(cfg, sec), key, resolve_config_path(value, config_dir))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[RunConfig, list[str]]:
    """Read a run YAML (or only defaults when path is None), apply --set flags, validate."""
    cfg = RunConfig()
    lines: dict[str, int] = {}
    source = ""
    if path is not None:
        p = Path(path)
        source = str(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            _fail("", f"config file not found: {path}")
        except UnicodeDecodeError:
            _fail(source, "config file is not UTF-8 text")
        except OSError as err:
            _fail(source, f"cannot read config: {err.strerror}")
        data, lines = _compose_with_lines(text, source)

        def where_file(dotted: str) -> str:
            parts = dotted.split(".")
            while parts and ".".join(parts) not in lines:
                parts.pop()
            return f"{source}:{lines['.'.join(parts)]}" if parts else source

        _apply(cfg, data, where_file)
        _resolve_paths(cfg, p.resolve().parent, lines)
    else:
        def where_file(dotted: str) -> str:
            return ""
    ov = parse_overrides(overrides or [])
    override_keys = set()

    def collect(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and key.count(".") < 1:
                collect(v, key)
            else:
                override_keys.add(key)

    collect(ov)
    _apply(cfg, ov, lambda dotted: "--set")

    def where(dotted: str) -> str:
        if any(k == dotted or k.startswith(dotted + ".") for k in override_keys):
            return "--set"
        return where_file(dotted)

    warnings = validate(cfg, where, set(lines) | override_keys)
    return cfg, warnings


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from a saved resolved config (run folder's config.yaml)."""
    cfg = RunConfig()
    _apply(cfg, data, lambda dotted: "config")
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    from .fsutil import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
