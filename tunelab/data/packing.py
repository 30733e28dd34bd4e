"""Padding-free packing: the examples of one optimizer step, end to end in one row.

With `data.packing: true` the Trainer's batch is the whole optimizer step
(per_device_train_batch_size x gradient_accumulation_steps examples, the very examples the
unpacked run would use) and `PackedCollator` concatenates them into a single row without padding
(transformers' `DataCollatorWithFlattening`): position ids restart at 0 for every example, the
first label of every example is -100 (an example's last token never learns to predict the next
example's first), and `cu_seq_lens_q/k` mark the example boundaries. Attention never crosses a
boundary:
  - with `flash_attention_2` (GPU) the boundaries go to FlashAttention's varlen kernel as is;
  - otherwise `varlen_sdpa` (registered below as the attention implementation "tunelab_varlen"
    for the duration of a packed training step) runs PyTorch SDPA with is_causal=True on each
    example's slice. transformers' own sdpa path would build a [T, T] block-diagonal mask from the
    position ids and compute every masked-out score too: for 16 examples of 220 tokens that is
    16x the attention work of the per-example loop.
Because the loss is normalised by the step's trained-token count, the packed step's gradient
equals the unpacked 2 x 8 step's (tests/test_packing.py checks losses and gradients).

Rows longer than `data.pack_max_tokens` are split at example boundaries into several forward
passes whose gradients accumulate (`split_packed`): the budget bounds activation memory.
"""

from __future__ import annotations

import contextlib

import torch

from ..precision import fp32_attention_args, wants_fp32_attention
from .pipeline import IGNORE_INDEX

ATTN_NAME = "tunelab_varlen"
_NATIVE_VARLEN = {"flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", ATTN_NAME}


class PackedCollator:
    """Concatenates a batch's examples into one padding-free row (keeps `row_index` for error reports)."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                  return_flash_attn_kwargs=True, return_tensors="pt")

    def __call__(self, batch: list[dict]) -> dict:
        rows = [b.pop("row_index") for b in batch if "row_index" in b]
        out = self.flatten([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        if len(rows) == len(batch):
            out["row_index"] = torch.tensor(rows)
        return out


def is_packed(inputs: dict) -> bool:
    return "cu_seq_lens_q" in inputs


def split_packed(inputs: dict, max_tokens: int) -> list[dict]:
    """Split a packed row at example boundaries into pieces of at most `max_tokens` tokens
    (an example longer than that is a piece of its own). Returns [inputs] when it fits."""
    cu = inputs["cu_seq_lens_q"].tolist()
    if cu[-1] <= max_tokens:
        return [inputs]
    pieces, start = [], 0  # (first, end) example indices; greedy, in order
    for i in range(1, len(cu)):
        if cu[i] - cu[start] > max_tokens and i - 1 > start:
            pieces.append((start, i - 1))
            start = i - 1
    pieces.append((start, len(cu) - 1))
    out = []
    for a, b in pieces:
        s, e = cu[a], cu[b]
        piece = {k: v[:, s:e] for k, v in inputs.items() if k in ("input_ids", "labels", "position_ids")}
        seg = torch.tensor(cu[a:b + 1], dtype=inputs["cu_seq_lens_q"].dtype) - s
        piece["cu_seq_lens_q"] = piece["cu_seq_lens_k"] = seg.to(inputs["cu_seq_lens_q"].device)
        piece["max_length_q"] = piece["max_length_k"] = int((seg[1:] - seg[:-1]).max())
        out.append(piece)
    return out


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA per packed example (causal within it, nothing across); other inputs go to transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if wants_fp32_attention(query, key, value):  # bf16-mixed: see tunelab/precision.py
        with torch.autocast(query.device.type, enabled=False):
            return varlen_sdpa(module, *fp32_attention_args(query, key, value, attention_mask), dropout=dropout,
                               scaling=scaling, is_causal=is_causal, **kwargs)
    cu = kwargs.pop("cu_seq_lens_q", None)
    max_len = kwargs.pop("max_length_q", None)
    for k in ("cu_seq_lens_k", "max_length_k", "position_ids"):
        kwargs.pop(k, None)
    if cu is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = _mask_4d(attention_mask, query.shape[2])
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
        return _flash_varlen_forward(query, key, value, cu, max_len, scaling), None
    b = cu.tolist()
    lens = [e - s for s, e in zip(b[:-1], b[1:])]
    # One split per tensor, not a slice per example: a slice's backward zero-fills and adds a
    # full-length gradient per example (measured: a quarter of a packed step), split's is one cat.
    outs = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True,
                                   **kwargs)[0]  # [1, len, heads, head_dim]
            for q, k, v in zip(query.split(lens, 2), key.split(lens, 2), value.split(lens, 2))]
    return torch.cat(outs, dim=1), None


def _flash_varlen():
    """torch's own FlashAttention varlen kernel (torch.nn.attention.varlen, CUDA only), or None.

    On a GPU without the flash-attn package this is the one-kernel path for packed rows; the per-example
    SDPA loop above stays for CPUs (measured on an H200: see BENCHMARKS.md, GPU section)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_varlen_forward(query, key, value, cu, max_len, scaling):
    """[1, H, T, D] packed q/k/v -> [1, T, H, D], causal within each example of `cu`."""
    import inspect

    fn = _flash_varlen()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    params = inspect.signature(fn).parameters
    kw = {"scale": scaling}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # causal
    else:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu.to(device=q.device, dtype=torch.int32)
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    out = fn(q, k, v, cu, cu, int(max_len), int(max_len), **kw)
    return out.unsqueeze(0)  # [1, T, H, D], as transformers' attention functions return


def _mask_4d(mask2d: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, kv] padding mask -> [B, 1, q, kv] boolean causal+padding mask (queries at the end)."""
    kv = mask2d.shape[-1]
    causal = torch.ones(q_len, kv, dtype=torch.bool, device=mask2d.device).tril(kv - q_len)
    m = causal[None, None] & mask2d[:, None, None, :].bool()
    return m | ~m.any(-1, keepdim=True)  # a fully padded query row attends everywhere (its output is unused)


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, varlen_sdpa)
        _registered = True


@contextlib.contextmanager
def packed_attention(model):
    """Within the block, the model's attention handles packed rows (cu_seq_lens) exactly and cheaply."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(m, "config", None)
    current = getattr(cfg, "_attn_implementation", None)
    if cfg is None or current in _NATIVE_VARLEN:
        yield
        return
    register()
    cfg._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        cfg._attn_implementation = current
