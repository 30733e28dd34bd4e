"""`tunelab plan run.yaml`: will this run fit, how long will it take, what to change if it won't.

Everything is computed from the run's config and the model's shape (config.json), before any weight
is downloaded or loaded:

  memory  = base weights (by dtype / 4-bit) + LoRA/DoRA weights + gradients + optimizer state
          + activations (per token and layer, counted below) + logits + framework overhead;
  time    = FLOPs per step / (device peak x efficiency), a range rather than one number;
  verdict = fits / tight / does not fit per GPU, and the smallest change that makes it fit.

Where the numbers come from (each is a stated constant, not a fit hidden in code):
  - activation bytes per token and layer: counted with torch.autograd.graph.saved_tensors_hooks on
    transformers' Llama + peft (torch 2.13, transformers 5.24, peft 0.21; the count is
    tests/test_plan.py::saved_bytes_per_token_layer), as multiples of hidden size h, KV width and MLP
    width i (`ACTIVATION_COEFFS`; bf16-mixed and the fused LoRA layers: `MIXED_ACTIVATION_BYTES`);
  - NF4 storage: 4 bits + 8-bit absmax per 64 weights + fp32 second-level scale per 256 blocks
    (bitsandbytes double quantization) = 4.127 bits/param; without double quant 4.5;
  - GPU peaks: vendors' datasheets (dense, no sparsity; cited in `GPUS`); GPU efficiency: the
    fraction of that peak the published single-GPU runs in `VALIDATION` reached;
  - CPU: the measured matmul peaks and tunelab's measured MFU of this project's CPU kind the host is
    (AMX, or AVX512_BF16 without it, read from its flags; BENCHMARKS.md).
The validation set at the bottom (`VALIDATION`) is checked by tests/test_plan.py: the published
figures within 25% for memory, this machine's measured runs (bench/results/plan_validation.json)
within 20% for memory and 35% for time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0
    model_type: str = "llama"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        return self.heads * self.hd

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hd

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.module_dims().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.layer_linear_params + self.embed_params + self.head_params + norms


def _s(name, h, layers, heads, kv, i, vocab, tied, head_dim=0, model_type="llama"):
    return Shape(name, h, layers, heads, kv, i, vocab, tied, head_dim, model_type)


# From each model's published config.json (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings, head_dim). Used only
# when the config.json itself is not on this machine.
BUILTIN_SHAPES: dict[str, Shape] = {s.name: s for s in [
    _s("meta-llama/Meta-Llama-3-8B", 4096, 32, 32, 8, 14336, 128256, False),
    _s("meta-llama/Meta-Llama-3-70B", 8192, 80, 64, 8, 28672, 128256, False),
    _s("meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False),
    _s("meta-llama/Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256, False),
    _s("meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True, 64),
    _s("meta-llama/Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True, 128),
    _s("mistralai/Mistral-7B-v0.1", 4096, 32, 32, 8, 14336, 32000, False, model_type="mistral"),
    _s("mistralai/Mistral-7B-v0.3", 4096, 32, 32, 8, 14336, 32768, False, model_type="mistral"),
    _s("Qwen/Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, model_type="qwen2"),
    _s("Qwen/Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, model_type="qwen2"),
    _s("Qwen/Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True, model_type="qwen2"),
    _s("Qwen/Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, model_type="qwen2"),
    _s("Qwen/Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064, False, model_type="qwen2"),
    _s("Qwen/Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, False, model_type="qwen2"),
    _s("Qwen/Qwen2.5-72B", 8192, 80, 64, 8, 29568, 152064, False, model_type="qwen2"),
    _s("Qwen/Qwen3-0.6B", 1024, 28, 16, 8, 3072, 151936, True, 128, "qwen3"),
    _s("Qwen/Qwen3-1.7B", 2048, 28, 16, 8, 6144, 151936, True, 128, "qwen3"),
    _s("Qwen/Qwen3-4B", 2560, 36, 32, 8, 9728, 151936, True, 128, "qwen3"),
    _s("Qwen/Qwen3-8B", 4096, 36, 32, 8, 12288, 151936, False, 128, "qwen3"),
    _s("Qwen/Qwen3-14B", 5120, 40, 40, 8, 17408, 151936, False, 128, "qwen3"),
    _s("Qwen/Qwen3-32B", 5120, 64, 64, 8, 25600, 151936, False, 128, "qwen3"),
    _s("google/gemma-2-2b", 2304, 26, 8, 4, 9216, 256000, True, 256, "gemma2"),
    _s("google/gemma-2-9b", 3584, 42, 16, 8, 14336, 256000, True, 256, "gemma2"),
    _s("google/gemma-2-27b", 4608, 46, 32, 16, 36864, 256000, True, 128, "gemma2"),
    _s("HuggingFaceTB/SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True),
    _s("HuggingFaceTB/SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, True),
    _s("HuggingFaceTB/SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, True),
]}
_ALIASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M"}


def _builtin(spec: str) -> Shape | None:
    """A hub id (any org, -Instruct/-it/-chat suffixes) or an embedded model's name -> built-in shape."""
    key = spec.strip().lower().rstrip("/")
    if key in _ALIASES:
        return BUILTIN_SHAPES[_ALIASES[key]]
    tail = key.split("/")[-1]
    for suffix in ("-instruct", "-it", "-chat", "-base"):
        tail = tail.removesuffix(suffix)
    tail = tail.removeprefix("meta-")  # meta-llama/Meta-Llama-3.1-8B is Llama-3.1-8B
    for name, shape in BUILTIN_SHAPES.items():
        if name.lower() == key or name.lower().split("/")[-1].removeprefix("meta-") == tail:
            return shape
    return None


def shape_from_config_json(path: Path) -> Shape:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    d = d.get("text_config", d) if "hidden_size" not in d else d
    heads = d["num_attention_heads"]
    return Shape(name=str(path), hidden=d["hidden_size"], layers=d["num_hidden_layers"], heads=heads,
                 kv_heads=d.get("num_key_value_heads") or heads,
                 intermediate=d.get("intermediate_size") or 4 * d["hidden_size"], vocab=d["vocab_size"],
                 tied=bool(d.get("tie_word_embeddings", False)), head_dim=d.get("head_dim") or 0,
                 model_type=d.get("model_type", "llama"))


def find_shape(spec: str, revision: str | None = None) -> tuple[Shape, str]:
    """(shape, where it came from), without the network: a local folder, the embedded model's cached
    conversion, the local HF cache, then the built-in table. ModelError names the file it needs."""
    from .models import EMBEDDED, ModelError, embedded_gguf, gguf_cache_folder

    p = Path(spec).expanduser()
    if spec in EMBEDDED:
        try:  # the embedded model's converted folder, when `tunelab train` made it once already
            cached = gguf_cache_folder(embedded_gguf(spec), spec) / "config.json"
            if cached.is_file():
                return shape_from_config_json(cached), str(cached)
        except ModelError:
            pass
        return _builtin(spec), "built-in table"
    if spec.endswith(".gguf"):
        if p.is_file():
            cached = gguf_cache_folder(p, p.stem) / "config.json"
            if cached.is_file():
                return shape_from_config_json(cached), str(cached)
        raise ModelError(f"model: plan needs the model's shape; {spec} has not been converted yet: run "
                         f"`tunelab check` once, or point model.name at a folder with config.json")
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model: plan needs {p / 'config.json'} (the model's shapes); it is missing")
        return shape_from_config_json(p / "config.json"), str(p / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec, "config.json", revision=revision)
        if isinstance(hit, str) and Path(hit).is_file():
            return shape_from_config_json(Path(hit)), f"HF cache ({hit})"
    except Exception:  # a malformed id: fall through to the table / the error below
        pass
    shape = _builtin(spec)
    if shape is not None:
        return shape, "built-in table"
    raise ModelError(f"model: '{spec}' has no config.json on this machine (local folder, HF cache) and is not in "
                     f"plan's built-in table; plan needs {spec}/config.json: download that one file "
                     f"(hf download {spec} config.json) or set model.name to a folder that holds it")


# ---------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class Device:
    name: str
    mem_gib: float
    """Memory a process can use (nvidia-smi's total; for cpu this machine's RAM)."""
    tflops16: float
    """Dense bf16/fp16 tensor-core peak, no sparsity."""
    tflops32: float
    bf16: bool
    """Native bf16 matmul; without it bf16 runs on the fp32 units (T4)."""
    source: str
    eff16: tuple[float, float, float] | None = None
    """CPU: tunelab's measured efficiency in bf16 / bf16-mixed against tflops16 (None: CPU_EFFICIENCY_BF16)."""


GPUS: dict[str, Device] = {d.name: d for d in [
    # NVIDIA T4 datasheet: 65 TFLOPS mixed fp16, 8.1 fp32, 16 GB (15,360 MiB usable); Turing has no bf16.
    Device("T4", 15.0, 65.0, 8.1, False, "NVIDIA T4 datasheet"),
    # NVIDIA L4 datasheet: bf16 242 TFLOPS with sparsity -> 121 dense; fp32 30.3; 24 GB (22.5 GiB usable).
    Device("L4", 22.5, 121.0, 30.3, True, "NVIDIA L4 datasheet"),
    # AWS G5 (A10G): 70 TFLOPS bf16 dense (the A10G is clocked below the A10's 125), fp32 31.2; 24 GB.
    Device("A10G", 22.5, 70.0, 31.2, True, "AWS EC2 G5 / NVIDIA A10G"),
    # NVIDIA A100 datasheet: bf16 312 TFLOPS dense, fp32 19.5 (tf32 156); 40 GB / 80 GB.
    Device("A100-40", 40.0, 312.0, 19.5, True, "NVIDIA A100 datasheet"),
    Device("A100-80", 80.0, 312.0, 19.5, True, "NVIDIA A100 datasheet"),
    # NVIDIA H100 SXM datasheet: bf16 1,979 TFLOPS with sparsity -> 989 dense, fp32 67; 80 GB.
    Device("H100", 79.6, 989.0, 67.0, True, "NVIDIA H100 datasheet (SXM)"),
    # NVIDIA H200 datasheet: same compute as H100 SXM, 141 GB HBM3e (139.8 GiB).
    Device("H200", 139.8, 989.0, 67.0, True, "NVIDIA H200 datasheet"),
    # NVIDIA Ada whitepaper, RTX 4090: bf16 tensor with fp32 accumulate 165.2 dense, fp32 82.6; 24 GB.
    Device("RTX4090", 23.99, 165.2, 82.6, True, "NVIDIA Ada Lovelace whitepaper"),
]}

# This project's machines are of two kinds (BENCHMARKS.md); cpu_device() picks the host's by its CPU flags.
# AMD EPYC, AVX512_BF16 without AMX, measured 2026-11-29: best fp32 matmul 180-194 GFLOP/s, bf16 418-428, 2 cores.
CPU_GFLOPS_FP32 = 191.0
CPU_GFLOPS_BF16 = 423.0
# Sapphire Rapids-class Xeon with AMX (amx_bf16), 2 cores: the medians of the matmul peaks bench_train.py measured
# in the seven issue-16 runs of 2026-11-29/30 (bench/results/train_5arm_amx_*, train_fused_*, train_fastlora_*,
# train_keep_freed_ab): fp32 208-337 GFLOP/s (median 264), bf16 1,186-2,100 (median 1,664); the host's speed
# moved by up to 27% within one run.
CPU_GFLOPS_FP32_AMX = 264.0
CPU_GFLOPS_BF16_AMX = 1664.0


def cpu_device(kind: str | None = None) -> Device:
    """This machine: its RAM, and the peaks of its CPU kind ("amx", "avx512_bf16" or "emulated" bf16; None: read
    from the host's flags, the same flags model.dtype auto reads)."""
    from .precision import cpu_has_native, cpu_info

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        ram = 16.0
    if kind is None:
        import torch

        kind = ("emulated" if not cpu_has_native(torch.bfloat16) else "amx" if "amx_bf16" in cpu_info()[1]
                else "avx512_bf16")
    if kind == "amx":
        return Device("cpu", round(ram, 1), CPU_GFLOPS_BF16_AMX / 1000, CPU_GFLOPS_FP32_AMX / 1000, True,
                      "this machine: AMX (BENCHMARKS.md, issue 16)", CPU_EFFICIENCY_MIXED_AMX)
    return Device("cpu", round(ram, 1), CPU_GFLOPS_BF16 / 1000, CPU_GFLOPS_FP32 / 1000, kind == "avx512_bf16",
                  f"this machine: {'AVX512_BF16' if kind == 'avx512_bf16' else 'bf16 emulated'} (BENCHMARKS.md)")


def device_names() -> list[str]:
    return [*GPUS, "cpu"]


def get_device(name: str) -> Device:
    from .config import ConfigError

    if name.lower() == "cpu":
        return cpu_device()
    for key, d in GPUS.items():
        if key.lower() == name.lower().replace("_", "-"):
            return d
    raise ConfigError(f"--gpu {name}: unknown device; known: {', '.join(device_names())}")


# ---------------------------------------------------------------------------------------------
# Constants of the memory model

# Saved-for-backward elements per token per decoder layer, as (c_h, c_kv, c_i): elements =
# c_h*hidden + c_kv*kv_width + c_i*intermediate, each of the compute dtype's size. Counted with
# torch.autograd.graph.saved_tensors_hooks (unique storages, parameters excluded) over one forward
# of transformers' LlamaForCausalLM (sdpa) + peft, differencing 1- and 2-layer models and varying
# h, kv and i separately (torch 2.13, transformers 5.24, peft 0.21, bitsandbytes CPU backend):
ACTIVATION_COEFFS = {
    ("full", 4): (8, 2, 4), ("full", 2): (10, 2, 4),
    ("lora", 4): (6, 2, 4), ("lora", 2): (18, 2, 5),          # LoRA on all 7 projections
    ("lora_attn", 4): (5, 2, 3), ("lora_attn", 2): (10, 2, 3),  # LoRA on attention projections only
    ("qlora", 2): (12, 4, 8), ("qlora", 4): (12, 4, 8),       # 4-bit base after prepare_model_for_kbit_training
}
# lora_dropout > 0 keeps a dropped copy of every adapted input: measured +10h+1i (fp32), +12h+2i (bf16).
DROPOUT_EXTRA = {4: (10, 0, 1), 2: (12, 0, 2)}
# bf16-mixed LoRA (fp32 weights and adapters, torch.autocast(bfloat16), the LoRA sums and attention in fp32:
# tunelab/precision.py): the saved tensors mix bf16 and fp32, so these are BYTES per token and layer (h, kv, i as
# above). Counted the same way (unique storages, parameters excluded, 1- vs 2-layer models, 64 vs 128 tokens to
# drop what does not grow with tokens; h 256 -> 384, kv 64 -> 128, i 512 -> 768 at head_dim 32, LoRA r8) under
# autocast with precision.fp32_attention and lora_sums_in_fp32, as train.build_model sets them up; the same count
# gives (6, 2, 4) / (5, 2, 3) elements for ("lora", 4) / ("lora_attn", 4) above. The count is
# tests/test_plan.py::saved_bytes_per_token_layer; test_fused_activation_coefficients_match_a_real_model checks a
# model of another shape against them. Left out, as above: ~0.1-0.2 KiB per token and layer that does not grow
# with h, kv or i (rotary embedding terms); the 1/8 byte per h is SDPA's logsumexp (4 bytes per head of 32).
MIXED_ACTIVATION_BYTES = {
    # (targets, fused): fused = tunelab's fused LoRA layers (tunelab/fastlora.py, lora.fused, on a CPU): bf16 inputs
    # kept for the sibling matmuls and SwiGLU, RMSNorm keeping x alone; SmolLM2-135M: 22.9 KiB/token/layer
    ("lora", True): (22.125, 8, 6), ("lora_attn", True): (20.125, 8, 6),
    # peft's layers under autocast (lora.fused=false, dropout, DoRA, a GPU): SmolLM2-135M 36.7 KiB/token/layer
    ("lora", False): (28.125, 8, 14), ("lora_attn", False): (24.125, 8, 6),
}

NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}  # double_quant -> bits per weight
CUDA_CONTEXT_GIB = 0.5
"""CUDA context + cuBLAS workspace, outside torch.cuda.max_memory_allocated; typical of CUDA 12 on
A100/H100 (not yet measured by tunelab: bench/gpu_qlora.py records it when run on a GPU)."""
CUDA_ALLOCATOR_SLACK = 0.05
"""Caching-allocator fragmentation: reserved over allocated, as a fraction of the allocated peak."""
CPU_FRAMEWORK_GIB = 0.75
"""RSS of a tunelab process before the model is loaded (python, torch, transformers, peft,
datasets, the tokenizer and tokenized data): 0.48 GiB for the imports alone, measured here."""
CPU_ACTIVATION_FACTOR = 1.8
"""Peak RSS per activation byte on CPU: glibc keeps freed backward buffers, so RSS grows 1.8x the
saved-tensor count. Measured: BENCHMARKS.md runs A and B (same config, pack 4096 vs 512):
(9.19 - 2.65) GiB over 3,179 more tokens per pass = 2.06 MiB/token vs 1.14 MiB/token counted."""

# Time: efficiency = achieved / peak FLOP/s.
CPU_EFFICIENCY = (0.40, 0.55, 0.65)
"""tunelab's measured MFU on this CPU, head counted at trained positions only (BENCHMARKS.md:
51.7-58.7% quiet); the low end allows for the 2 cores being shared."""
CPU_EFFICIENCY_BF16 = (0.24, 0.32, 0.40)
"""bf16 on this CPU (native AVX512_BF16): tunelab-bf16 trained at 70% of the fp32 peak = 32% of the bf16
peak (BENCHMARKS.md run C): the elementwise work around the matmuls does not speed up with bf16. bf16-mixed
was not measured on that CPU kind: the same range is used for it."""
CPU_EFFICIENCY_MIXED_AMX = (0.04, 0.08, 0.12)
"""bf16 and bf16-mixed on a CPU with AMX, against CPU_GFLOPS_BF16_AMX: AMX makes the bf16 matmuls 6x the fp32
ones, not the rest of a step (elementwise work, fp32 attention, Python). tunelab's bf16-mixed arms of
BENCHMARKS.md "Issue 16: fused LoRA layers" (SmolLM2-135M, alpaca_en_demo, 512 tokens, 2 x 8, LoRA r16 x 7; this
module's FLOP count over the run's step time): 2.8-5.7% on the slow-host runs B-D, 6.5-7.5% (pieces of 512-1,024)
in runs A and E, 10.3% with pieces of 4,096 (run A); the bench's own MFU against each run's measured bf16 peak:
3.2-11.4%; after the chunked loss's single head cast, tunelab's defaults (pieces of 1,024): 8.3% (run F), 11.8%
(runs G and H, BENCHMARKS.md "pieces of 1,024 tokens by default"). The fused layers are 1.05-1.31x peft's within
a run: one range serves both."""
GPU_EFFICIENCY = {"lora": (0.25, 0.40, 0.75), "full": (0.25, 0.40, 0.75), "qlora": (0.20, 0.33, 0.75)}
"""Published single-GPU runs, as a fraction of the datasheet peak (FLOPs counted as below):
litgpt Llama-3-8B QLoRA on an A10G 0.32 (incl. its validation), torchtune Llama-3.1-8B QLoRA on a
4090 0.65 (0.69 before the saturation factor below) and LoRA 0.84 (compiled; the top of the range is
compiled torchtune, and its LoRA figure is above what this model admits, see VALIDATION); the recipe's T4
run ~0.3 of the T4's fp32 peak (bf16 without tensor cores). The range is what tunelab prints; the middle
value is its single best guess."""
GPU_LAYER_PASS_S = 1e-3
"""Fixed time per decoder layer per forward+backward pass on a GPU (kernel launches of eager
PyTorch + peft: ~40 small kernels per layer at ~10-25 us each): what a tiny model's step costs."""
SATURATION_TOKENS = 256
"""Tokens per forward pass at which a GPU reaches half its efficiency: small passes are
launch- and memory-bound (efficiency x T / (T + 256))."""


# ---------------------------------------------------------------------------------------------
# The workload: what the estimator needs, from a RunConfig or written out by hand (VALIDATION)


@dataclass
class Workload:
    method: str = "lora"  # full | lora | qlora
    compute_bytes: int = 2
    quant_bits: float | None = None  # bits per base Linear weight when quantized (4-bit/8-bit)
    # peft's prepare_model_for_kbit_training casts embed/head/norms to fp32; tunelab's train.prepare_quantized
    # (since the H200 runs in BENCHMARKS.md) keeps them in the compute dtype, as TRL does: False for tunelab
    upcast_non_quantized: bool = False
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dora: bool = False
    lora_dropout: float = 0.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    chunked_loss: bool = True
    loss_chunk: int = 1024
    keep_logits: bool = False
    """The loss keeps every position's logits in the compute dtype for backward and upcasts one chunk at a
    time (torchtune's CEWithChunkedOutputLoss, litgpt's chunked_cross_entropy), instead of tunelab's
    chunked loss (no logits kept) or the stock loss (all logits, fp32 copies)."""
    bf16_requested: bool = False
    """model.dtype: bfloat16 explicitly (on a GPU without bf16 it then runs at fp32 speed or below)."""
    mixed: bool = False
    """bf16-mixed: fp32 weights and optimizer state (compute_bytes 4), matmuls under bf16 autocast."""
    precision: str = "float32"
    """model.dtype resolved as a run on the planned device would (float32, bf16-mixed, bfloat16, float16)."""
    fused: bool = False
    """tunelab's fused LoRA layers (bf16-mixed LoRA on a CPU, tunelab/fastlora.py): the adapted Linear weights
    are bf16 (their fp32 copies freed), activations as MIXED_ACTIVATION_BYTES[..., True]."""
    tokens_per_pass: int = 2048
    """Largest forward pass (rows x padded length, or a packed piece): sets activation memory."""
    trained_per_pass: int | None = None
    tokens_per_step: float = 2048.0
    """Tokens computed per optimizer step on one device (padding included)."""
    trained_per_step: float | None = None
    attn_sq_per_step: float = 0.0
    """Sum over rows of (length computed)^2 per step: attention FLOPs."""
    passes_per_step: float = 1.0
    steps: int | None = 100
    eval_tokens: float = 0.0
    """Tokens of one evaluation pass over the eval split; n_evals of them."""
    n_evals: int = 0
    eval_batch_tokens: int = 0
    kv_tokens: int = 0
    """Rows x length of a generation batch (eval/generate), for its KV cache."""
    reference_model: bool = False
    """DPO-style preference tuning: a frozen reference model (the base with the adapter off under LoRA)."""
    n_gpus: int = 1
    shard: bool = False
    """FSDP / ZeRO-3: weights, gradients and optimizer state divided over n_gpus."""
    tokens_note: str = ""

    @property
    def trainable_kind(self) -> str:
        return "full" if self.method == "full" else "lora"


def _trainable(shape: Shape, w: Workload) -> int:
    if w.method == "full":
        return shape.total_params
    dims = shape.module_dims()
    n = sum(w.lora_r * (a + b) + (b if w.dora else 0) for m, (a, b) in dims.items() if m in w.lora_targets)
    return n * shape.layers


def _optimizer_bytes_per_param(optim: str, param_bytes: int) -> float:
    if "8bit" in optim:
        return 2.0  # two 8-bit moments (bitsandbytes; block-wise scales add <1%)
    if optim == "adafactor":
        return 0.05  # factored second moment only: rows + cols per matrix
    if optim == "sgd":
        return 0.0
    return 2.0 * param_bytes  # torch AdamW: exp_avg + exp_avg_sq in the parameter's dtype


def activation_bytes_per_token_layer(shape: Shape, w: Workload) -> float:
    b = w.compute_bytes
    if w.mixed and w.method == "lora":
        mlp = any(m in w.lora_targets for m in ("gate_proj", "up_proj", "down_proj"))
        ch, ckv, ci = MIXED_ACTIVATION_BYTES[("lora" if mlp else "lora_attn", w.fused)]
        if w.lora_dropout > 0:  # peft's layers keep the dropped copy of their fp32 input
            dh, dkv, di = DROPOUT_EXTRA[4]
            frac = len([m for m in w.lora_targets if m in shape.module_dims()]) / 7
            ch, ckv, ci = ch + 4 * dh * frac, ckv + 4 * dkv * frac, ci + 4 * di * frac
        return ch * shape.hidden + ckv * shape.kv_width + ci * shape.intermediate + (8 * shape.hidden if w.dora else 0)
    if w.method == "qlora" and w.upcast_non_quantized:  # peft's prepare_model_for_kbit_training path
        key = ("qlora", b)
    elif w.method == "full":
        key = ("full", b)
    else:
        mlp = any(m in w.lora_targets for m in ("gate_proj", "up_proj", "down_proj"))
        key = ("lora" if mlp else "lora_attn", b)
    ch, ckv, ci = ACTIVATION_COEFFS[key]
    if w.method != "full" and w.lora_dropout > 0:
        dh, dkv, di = DROPOUT_EXTRA[b]
        frac = len([m for m in w.lora_targets if m in shape.module_dims()]) / 7  # measured with all 7 adapted
        ch, ckv, ci = ch + dh * frac, ckv + dkv * frac, ci + di * frac
    elems = ch * shape.hidden + ckv * shape.kv_width + ci * shape.intermediate
    if w.dora:
        elems += 2 * shape.hidden  # DoRA keeps the base output per adapted module for its magnitude term
    return elems * b


@dataclass
class Memory:
    parts: dict[str, float]  # bytes, in display order
    notes: dict[str, str]
    allocated: float  # what torch.cuda.max_memory_allocated (GPU) / the tensors alone would report
    total: float  # what the device must hold: + framework overhead


def estimate_memory(shape: Shape, w: Workload, device: Device) -> Memory:
    cpu = device.name == "cpu"
    b = w.compute_bytes
    parts: dict[str, float] = {}
    notes: dict[str, str] = {}
    shard = w.n_gpus if (w.shard and w.n_gpus > 1) else 1
    lin = shape.layers * shape.layer_linear_params
    other = shape.embed_params + shape.head_params + (2 * shape.layers + 1) * shape.hidden
    adapted = shape.layers * sum(a * o for m, (a, o) in shape.module_dims().items() if m in w.lora_targets)
    if w.quant_bits is not None:
        other_bytes = 4 if w.upcast_non_quantized else b
        parts["weights"] = (lin * w.quant_bits / 8 + other * other_bytes) / shard
        notes["weights"] = (f"{lin / 1e9:.2f}B Linear params at {w.quant_bits:.2f} bits, embeddings/head/norms "
                            f"{other / 1e9:.2f}B at {other_bytes * 8} bits"
                            + (" (peft's prepare_model_for_kbit_training casts them to fp32)"
                               if other_bytes == 4 else ""))
    elif w.fused:  # the adapted Linear weights in bf16 (fastlora's group buffers), the rest as loaded (fp32)
        parts["weights"] = (adapted * 2 + (lin - adapted + other) * b) / shard
        notes["weights"] = (f"{adapted / 1e9:.2f}B adapted Linear params at 16 bits (fused LoRA layers), "
                            f"{(lin - adapted + other) / 1e9:.2f}B at {b * 8} bits")
    else:
        parts["weights"] = (lin + other) * b / shard
        notes["weights"] = f"{(lin + other) / 1e9:.2f}B params at {b * 8} bits"
    n_train = _trainable(shape, w)
    trainable_bytes = b if w.method == "full" else 4  # peft keeps adapters in fp32 (autocast_adapter_dtype)
    if w.method != "full":
        parts["adapter"] = n_train * trainable_bytes
        notes["adapter"] = f"{'DoRA' if w.dora else 'LoRA'} r={w.lora_r}: {n_train / 1e6:.1f}M params, fp32"
    parts["gradients"] = n_train * trainable_bytes / shard
    notes["gradients"] = f"{n_train / 1e6:.1f}M trainable x {trainable_bytes} bytes"
    parts["optimizer"] = n_train * _optimizer_bytes_per_param(w.optim, trainable_bytes) / shard
    notes["optimizer"] = f"{w.optim}: {_optimizer_bytes_per_param(w.optim, trainable_bytes):g} bytes/param"
    if shard > 1:
        for k in ("weights", "gradients", "optimizer"):
            notes[k] += f", sharded over {shard} GPUs"

    per_tl = activation_bytes_per_token_layer(shape, w)
    T = w.tokens_per_pass
    if w.gradient_checkpointing:
        resid = 4 if (w.method == "qlora" and w.upcast_non_quantized) else b  # fp32 embeddings -> fp32 residual stream
        act = T * (shape.layers * shape.hidden * resid + per_tl)
        notes["activations"] = (f"checkpointed: {T} tokens x {shape.layers} layer inputs + one layer recomputed "
                                f"({per_tl / 1024:.0f} KiB/token)")
    else:
        act = T * shape.layers * per_tl
        notes["activations"] = f"{T} tokens x {shape.layers} layers x {per_tl / 1024:.0f} KiB/token/layer"
    if cpu:
        act *= CPU_ACTIVATION_FACTOR
        notes["activations"] += f", x{CPU_ACTIVATION_FACTOR} CPU allocator (measured)"
    parts["activations"] = act
    if w.mixed and not w.fused and w.method != "qlora":
        # autocast casts every Linear weight to bf16 each forward and keeps the copy for the backward: counted with
        # the hooks above at 1.18 MB per layer of 1.11 MB of bf16 weights (h 256, i 512); fused layers: 0.04 MB
        parts["autocast weight copies"] = lin * 2
        notes["autocast weight copies"] = "bf16 copies of the Linear weights, made each step and kept for backward"
    trained = w.trained_per_pass if w.trained_per_pass is not None else T
    if w.keep_logits:
        rows = min(w.loss_chunk, T)
        parts["logits"] = T * shape.vocab * b + rows * shape.vocab * 8
        notes["logits"] = f"{T} tokens x vocab {shape.vocab:,} kept in {b * 8}-bit, fp32 in chunks of {rows}"
    elif w.chunked_loss and shape.model_type in _CHUNKED_TYPES:
        rows = min(w.loss_chunk, max(1, trained))
        parts["logits"] = rows * shape.vocab * (b + 8)
        notes["logits"] = f"chunked loss: {rows} rows x vocab {shape.vocab:,} (never the full logits)"
    else:
        parts["logits"] = T * shape.vocab * (2 * b + 8)
        notes["logits"] = f"{T} tokens x vocab {shape.vocab:,}: logits, fp32 copy, log-softmax, gradient"
    if w.reference_model:
        if w.method == "full":
            parts["reference model"] = (lin + other) * b / shard
            notes["reference model"] = "a second, frozen copy of the weights"
        else:
            parts["reference model"] = 0.0
            notes["reference model"] = "the base with the adapter disabled: no extra weights"
    allocated = sum(parts.values())
    # Evaluation and generation run after (not during) a training step: their peak replaces it.
    kv = w.kv_tokens * shape.layers * 2 * shape.kv_width * b
    eval_peak = parts["weights"] + parts.get("adapter", 0) + parts["optimizer"] + kv
    if kv:
        notes["eval/generation KV"] = f"KV cache of {w.kv_tokens} tokens (eval batch x length; not during a step)"
        parts["eval/generation KV"] = kv
    if cpu:
        overhead = CPU_FRAMEWORK_GIB * GIB
        notes["framework"] = f"{CPU_FRAMEWORK_GIB} GiB process baseline (measured here)"
    else:
        overhead = CUDA_CONTEXT_GIB * GIB + CUDA_ALLOCATOR_SLACK * allocated
        notes["framework"] = f"CUDA context {CUDA_CONTEXT_GIB} GiB + {CUDA_ALLOCATOR_SLACK:.0%} allocator slack"
    parts["framework"] = overhead
    total = max(allocated, eval_peak) + overhead
    return Memory(parts, notes, allocated, total)


_CHUNKED_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gemma"}  # tunelab/loss.py


# ---------------------------------------------------------------------------------------------
# Time


def flops_per_step(shape: Shape, w: Workload) -> float:
    lin = shape.layers * shape.layer_linear_params
    head = shape.vocab * shape.hidden
    T = w.tokens_per_step
    trained = w.trained_per_step if w.trained_per_step is not None else T
    head_tokens = trained if (w.chunked_loss and shape.model_type in _CHUNKED_TYPES) else T
    # Forward 2N per token; backward 2N for input gradients, plus 2N for weight gradients when the
    # weights train (full) -> 6N full, 4N frozen base + LoRA's own 6 x adapter params; a
    # checkpointed forward runs twice.
    mult = 6 if w.method == "full" else 4
    if w.gradient_checkpointing:
        mult += 2
    f = mult * (lin * T + head * head_tokens)
    if w.method != "full":
        f += 6 * _trainable(shape, w) * T
    # attention: QK^T and PV over the causal half, 2*d*L^2 forward per row and layer, x3 with backward
    attn = 2 * shape.q_width * w.attn_sq_per_step * shape.layers
    f += attn * (4 if w.gradient_checkpointing else 3)
    if w.reference_model:
        f += 2 * (lin * T + head * T)  # the reference model's forward
    return f


def eval_flops(shape: Shape, w: Workload) -> float:
    return 2 * (shape.layers * shape.layer_linear_params + shape.vocab * shape.hidden) * w.eval_tokens * w.n_evals


@dataclass
class Timing:
    s_per_step: tuple[float, float, float]  # fast, likely, slow
    total_s: tuple[float, float, float] | None
    peak_tflops: float
    efficiency: tuple[float, float, float]
    note: str


def estimate_time(shape: Shape, w: Workload, device: Device) -> Timing:
    cpu = device.name == "cpu"
    if w.mixed and device.bf16:
        peak = device.tflops16
        note = "bf16-mixed (bf16 matmuls)"
    elif w.compute_bytes == 4:
        peak = device.tflops32
        note = "fp32"
    elif device.bf16:
        peak = device.tflops16
        note = "bf16/fp16"
    elif w.bf16_requested:
        peak = device.tflops32
        note = "bf16 on a GPU without bf16 tensor cores: fp32 speed at best"
    else:
        peak = device.tflops16  # fp16 tensor cores (tunelab's auto dtype picks fp16 where bf16 is missing)
        note = "fp16 (no bf16 on this GPU)"
    if cpu:
        eff = CPU_EFFICIENCY if peak == device.tflops32 else (device.eff16 or CPU_EFFICIENCY_BF16)
    else:
        sat = w.tokens_per_pass / (w.tokens_per_pass + SATURATION_TOKENS)
        eff = tuple(e * sat for e in GPU_EFFICIENCY[w.method])
    flops = flops_per_step(shape, w)
    fixed = (0.0 if cpu
             else GPU_LAYER_PASS_S * shape.layers * w.passes_per_step * (1.5 if w.gradient_checkpointing else 1))
    per_step = tuple(fixed + flops / (peak * 1e12 * e) for e in reversed(eff))  # fast uses the high efficiency
    total = None
    if w.steps:
        ev = eval_flops(shape, w)
        total = tuple(w.steps * s + ev / (peak * 1e12 * e) for s, e in zip(per_step, reversed(eff)))
    return Timing(per_step, total, peak, eff, note)


# ---------------------------------------------------------------------------------------------
# From a run config


@dataclass
class DataProfile:
    """Token counts of the run's data, from the same tokenization training uses (the preflight's)."""

    lengths: list[int]
    trained: list[int]
    eval_lengths: list[int] = field(default_factory=list)
    source: str = ""


def profile_from_examples(train, evals=(), source: str = "") -> DataProfile:
    return DataProfile([len(e.input_ids) for e in train], [e.n_trained for e in train],
                       [len(e.input_ids) for e in evals], source)


def read_data(cfg, config_dir: Path | None) -> tuple[DataProfile | None, str]:
    """Tokenize the run's data if the model's tokenizer and the data are on this machine (no network)."""
    from .data.pipeline import prepare
    from .models import EMBEDDED, load_tokenizer, resolve_model

    spec = cfg.model.name
    try:
        p = Path(spec).expanduser()
        if spec in EMBEDDED or spec.endswith(".gguf") or p.exists():
            folder = resolve_model(spec, cfg.model.revision)
        else:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, revision=cfg.model.revision, local_files_only=True,
                                            allow_patterns=["*.json", "tokenizer*", "*.model", "*.txt"]))
        tok, _ = load_tokenizer(folder, cfg.model.pad_token)
    except Exception as e:
        return None, f"tokenizer not on this machine ({type(e).__name__}); every row assumed max_seq_length"
    prev = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # plan never downloads
    try:
        train, evals, _, _ = prepare(cfg.data, tok, base=config_dir)
    except Exception as e:
        return None, (f"data not readable offline ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                      f"every row assumed max_seq_length")
    finally:
        if prev is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = prev
    return profile_from_examples(train, evals, f"{len(train)} train rows tokenized"), ""


def _steps_stats(cfg, prof: DataProfile | None, n_gpus: int, pack: int) -> dict:
    """Per-step token counts, simulated over the data in order (the sampler's order is random; the
    averages are what matters), or the worst case when the data is not available."""
    d, t = cfg.data, cfg.train
    B, GA = t.per_device_train_batch_size, t.gradient_accumulation_steps
    L = d.max_seq_length
    if prof is None or not prof.lengths:
        n = B * GA
        if d.packing:
            tokens = n * L
            pass_tokens = max(L, min(pack, tokens))
        else:
            tokens = n * L
            pass_tokens = B * L
        return dict(tokens_per_step=float(tokens), trained_per_step=None, attn_sq=float(n * L * L),
                    tokens_per_pass=pass_tokens, trained_per_pass=None,
                    passes=tokens / pass_tokens, rows=None, real_per_step=float(tokens))
    lens, tr = prof.lengths, prof.trained
    per_step = B * GA
    steps = [(lens[i:i + per_step], tr[i:i + per_step]) for i in range(0, len(lens), per_step)]
    if len(steps) > 1 and len(steps[-1][0]) < per_step:
        steps = steps[:-1]  # a short last step would bias the averages
    tok, real, trn, sq, peak, peak_tr, passes = [], [], [], [], 0, 0, []
    for ls, ts in steps:
        real.append(sum(ls))
        trn.append(sum(ts))
        if d.packing:
            pieces, cur, cur_t = [], 0, 0
            for x, y in zip(ls, ts):
                if cur and cur + x > pack:
                    pieces.append((cur, cur_t))
                    cur, cur_t = 0, 0
                cur, cur_t = cur + x, cur_t + y
            pieces.append((cur, cur_t))
            tok.append(sum(ls))
            sq.append(sum(x * x for x in ls))
            peak = max(peak, max(p for p, _ in pieces))
            peak_tr = max(peak_tr, max(q for _, q in pieces))
            passes.append(len(pieces))
        else:
            s_tok = s_sq = 0
            for j in range(0, len(ls), B):
                mb = ls[j:j + B]
                pad = max(mb) * len(mb)
                s_tok += pad
                s_sq += len(mb) * max(mb) ** 2
                peak = max(peak, pad)
                peak_tr = max(peak_tr, sum(ts[j:j + B]))
            tok.append(s_tok)
            sq.append(s_sq)
            passes.append(math.ceil(len(ls) / B))

    def mean(xs):
        return sum(xs) / len(xs)

    return dict(tokens_per_step=mean(tok), trained_per_step=mean(trn), attn_sq=mean(sq), tokens_per_pass=peak,
                trained_per_pass=peak_tr, passes=mean(passes), rows=len(lens), real_per_step=mean(real))


def workload_from_config(cfg, prof: DataProfile | None, device: Device, n_gpus: int = 1,
                         shard: bool | None = None) -> Workload:
    q, lo, t, d = cfg.quantization, cfg.lora, cfg.train, cfg.data
    from .distributed import fsdp_requested

    cpu = device.name == "cpu"
    dtype = cfg.model.dtype
    if dtype == "auto":  # as precision.pick_precision: on a CPU by its native bf16 (the planned device's)
        dtype = ("bf16-mixed" if device.bf16 else "float32") if cpu else "bfloat16"
    b = {"float32": 4, "bf16-mixed": 4, "bfloat16": 2, "float16": 2}[dtype]  # bf16-mixed: fp32 weights
    if q.load_in_4bit and q.compute_dtype != "auto":
        b = {"float32": 4, "bfloat16": 2, "float16": 2}[q.compute_dtype]
    method = "full" if not lo.enabled else ("qlora" if q.load_in_4bit else "lora")
    mixed = dtype == "bf16-mixed" and not q.load_in_4bit
    # train.fused_lora_off's gate and fastlora's eligibility (peft's layers for dropout, DoRA, trained biases)
    fused = (mixed and cpu and method == "lora" and lo.fused and lo.dropout == 0 and not lo.use_dora
             and lo.bias == "none" and not (n_gpus > 1 or fsdp_requested()))
    from .config import pack_max_tokens

    st = _steps_stats(cfg, prof, n_gpus, pack_max_tokens(cfg.data, device.name, dtype))
    rows = st["rows"]
    if t.max_steps > 0:
        steps = t.max_steps
    elif rows:
        steps = math.ceil(math.ceil(rows / (t.per_device_train_batch_size * t.gradient_accumulation_steps * n_gpus))
                          * t.num_train_epochs)
    else:
        steps = None
    n_evals, eval_tokens = 0, 0.0
    if prof is not None and prof.eval_lengths and steps:
        n_evals = steps // t.eval_steps + (1 if cfg.eval.eval_on_start else 0)
        eval_tokens = float(sum(prof.eval_lengths))
    eval_len = max(prof.eval_lengths) if prof and prof.eval_lengths else d.max_seq_length
    objective = str(getattr(t, "method", getattr(t, "objective", "sft")) or "sft").lower()
    return Workload(
        method=method, compute_bytes=b,
        quant_bits=NF4_BITS[q.double_quant] if q.load_in_4bit else None,
        lora_r=lo.r, lora_targets=tuple(lo.target_modules), dora=lo.use_dora, lora_dropout=lo.dropout,
        optim=t.optim, gradient_checkpointing=t.gradient_checkpointing, chunked_loss=t.chunked_loss,
        loss_chunk=t.loss_chunk_size, mixed=mixed, fused=fused, precision=dtype,
        bf16_requested=(cfg.model.dtype == "bfloat16" or q.load_in_4bit and q.compute_dtype == "bfloat16"),
        tokens_per_pass=int(st["tokens_per_pass"]),
        trained_per_pass=st["trained_per_pass"], tokens_per_step=st["tokens_per_step"],
        trained_per_step=st["trained_per_step"], attn_sq_per_step=st["attn_sq"], passes_per_step=st["passes"],
        steps=steps, eval_tokens=eval_tokens, n_evals=n_evals,
        kv_tokens=t.per_device_eval_batch_size * eval_len,
        reference_model=objective in ("dpo", "kto"),  # ORPO and SimPO need no reference model
        n_gpus=n_gpus, shard=(n_gpus > 1) if shard is None else shard,
        tokens_note=(prof.source if prof else f"every row assumed {d.max_seq_length} tokens"))


# ---------------------------------------------------------------------------------------------
# Verdict and advice

FIT, TIGHT, NO = "fits", "tight", "does not fit"


def verdict(mem: Memory, device: Device) -> str:
    need = mem.total / GIB
    return FIT if need <= 0.85 * device.mem_gib else TIGHT if need <= device.mem_gib else NO


def _changes(cfg, w: Workload, device_name: str):
    """Candidate changes, least disruptive first: (label, --set overrides, changed workload)."""
    R = dataclasses.replace
    out = []
    t, d = cfg.train, cfg.data
    B = t.per_device_train_batch_size
    if d.packing and w.tokens_per_pass > d.max_seq_length:
        from .config import pack_max_tokens

        p = pack_max_tokens(d, device_name, w.precision)
        while p > max(256, d.max_seq_length) and p > 256:
            p //= 2
            f = min(1.0, p / max(1, w.tokens_per_pass))
            out.append((f"data.pack_max_tokens={p}", [f"data.pack_max_tokens={p}"],
                        R(w, tokens_per_pass=max(p, min(w.tokens_per_pass, d.max_seq_length)),
                          trained_per_pass=None if w.trained_per_pass is None else int(w.trained_per_pass * f))))
    elif not d.packing:
        b = B
        while b > 1:
            b //= 2
            ga = t.gradient_accumulation_steps * B // b
            f = b / B
            out.append((f"micro-batch {b} (x{ga} accumulation, same effective batch)",
                        [f"train.per_device_train_batch_size={b}", f"train.gradient_accumulation_steps={ga}"],
                        R(w, tokens_per_pass=int(w.tokens_per_pass * f),
                          trained_per_pass=None if w.trained_per_pass is None else int(w.trained_per_pass * f))))
    if not w.gradient_checkpointing:
        out.append(("gradient checkpointing", ["train.gradient_checkpointing=true"],
                    R(w, gradient_checkpointing=True)))
    if "8bit" not in w.optim and w.method == "full":
        out.append(("paged 8-bit AdamW", ["train.optim=paged_adamw_8bit"], R(w, optim="paged_adamw_8bit")))
    if w.method == "lora":
        out.append(("4-bit base (QLoRA)", ["quantization.load_in_4bit=true"],
                    R(w, method="qlora", quant_bits=NF4_BITS[True])))
    if w.method == "full":
        out.append(("QLoRA instead of a full fine-tune", ["lora.enabled=true", "quantization.load_in_4bit=true"],
                    R(w, method="qlora", quant_bits=NF4_BITS[True])))
    combo = R(w, gradient_checkpointing=True, optim="paged_adamw_8bit" if "8bit" not in w.optim else w.optim)
    sets = ["train.gradient_checkpointing=true"] + (["train.optim=paged_adamw_8bit"] if "8bit" not in w.optim else [])
    if w.method != "qlora":
        combo = R(combo, method="qlora", quant_bits=NF4_BITS[True])
        sets += (["lora.enabled=true"] if w.method == "full" else []) + ["quantization.load_in_4bit=true"]
    out.append(("QLoRA + checkpointing + paged 8-bit AdamW", sets, combo))
    L = d.max_seq_length
    while L > 256:
        L //= 2
        f = L / d.max_seq_length
        out.append((f"data.max_seq_length={L} (truncates longer rows)", [f"data.max_seq_length={L}"],
                    R(combo, tokens_per_pass=max(1, int(combo.tokens_per_pass * f)))))
    return out


def advise(cfg, shape: Shape, w: Workload, device: Device) -> dict | None:
    """The first change (least disruptive first) that makes the run fit, or more GPUs with sharding."""
    for label, sets, w2 in _changes(cfg, w, device.name):
        if verdict(estimate_memory(shape, w2, device), device) == FIT:
            return {"change": label, "set": sets}
    if device.name != "cpu":
        gc = [] if w.gradient_checkpointing else ["train.gradient_checkpointing=true"]
        for n in (2, 4, 8, 16, 32, 64):  # same method, checkpointed, sharded
            w2 = dataclasses.replace(w, n_gpus=n, shard=True, gradient_checkpointing=True)
            if verdict(estimate_memory(shape, w2, device), device) == FIT:
                return {"change": f"{n} GPUs with FSDP / ZeRO-3 (weights, gradients, optimizer sharded)"
                                  + (" + gradient checkpointing" if gc else ""),
                        "set": gc + [f"--gpus {n}: tunelab train --launcher accelerate --num-processes {n} "
                                     f"--accelerate-config configs/accelerate/fsdp.yaml"]}
    return None


# ---------------------------------------------------------------------------------------------
# The command


def _fmt_s(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 90:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _range(r) -> str:
    fast, mid, slow = r
    return f"{_fmt_s(mid)} ({_fmt_s(fast)}-{_fmt_s(slow)})"


def plan(cfg, config_dir: Path | None, devices: list[Device], n_gpus: int = 1, read: bool = True) -> dict:
    shape, shape_src = find_shape(cfg.model.name, cfg.model.revision)
    prof, why = (read_data(cfg, config_dir) if read
                 else (None, "data not read (--no-data); every row assumed max_seq_length"))
    method = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA (4-bit base)"}
    result = {"model": cfg.model.name, "shape_source": shape_src,
              "shape": dataclasses.asdict(shape), "params": shape.total_params,
              "tokens_source": prof.source if prof else why, "devices": []}
    for dev in devices:
        n = 1 if dev.name == "cpu" else n_gpus
        w = workload_from_config(cfg, prof, dev, n)
        mem = estimate_memory(shape, w, dev)
        tm = estimate_time(shape, w, dev)
        v = verdict(mem, dev)
        entry = {"device": dev.name, "n_gpus": n, "memory_gib": round(mem.total / GIB, 2),
                 "allocated_gib": round(mem.allocated / GIB, 2), "device_gib": dev.mem_gib, "verdict": v,
                 "parts_gib": {k: round(x / GIB, 3) for k, x in mem.parts.items()}, "notes": mem.notes,
                 "s_per_step": [round(x, 3) for x in tm.s_per_step],
                 "total_s": [round(x, 1) for x in tm.total_s] if tm.total_s else None,
                 "tokens_per_step": round(w.tokens_per_step, 1), "tokens_per_pass": w.tokens_per_pass,
                 "steps": w.steps, "peak_tflops": tm.peak_tflops, "compute": tm.note,
                 "method": method[w.method], "advice": advise(cfg, shape, w, dev) if v != FIT else None}
        result["devices"].append(entry)
    return result


def render(result: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    con = Console(file=sys.stdout, highlight=False, width=max(110, Console(file=sys.stdout).width))
    d0 = result["devices"][0]
    con.print(f"[bold]tunelab plan[/bold] {d0['method']} of {result['model']} "
              f"({result['params'] / 1e9:.2f}B params; shape from {result['shape_source']})")
    con.print(f"tokens: {result['tokens_source']}; {d0['tokens_per_step']:,.0f} tokens/step, largest forward pass "
              f"{d0['tokens_per_pass']:,} tokens, {d0['steps'] or '?'} steps")
    mem = Table(title=f"memory on {d0['device']} (GiB)", title_justify="left", show_header=False)
    mem.add_column(style="bold")
    mem.add_column(justify="right")
    mem.add_column(style="dim")
    for k, v in d0["parts_gib"].items():
        mem.add_row(k, f"{v:.2f}", d0["notes"].get(k, ""))
    mem.add_row("peak", f"[bold]{d0['memory_gib']:.2f}[/bold]",
                "training peak + framework (eval/generation peak if larger)")
    con.print(mem)
    tab = Table(title="verdict", title_justify="left")
    for c in ("device", "need / has GiB", "verdict", "s/step: likely (range)", "total: likely (range)",
              "smallest change that fits"):
        tab.add_column(c, no_wrap=c != "smallest change that fits")
    color = {FIT: "green", TIGHT: "yellow", NO: "red"}
    tips = []
    for e in result["devices"]:
        adv = e["advice"]
        tip = "" if e["verdict"] == FIT else (adv["change"] if adv else "none found")
        if adv:
            tips.append(f"{e['device']}: " + " ".join(s if s.startswith("--") else f"--set {s}" for s in adv["set"]))
        name = e["device"] + (f" x{e['n_gpus']}" if e["n_gpus"] > 1 else "")
        tab.add_row(name, f"{e['memory_gib']:.1f} / {e['device_gib']:.0f}", f"[{color[e['verdict']]}]{e['verdict']}[/]",
                    _range(e["s_per_step"]), _range(e["total_s"]) if e["total_s"] else "? (epochs: needs the data)",
                    tip)
    con.print(tab)
    for t in tips:
        con.print(f"  {t}", soft_wrap=True)


def cmd_plan(args) -> int:
    from .config import ConfigError, load_config

    cfg, _ = load_config(args.config, args.overrides)
    if args.gpus < 1:
        raise ConfigError("--gpus must be >= 1")
    if args.gpu:
        devices = [get_device(args.gpu)]
    elif cfg.model.device == "cuda":  # the memory breakdown shows the first device
        devices = list(GPUS.values())
    else:
        devices = [cpu_device()] + list(GPUS.values())
    result = plan(cfg, Path(args.config).resolve().parent, devices, args.gpus, read=not args.no_data)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="will this run fit and how long will it take, per GPU, before any download")
    p.add_argument("config", help="run YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu", help=f"one device: {', '.join(device_names())} (default: all)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per run (sharded with FSDP/ZeRO-3 when > 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-data", action="store_true", help="don't read the data; assume every row is max_seq_length")


# ---------------------------------------------------------------------------------------------
# Hooks for `tunelab train`


def memory_line(cfg, train_examples, device_name: str) -> str:
    """One line for the start of training: the estimated peak on the device training will use."""
    dev = _current_device(device_name)
    shape, _ = find_shape(cfg.model.name, cfg.model.revision)
    w = workload_from_config(cfg, profile_from_examples(train_examples), dev)
    mem = estimate_memory(shape, w, dev)
    big = sorted(((k, v) for k, v in mem.parts.items() if k != "eval/generation KV"), key=lambda kv: -kv[1])[:3]
    return (f"plan: ~{mem.total / GIB:.1f} GiB peak estimated ({', '.join(f'{k} {v / GIB:.1f}' for k, v in big)}) "
            f"of {dev.mem_gib:.0f} GiB on {dev.name}: {verdict(mem, dev)}")


def oom_advice(cfg, train_examples, device_name: str) -> str:
    dev = _current_device(device_name)
    shape, _ = find_shape(cfg.model.name, cfg.model.revision)
    w = workload_from_config(cfg, profile_from_examples(train_examples), dev)
    mem = estimate_memory(shape, w, dev)
    adv = advise(cfg, shape, w, dev)
    head = f"tunelab plan estimates {mem.total / GIB:.1f} GiB for this run on {dev.mem_gib:.0f} GiB"
    if adv is None:
        return head + "; no single change found: try a smaller model"
    return head + f"; smallest change that fits: {adv['change']} (" + " ".join(
        f"--set {s}" if not s.startswith("--") else s for s in adv["set"]) + ")"


def _current_device(device_name: str) -> Device:
    if device_name == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        for d in GPUS.values():  # a known GPU gets its datasheet peaks
            if d.name.lower().split("-")[0] in props.name.replace(" ", "").lower():
                return dataclasses.replace(d, mem_gib=props.total_memory / GIB)
        return Device(props.name, props.total_memory / GIB, 100.0, 20.0, True, "this GPU")
    return cpu_device()


# ---------------------------------------------------------------------------------------------
# Validation: published single-GPU figures (cited) and this machine's measured runs
# (bench/results/plan_validation.json, written by bench/bench_plan.py). tests/test_plan.py checks
# every point: memory within 25% (published) / 20% (measured here), time as each point says.
# To add a measured point, append a dict of this shape (from bench/gpu_qlora.py's JSON:
# VALIDATION.append(point_from_gpu_qlora(json.load(f), "tunelab", "H200", "2026-..."))).

_LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TORCHTUNE_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora_attn_modules
# [q_proj, v_proj, output_proj] + apply_lora_to_mlp (recipes/configs/llama3_1/8B_{qlora,lora}_single_device.yaml)
_RECIPE_TOKENS = dict(
    # RECIPE.md's data is yahma/alpaca-cleaned (hub only). Proxy: ../shared alpaca_en_demo rows with an empty
    # input tokenized by tunelab (SmolLM2's tokenizer), max_seq_length 2048, batch 2 x 8, padded to the
    # longest row of each micro-batch: 5,041 tokens per step computed (3,102 trained), sum of squared
    # lengths 1.84e6, largest micro-batch 1,270 tokens. Eval: 1% of ~31k rows = ~313 rows x 236 tokens,
    # every 10 steps -> 10 evaluations.
    tokens_per_pass=1270, trained_per_pass=917, tokens_per_step=5041.0, trained_per_step=3102.0,
    attn_sq_per_step=1.84e6, passes_per_step=8, steps=100, eval_tokens=313 * 236.0, n_evals=10)
VALIDATION: list[dict] = [
    {"id": "torchtune Llama-3.1-8B QLoRA, 1x RTX 4090",
     "source": "pytorch/torchtune README.md 'Memory and training speed' (batch 2, packed to 2048, torch.compile; "
               "config recipes/configs/llama3_1/8B_qlora_single_device.yaml: r 8, activation checkpointing, "
               "CEWithChunkedOutputLoss with 8 chunks, torchao NF4 incl. double-quantized scales)",
     "model": "meta-llama/Llama-3.1-8B", "device": "RTX4090",
     "workload": dict(method="qlora", compute_bytes=2, quant_bits=NF4_BITS[True], upcast_non_quantized=False,
                      lora_r=8, lora_targets=_TORCHTUNE_TARGETS, optim="adamw_torch", gradient_checkpointing=True,
                      keep_logits=True, loss_chunk=512, tokens_per_pass=4096, tokens_per_step=4096.0,
                      attn_sq_per_step=4096 * 250.0, steps=None),  # packed Alpaca rows (~250 tokens), document-masked
     "measured": {"memory_gib": 7.4, "memory_kind": "allocated", "tokens_per_s": 2413},
     "time_check": True},
    {"id": "torchtune Llama-3.1-8B LoRA, 1x RTX 4090",
     "source": "pytorch/torchtune README.md 'Memory and training speed' (as above; "
               "recipes/configs/llama3_1/8B_lora_single_device.yaml)",
     "model": "meta-llama/Llama-3.1-8B", "device": "RTX4090",
     "workload": dict(method="lora", compute_bytes=2, lora_r=8, lora_targets=_TORCHTUNE_TARGETS,
                      optim="adamw_torch", gradient_checkpointing=True, keep_logits=True, loss_chunk=512,
                      tokens_per_pass=4096, tokens_per_step=4096.0, attn_sq_per_step=4096 * 250.0, steps=None),
     "measured": {"memory_gib": 16.2, "memory_kind": "allocated", "tokens_per_s": 3083},
     "time_check": False,
     "why": "3,083 tokens/s at 6N FLOPs/token (checkpointed) is 84% of the 4090's dense bf16 peak: beyond any "
            "efficiency this model admits; compiled torchtune, not reproducible with eager transformers"},
    {"id": "litgpt Llama-3-8B QLoRA, 1x A10G",
     "source": "Lightning-AI/litgpt config_hub/finetune/README.md (Alpaca2k, bf16-true, 2 epochs, 17.41 GB, "
               "22.24 min); config_hub/finetune/llama-3-8b/qlora.yaml: bnb.nf4 (no double quant), r 32 on "
               "q and v, dropout 0.05, micro-batch 2, global batch 8, max_seq_length 512, no checkpointing",
     "model": "meta-llama/Meta-Llama-3-8B", "device": "A10G",
     # Alpaca2k token counts: proxy ../shared alpaca_en_demo (all rows, max 512, batch 2 x 4 padded):
     # 2,205 tokens per step of 4 micro-batches, sum of squares 7.45e5; 1,900 train rows x 2 epochs / 8 = 475 steps.
     "workload": dict(method="qlora", compute_bytes=2, quant_bits=NF4_BITS[False], upcast_non_quantized=False,
                      lora_r=32, lora_targets=("q_proj", "v_proj"), lora_dropout=0.05, optim="adamw_torch",
                      gradient_checkpointing=False, keep_logits=True, loss_chunk=128, tokens_per_pass=1024,
                      tokens_per_step=2205.0, attn_sq_per_step=7.45e5, passes_per_step=4, steps=475),
     "measured": {"memory_gib": 17.41e9 / GIB, "memory_kind": "allocated", "total_s": 22.24 * 60},
     "time_check": True},
    {"id": "RECIPE.md Llama-3-8B QLoRA, 100 steps on a T4",
     "source": "/work/shared/docs/RECIPE.md section 3: 'about 3.5 h on a T4' (bf16 compute as configured, "
               "gradient checkpointing, adamw_8bit, 2 x 8 x 2048 padded); configs/llama3-8b-qlora.yaml",
     "model": "meta-llama/Meta-Llama-3-8B", "device": "T4",
     "workload": dict(method="qlora", compute_bytes=2, quant_bits=NF4_BITS[True], lora_r=16, lora_targets=_LLAMA_ALL,
                      optim="adamw_8bit", gradient_checkpointing=True, bf16_requested=True, **_RECIPE_TOKENS),
     "measured": {"fits": True, "total_s": 3.5 * 3600},
     "time_check": True},
    {"id": "RECIPE.md Llama-3-8B QLoRA, 100 steps on an A100",
     "source": "/work/shared/docs/RECIPE.md section 3: 'about 45 min on an A100' (as above)",
     "model": "meta-llama/Meta-Llama-3-8B", "device": "A100-40",
     "workload": dict(method="qlora", compute_bytes=2, quant_bits=NF4_BITS[True], lora_r=16, lora_targets=_LLAMA_ALL,
                      optim="adamw_8bit", gradient_checkpointing=True, bf16_requested=True, **_RECIPE_TOKENS),
     "measured": {"fits": True, "total_s": 45 * 60},
     "time_check": False,
     "why": "45 min is 6-7x the FLOP model's estimate with the same efficiency that matches the T4 and litgpt; "
            "the recipe's notes don't say what the 45 min include (download, loading, evaluation on a Colab)"},
]

# Measured on one NVIDIA H200 with bench/gpu_qlora.py (Llama-3-8B shapes, QLoRA r16 x 7, adamw_8bit,
# checkpointing, packed 4096): run C is tunelab's current path, run A the earlier fp32-upcast path.
_H200_QLORA = dict(method="qlora", compute_bytes=2, quant_bits=NF4_BITS[True], lora_r=16, lora_targets=_LLAMA_ALL,
                   optim="adamw_8bit", gradient_checkpointing=True, chunked_loss=True, tokens_per_pass=4096,
                   tokens_per_step=20480.0, attn_sq_per_step=26214400.0, passes_per_step=1, steps=None,
                   upcast_non_quantized=False)
VALIDATION += [
    {"id": "bench/gpu_qlora.py tunelab arm, 1x H200, run C (packed attention through torch's varlen kernel)",
     "source": "bench/results/gpu_qlora_h200_varlen.json (BENCHMARKS.md, GPU section), 2026-11-29",
     "model": "meta-llama/Meta-Llama-3-8B", "device": "H200", "workload": _H200_QLORA,
     "measured": {"memory_gib": 8.286, "memory_kind": "allocated", "tokens_per_s": 5509.6},
     "time_check": True},
    {"id": "bench/gpu_qlora.py tunelab arm, 1x H200, run A (peft's fp32 upcast, before prepare_quantized)",
     "source": "bench/results/gpu_qlora_h200_peft_prepare.json (BENCHMARKS.md, GPU section), 2026-11-29",
     "model": "meta-llama/Meta-Llama-3-8B", "device": "H200",
     "workload": {**_H200_QLORA, "upcast_non_quantized": True},
     "measured": {"memory_gib": 12.294, "memory_kind": "allocated", "tokens_per_s": 2984.1},
     "time_check": False,
     "why": "that code path (per-example SDPA with a host sync per layer) is gone; memory only"},
]


def point_from_gpu_qlora(result: dict, arm: str, device: str, date: str) -> dict:
    """A VALIDATION point from bench/gpu_qlora.py's gpu_qlora.json (Llama-3-8B shapes, synthetic rows of
    min_len..seq tokens, LoRA r16 on the 7 projections, checkpointing, adamw_8bit): append it to VALIDATION."""
    r = next(x for x in result["arms"] if x.get("arm") == arm)
    seq, batch, accum = result["seq"], result["batch"], result["accum"]
    mean_len = (result["min_len"] + seq) / 2
    packed = arm == "tunelab"
    step_tokens = batch * accum * (mean_len if packed else (result["min_len"] + 2 * seq) / 3)  # E[max of 2 uniform]
    return {"id": f"bench/gpu_qlora.py {arm} arm, 1x {device}", "source": f"bench/gpu_qlora.py on {device}, {date}",
            "model": "meta-llama/Meta-Llama-3-8B", "device": device,
            "workload": dict(method="qlora", compute_bytes=2, quant_bits=NF4_BITS[True], lora_r=16,
                             lora_targets=_LLAMA_ALL, optim="adamw_8bit", gradient_checkpointing=True,
                             chunked_loss=packed, tokens_per_pass=min(4096, batch * seq) if packed else batch * seq,
                             tokens_per_step=float(r["tokens_per_step"]
                                                   if isinstance(r.get("tokens_per_step"), (int, float))
                                                   else step_tokens),
                             attn_sq_per_step=batch * accum * mean_len ** 2, passes_per_step=1 if packed else accum,
                             steps=None),
            "measured": {"memory_gib": r["peak_gpu_gib"], "memory_kind": "allocated",
                         "tokens_per_s": r["tokens_per_second"]},
            "time_check": True}


def check_point(p: dict) -> dict:
    """Estimate one VALIDATION point; returns the estimate next to the measurement."""
    shape = BUILTIN_SHAPES[p["model"]]
    dev = get_device(p["device"])
    w = Workload(**p["workload"])
    mem = estimate_memory(shape, w, dev)
    tm = estimate_time(shape, w, dev)
    m = p["measured"]
    out = {"id": p["id"], "verdict": verdict(mem, dev)}
    if "memory_gib" in m:
        est = (mem.allocated if m["memory_kind"] == "allocated" else mem.total) / GIB
        out.update(memory_est_gib=round(est, 2), memory_gib=round(m["memory_gib"], 2),
                   memory_ratio=round(est / m["memory_gib"], 3))
    if "tokens_per_s" in m:
        rng = tuple(w.tokens_per_step / s for s in reversed(tm.s_per_step))  # slow .. fast
        out.update(time_est=[round(x) for x in rng], time_measured=m["tokens_per_s"], time_unit="tokens/s",
                   time_in_range=rng[0] <= m["tokens_per_s"] <= rng[2])
    elif "total_s" in m:
        fast, mid, slow = tm.total_s
        out.update(time_est=[round(fast), round(mid), round(slow)], time_measured=m["total_s"], time_unit="s",
                   time_in_range=fast <= m["total_s"] <= slow)
    return out


def check_measured(point: dict, repo: Path) -> dict:
    """Estimate one of this machine's measured runs (bench/results/plan_validation.json) from its config, on the
    CPU kind it ran on (`cpu_kind`: cpu_device's; default the host's)."""
    from .config import load_config

    cfg, _ = load_config(repo / point["config"], point["overrides"])
    prof, why = read_data(cfg, (repo / point["config"]).parent)
    dev = cpu_device(point.get("cpu_kind"))
    shape, _ = find_shape(cfg.model.name, cfg.model.revision)
    w = workload_from_config(cfg, prof, dev)
    mem = estimate_memory(shape, w, dev)
    tm = estimate_time(shape, w, dev)
    rate = point.get("matmul_gflops_before_after")
    at_load = None
    if rate:  # the same model at the matmul rate measured around the run (the machine's share at the time)
        g = sum(rate) / len(rate) / 1000
        at_load = estimate_time(shape, w,
                                dataclasses.replace(dev, tflops32=g, tflops16=g * dev.tflops16 / dev.tflops32))
    return {"id": point["id"], "memory_est_gib": round(mem.total / GIB, 3), "memory_gib": point["peak_rss_gib"],
            "memory_ratio": round(mem.total / GIB / point["peak_rss_gib"], 3),
            "s_per_step_est": [round(x, 2) for x in tm.s_per_step], "s_per_step": point["s_per_step"],
            "time_ratio": round(tm.s_per_step[1] / point["s_per_step"], 3),
            "time_ratio_at_measured_rate": round(at_load.s_per_step[1] / point["s_per_step"], 3) if at_load else None,
            "tokens": why or prof.source}
