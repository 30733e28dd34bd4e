"""Chunked causal-LM loss (tunelab/loss.py) equals the stock loss, value and gradients."""

import json

import pytest
import torch
import torch.nn.functional as F

from tunelab.cli import main
from tunelab.loss import causal_lm_parts, chunked_causal_lm_loss, linear_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_reference(bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (37,), generator=g)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    gref = torch.autograd.grad(ref, [h, w] + ([b] if bias else []))
    got = linear_cross_entropy(h, w, b, t, chunk_size=8)  # 5 chunks, the last one short
    ggot = torch.autograd.grad(got, [h, w] + ([b] if bias else []))
    assert abs(got.item() - ref.item()) < 1e-4
    for a, c in zip(gref, ggot):
        assert torch.allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_under_autocast_casts_the_head_once(bias):
    """bf16-mixed: the same values and gradients as autocast's own per-chunk matmuls, with one bf16 copy of the
    head weight per call (each autocast matmul would cast it again: twice per chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (37,), generator=g)
    params = [h, w] + ([b] if bias else [])

    class Casts(TorchDispatchMode):  # copies of a weight-shaped tensor into bf16
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "copy" in str(func) and out.dtype == torch.bfloat16 and sorted(out.shape) == sorted(w.shape):
                Casts.n += 1
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sum(F.cross_entropy((h[s:s + 8] @ w.t() + (0 if b is None else b)).float(), t[s:s + 8],
                                  reduction="sum") for s in range(0, 37, 8))
        gref = torch.autograd.grad(ref, params)
        with Casts():
            got = linear_cross_entropy(h, w, b, t, chunk_size=8)  # 5 chunks
        ggot = torch.autograd.grad(got, params)
    assert Casts.n == 1
    assert abs(got.item() - ref.item()) < 1e-4 * abs(ref.item())
    for a, c in zip(gref, ggot):
        assert torch.allclose(a, c, rtol=2e-2, atol=2e-3), (a - c).abs().max()


def _peft_tiny(tiny_model, seed=0):
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_model, load_tokenizer

    tok, _ = load_tokenizer(tiny_model)
    torch.manual_seed(seed)
    model = load_model(tiny_model, tok, dtype=torch.float32, device="cpu")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    return model, tok


def _batch(tok, n=3):
    from tunelab.data.pipeline import Collator

    rows = []
    for i in range(n):
        prompt = tok(f"Add {i} and {i + 7}. The answer is", add_special_tokens=False)["input_ids"]
        resp = tok(f" {2 * i + 7} and that is all" + " ok" * i, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": prompt + resp, "labels": [-100] * len(prompt) + resp})
    return rows, Collator(tok.pad_token_id)(rows)


def test_chunked_loss_equals_model_loss(tiny_model):
    model, tok = _peft_tiny(tiny_model)
    assert causal_lm_parts(model) is not None
    _, batch = _batch(tok)
    ref = model(**batch).loss
    gref = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    got = chunked_causal_lm_loss(model, batch, None, chunk_size=5)
    ggot = torch.autograd.grad(got, [p for p in model.parameters() if p.requires_grad])
    assert abs(got.item() - ref.item()) < 1e-5
    assert max((a - c).abs().max().item() for a, c in zip(gref, ggot)) < 1e-5
    n = (batch["labels"][:, 1:] != -100).sum()
    ref_sum = model(**batch, num_items_in_batch=n).loss
    assert abs(chunked_causal_lm_loss(model, batch, n).item() - ref_sum.item()) < 1e-5


def _losses(run):
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_training_same_losses_with_and_without_chunked_loss(tmp_path, tiny_config):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--set", "train.max_steps=3", "--set", "train.save_steps=3", "--set", "data.test_size=0",
              "--set", "train.gradient_accumulation_steps=2", "--set", "train.per_device_train_batch_size=3"]
    assert main(["train", str(tiny_config), "--output", str(a), *common, "--set", "train.chunked_loss=false"]) == 0
    assert main(["train", str(tiny_config), "--output", str(b), *common, "--set", "train.loss_chunk_size=7"]) == 0
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 3
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (la, lb)
