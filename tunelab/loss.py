"""Causal-LM loss computed only where labels exist, in chunks, without the [batch, seq, vocab] logits.

The stock path (`model(**inputs).loss`) projects every position onto the vocabulary: for
SmolLM2 (vocab 49,152) a 4 x 512 batch makes a 400 MB fp32 logits tensor, plus its float copy,
log-softmax and gradient, and most of those positions are prompt or padding whose loss is masked
away anyway. Here the model runs with `logits_to_keep` naming no position (so its head projects
nothing) and the decoder's final hidden states are taken (final_hidden_states), the hidden states
of the positions whose next token is trained are gathered, and the output projection + cross-entropy run over them
in chunks of `chunk_size` rows. The gradient with respect to the hidden states (and to the head's
weight, when it is trained) is computed chunk by chunk in the same pass, so no chunk's logits
are kept for backward: peak extra memory is one chunk x vocab.

Hand-written rather than a library because the fused linear-cross-entropy kernels that exist
(Liger's `LigerFusedLinearCrossEntropyLoss`, Apple's cut-cross-entropy) are Triton/CUDA-only and
do not run on a CPU; the arithmetic below is the textbook softmax-minus-one-hot gradient.

Normalisation matches transformers' `ForCausalLMLoss`: labels shift left by one, -100 is ignored,
the summed loss is divided by `num_items_in_batch` when the Trainer passes it (gradient
accumulation over several micro-batches stays exact) and by the local count otherwise.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .data.pipeline import IGNORE_INDEX

log = logging.getLogger("tunelab")

# Architectures whose logits are exactly `lm_head(final hidden state)`: no soft-capping
# (Gemma 2/3), no logit scaling (Cohere, Granite), no router auxiliary loss (MoE). Others fall
# back to the stock loss.
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gemma"}
_SCALING_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), gradients computed chunk-wise in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        # Under autocast (bf16-mixed) each matmul below would cast the whole head weight to the autocast dtype
        # again: twice per chunk, a vocab x hidden copy each (49,152 x 576 for SmolLM2, 33 casts per demo-sized
        # step, ~5% of its time). Cast it once here and run the chunks with autocast off in the dtypes autocast
        # would pick: the same arithmetic, one copy.
        dev = hidden.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        w = weight.detach().to(cast) if cast is not None else weight
        with torch.autocast(dev, enabled=False):
            for s in range(0, hidden.shape[0], chunk_size):
                h = hidden[s:s + chunk_size]
                if cast is not None:
                    h = h.to(cast)
                t = targets[s:s + chunk_size]
                logits = h @ w.t()
                if bias is not None:
                    logits = logits + bias
                logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_h or need_w or need_b:
                    # d CE / d logits = softmax - one_hot(target); computed in place over the chunk's logits
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    if need_b:
                        grad_b += probs.sum(0)
                    p = probs.to(w.dtype)
                    if need_h:
                        grad_h[s:s + chunk_size] = p @ w
                    if need_w:
                        if cast is not None:  # autocast's bf16 product, summed in fp32
                            grad_w += p.t() @ h
                        else:
                            grad_w += p.t().float() @ h.float()  # .float() is a no-op for fp32
                    del probs, p
                del logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = (grad_h * grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`; hidden is [n, H]."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output head) when the chunked loss reproduces this model's loss exactly, else None."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(m, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return None
    if any(getattr(cfg, a, None) for a in _SCALING_ATTRS):
        return None
    if not type(m).__name__.endswith("ForCausalLM") or not hasattr(m, "get_decoder"):
        return None
    head = m.get_output_embeddings()
    if type(head) is not nn.Linear:  # a LoRA-wrapped or quantized head: keep the stock path
        return None
    return m.get_decoder(), head


def final_hidden_states(wrapper: nn.Module, decoder: nn.Module, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden states for `inputs`, from a forward pass of the whole model through
    `wrapper` (the model itself, or a DistributedDataParallel around it) with `logits_to_keep` naming no
    position, so that the [batch, seq, vocab] logits are never built. Going through the wrapper matters
    under DDP: its forward is what arms the gradient all-reduce of the backward that follows; a direct
    call of the decoder would leave the gradients unsynchronised. The hidden states are taken from the
    decoder's output with a forward hook (public torch API), the same tensor `get_decoder()(...)` returns."""
    got = []
    handle = decoder.register_forward_hook(lambda module, args, output: got.append(output.last_hidden_state))
    try:
        none = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        wrapper(**inputs, use_cache=False, logits_to_keep=none)
    finally:
        handle.remove()
    if len(got) != 1:
        raise RuntimeError(f"chunked loss: the decoder ran {len(got)} times in one forward pass")
    return got[0]


def chunked_causal_lm_loss(model: nn.Module, inputs: dict, num_items_in_batch=None,
                           chunk_size: int = 1024, wrapper: nn.Module | None = None) -> torch.Tensor | None:
    """The causal-LM loss of `inputs` (input_ids, labels, optional attention_mask / position_ids /
    packing kwargs) through `model`, or None if this model isn't supported (use the stock loss).
    `wrapper`: the module whose forward runs the model (a DDP wrapper around `model`); default `model`."""
    parts = causal_lm_parts(model)
    if parts is None or "labels" not in inputs:
        return None
    decoder, head = parts
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    shift_labels = inputs.pop("shift_labels", None)
    hidden = final_hidden_states(model if wrapper is None else wrapper, decoder, inputs)
    if shift_labels is None:
        hidden = hidden[:, :-1]
        shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    h = hidden[keep]
    targets = shift_labels[keep]
    total = linear_cross_entropy(h, head.weight, head.bias, targets, chunk_size)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / targets.numel()  # nan for a batch without a trained token, like the stock mean
