"""Where a run computes and in what precision: the device, and the dtype policy read from the CPU's flags.

`model.dtype: auto` resolves here (pick_precision), for training and inference alike; the reason for the
choice (CPU model and flags) is printed at the start of a run and kept in summary.json.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass

import torch
from torch import nn

_KEPT = False


def keep_freed_memory() -> bool:
    """glibc: serve large allocations from the heap and keep freed memory there (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD at 1 GiB / 2 GiB) instead of mapping fresh pages each time. A CPU training step allocates
    tensors of tens of MB hundreds of times; every fresh page is a page fault the kernel serves by zeroing it
    (a loop of four elementwise ops on [3691, 1536] fp32 tensors: 5,536 faults and 17.7 ms per iteration by
    default, 2,879 and 12.4 ms with this; the bench's lever arm `tunelab:train.cpu_keep_freed_memory=false`
    measures a whole run). Process-wide, once; False where the C library is not glibc."""
    global _KEPT
    if _KEPT:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt  # glibc only
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _KEPT = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _KEPT


def pick_device(requested: str = "auto") -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        from .models import ModelError  # models imports this module: imported here, not at the top

        raise ModelError("model.device=cuda but no CUDA GPU is visible")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


# CPU flags (Linux /proc/cpuinfo names) that make a dtype's matmuls native rather than emulated.
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
# settings that hold torch's CPU kernels below what the CPU has (named in the reason when they do)
ONEDNN_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model name, set of CPU flags) from /proc/cpuinfo; ("", empty) where it can't be read (not Linux)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:  # Features: ARM
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor(), flags


def torch_native(dtype: torch.dtype) -> bool | None:
    """torch's own answer to "are `dtype` matmuls native here": whether its oneDNN will run them (it does not
    where the CPU lacks the instructions, nor where oneDNN is held below them, e.g. ONEDNN_MAX_CPU_ISA=AVX2, a
    setting that pins speed-sensitive hosts or mimics an older CPU). Without oneDNN, bf16 matmuls fall back to
    a slow path whatever the flags say. None where this torch has no such check. Private: no public API says so;
    torch's CPU autocast tests use the same checks."""
    try:
        check = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
                 else torch.ops.mkldnn._is_mkldnn_fp16_supported)
        return bool(check())
    except (AttributeError, RuntimeError):
        return None


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` matmuls natively: its flags have the instructions (AVX512_BF16 or
    AMX-BF16 for bf16, AVX512_FP16 or AMX-FP16 for fp16) and torch's oneDNN will use them (torch_native; the
    flags alone said "native" under ONEDNN_MAX_CPU_ISA=AVX2, where bf16 matmuls ran at 0.3-36 GFLOP/s against
    fp32's 168-221 on this project's Sapphire Rapids host). Where no flags can be read, torch's answer decides."""
    name = str(dtype).replace("torch.", "")
    _, flags = cpu_info()
    by_torch = torch_native(dtype)
    if flags:
        return any(f in flags for f in NATIVE_FLAGS.get(name, ())) and by_torch is not False
    return bool(by_torch)


@dataclass(frozen=True)
class Precision:
    """How a run computes: `weights` is the dtype of the parameters (and so of the optimizer state);
    `autocast` the dtype torch.autocast runs the matmuls in (None: no autocast)."""

    name: str  # float32 | bfloat16 | float16 | bf16-mixed
    weights: torch.dtype
    autocast: torch.dtype | None
    reason: str

    @property
    def compute(self) -> torch.dtype:
        return self.autocast or self.weights

    def to_dict(self) -> dict:
        return {"name": self.name, "weights": str(self.weights).replace("torch.", ""),
                "autocast": str(self.autocast).replace("torch.", "") if self.autocast else None, "reason": self.reason}


def _cpu_reason() -> str:
    model, flags = cpu_info()
    seen = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    why = f"CPU {model or 'unknown'}, flags read: {', '.join(seen) or 'none of avx2/avx512f/avx512_bf16/amx'}"
    if any(f in flags for f in NATIVE_FLAGS["bfloat16"]) and not cpu_has_native(torch.bfloat16):  # torch vetoed
        held = ", ".join(f"{k}={os.environ[k]}" for k in ONEDNN_LIMITS if os.environ.get(k))
        why += f"; but torch's oneDNN will not run bf16 here{f' ({held})' if held else ''}"
    return why


def pick_precision(requested: str, device: str) -> Precision:
    """model.dtype -> Precision.

    auto: on a GPU, bf16 weights where supported (fp16 otherwise), as the recipe does; on a CPU with native bf16
    (AVX512_BF16 or AMX) bf16-mixed: fp32 weights and optimizer state, matmuls in bf16 under torch.autocast (bf16's
    speed, fp32's update precision); on a CPU that would emulate bf16, float32. The others are plain weight
    dtypes, or bf16-mixed by name."""
    if requested == "bf16-mixed":
        why = "model.dtype=bf16-mixed" + (f" ({_cpu_reason()})" if device == "cpu" else "")
        return Precision("bf16-mixed", torch.float32, torch.bfloat16, why)
    if requested != "auto":
        dt = getattr(torch, requested)
        return Precision(requested, dt, dt if device != "cpu" or dt == torch.bfloat16 else None,
                         f"model.dtype={requested}")
    if device == "cuda":
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        name = str(dt).replace("torch.", "")
        return Precision(name, dt, dt, f"model.dtype=auto: GPU {'supports' if dt == torch.bfloat16 else 'lacks'} bf16")
    if device == "cpu" and cpu_has_native(torch.bfloat16):
        # bf16-mixed where bf16 is native: on the demo config (60 steps) it matched float32's eval loss and exact
        # match within noise once LoRA's small updates were kept visible (lora_sums_in_fp32, fp32_attention
        # below; BENCHMARKS.md, issue 16)
        return Precision("bf16-mixed", torch.float32, torch.bfloat16,
                         f"model.dtype=auto: native bf16 on this CPU -> bf16-mixed (fp32 weights and optimizer "
                         f"state, bf16 matmuls) ({_cpu_reason()})")
    return Precision("float32", torch.float32, None,
                     f"model.dtype=auto: no native bf16 on this CPU (bf16 would be emulated) -> float32 "
                     f"({_cpu_reason()})" if device == "cpu" else f"model.dtype=auto on {device} -> float32")


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """The weights' dtype for model.dtype (see pick_precision)."""
    return pick_precision(requested, device).weights


def dtype_warning(dtype: torch.dtype, device: str) -> str | None:
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native(dtype):
        name = str(dtype).replace("torch.", "")
        return (f"compute dtype {name} on a CPU without native {name} support: it is emulated and many times "
                f"slower than float32 (the recipe's stack trained 5.5 tokens/s so on an AVX2 CPU); "
                f"set model.dtype=float32")
    return None


# --- bf16-mixed numerics -------------------------------------------------------------------------------------
# Under bf16 autocast a LoRA layer's base matmul returns bf16, and peft adds the adapter's output to it in bf16.
# Early in training the update is below half a bf16 step of the base output (relative 2^-9), so the sum rounds
# back to the base value and the update is invisible to the forward pass: on the demo config one Adam-sized
# step (lr 1e-4) lowered the next batch's loss by 0.171 in fp32 but by 0.008 under plain bf16 autocast
# (the recipe's stack has the same loss). Two changes keep the update visible, at bf16 matmul speed:
#   1. the base output of every LoRA layer is upcast to fp32 before peft adds the adapter's (lora_sums_in_fp32);
#   2. attention whose inputs arrive in fp32 runs in fp32 (fp32_attention): v_proj's output goes straight into
#      attention, where autocast would round base+update back to bf16 (q/k pass through the fp32 rotary
#      embedding and gate/up/o/down through fp32 elementwise ops or the fp32 residual stream first, so their
#      later bf16 casts round an off-grid value and keep the update on average).
# With both, that step lowered the loss by 0.178 (fp32: 0.171). BENCHMARKS.md, issue 16.


def _upcast_under_autocast(module, args, output):
    if torch.is_tensor(output) and output.dtype in (torch.bfloat16, torch.float16) \
            and torch.is_autocast_enabled(output.device.type):
        return output.float()
    return None


def lora_sums_in_fp32(model: nn.Module) -> int:
    """LoRA under bf16 autocast: each adapted layer's base output (bf16) is upcast to fp32, so that peft adds the
    adapter's output to it in fp32 (see above). Plain fp32 or bf16 base layers (not quantized ones); the hook is
    a no-op outside autocast. Returns the number of layers hooked."""
    n = 0
    for m in model.modules():
        if not hasattr(m, "lora_B") or not hasattr(m, "get_base_layer"):
            continue
        base = m.get_base_layer()
        if type(base) is nn.Linear and base.weight.dtype in (torch.float32, torch.bfloat16):
            base.register_forward_hook(_upcast_under_autocast)
            n += 1
    return n


def wants_fp32_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Under autocast, attention whose inputs come in fp32 (bf16-mixed) runs in fp32 (see above); with bf16
    weights, or outside autocast, it runs as it is."""
    return torch.is_autocast_enabled(query.device.type) and torch.float32 in (query.dtype, key.dtype, value.dtype)


def fp32_attention_args(query, key, value, attention_mask):
    mask = attention_mask.float() if torch.is_tensor(attention_mask) and attention_mask.is_floating_point() \
        else attention_mask
    return query.float(), key.float(), value.float(), mask


FP32_SDPA = "tunelab_sdpa_fp32"
_registered = False


def _sdpa_fp32(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa attention, in fp32 when wants_fp32_attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not wants_fp32_attention(query, key, value):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, *fp32_attention_args(query, key, value, attention_mask), *args,
                                      **kwargs)


@contextlib.contextmanager
def fp32_attention(model: nn.Module, enabled: bool = True):
    """Within the block, a model on transformers' "sdpa" attention uses _sdpa_fp32 (same masks, sdpa's), which
    computes in fp32 where its inputs come in fp32 under autocast. tunelab's packed attention (data/packing.py)
    does the same itself; other implementations (flash, eager) are left alone."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(m, "config", None)
    if not enabled or cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        yield
        return
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(FP32_SDPA, _sdpa_fp32)
        AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
        _registered = True
    cfg._attn_implementation = FP32_SDPA
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"
