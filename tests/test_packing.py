"""Padding-free packing (tunelab/data/packing.py): no cross-example attention, same loss and gradient."""

import json

import pytest
import torch

from test_loss import _batch, _peft_tiny
from tunelab.cli import main
from tunelab.data.packing import PackedCollator, packed_attention, split_packed
from tunelab.loss import chunked_causal_lm_loss


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_packed_loss_equals_sum_of_separate_losses(tiny_model):
    model, tok = _peft_tiny(tiny_model)
    rows, _ = _batch(tok, n=4)
    packed = PackedCollator()([dict(r, row_index=i) for i, r in enumerate(rows)])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist()[:3] == [0, 1, 2]
    assert packed["row_index"].tolist() == [0, 1, 2, 3]

    # each example alone, no padding, summed token losses (the stock loss of the model)
    alone, grads = 0.0, None
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        labels = torch.tensor([r["labels"]])
        n = (labels[:, 1:] != -100).sum()
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss
        g = torch.autograd.grad(loss, _trainable(model))
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        alone += loss.item()
        assert n > 0
    packed.pop("row_index")
    one = torch.tensor(1)
    for chunked in (True, False):  # tunelab's chunked loss and the model's own loss, both packed
        with packed_attention(model):
            if chunked:
                loss = chunked_causal_lm_loss(model, packed, one, chunk_size=16)
            else:
                loss = model(**packed, num_items_in_batch=one).loss
            g = torch.autograd.grad(loss, _trainable(model))
        assert abs(loss.item() - alone) < 1e-4, (chunked, loss.item(), alone)
        assert max((a - b).abs().max().item() for a, b in zip(grads, g)) < 1e-4


def test_no_attention_across_examples(tiny_model):
    """Changing the second example leaves the first one's logits untouched."""
    model, tok = _peft_tiny(tiny_model)
    rows, _ = _batch(tok, n=2)
    other = dict(rows[1], input_ids=[(t * 7 + 3) % 300 for t in rows[1]["input_ids"]])
    outs = []
    for second in (rows[1], other):
        p = PackedCollator()([rows[0], second])
        n0 = len(rows[0]["input_ids"])
        with torch.no_grad(), packed_attention(model):
            outs.append(model(input_ids=p["input_ids"], position_ids=p["position_ids"],
                              cu_seq_lens_q=p["cu_seq_lens_q"], cu_seq_lens_k=p["cu_seq_lens_k"],
                              max_length_q=p["max_length_q"], max_length_k=p["max_length_k"]).logits[0, :n0])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def test_split_packed_at_example_boundaries():
    lens = [5, 7, 3, 9, 2]
    rows = [{"input_ids": list(range(100 + 10 * i, 100 + 10 * i + n)), "labels": list(range(n))} for i, n in enumerate(lens)]
    packed = PackedCollator()(rows)
    assert split_packed(packed, 100) == [packed]
    pieces = split_packed(packed, 12)
    assert [p["input_ids"].shape[1] for p in pieces] == [12, 12, 2]  # 5+7 | 3+9 | 2
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces], 1), packed["input_ids"])
    for p in pieces:
        assert p["position_ids"][0, 0] == 0 and p["labels"][0, 0] == -100
        assert p["cu_seq_lens_q"][-1] == p["input_ids"].shape[1]
    assert [p["input_ids"].shape[1] for p in split_packed(packed, 4)] == lens  # too long: one example each


def _losses(run, step):
    state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h], int(state["num_input_tokens_seen"])


def test_packed_training_matches_unpacked(tmp_path, tiny_config):
    """Same examples per step, same loss curve; pack_max_tokens small enough to split a step."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--set", "train.max_steps=3", "--set", "train.save_steps=3", "--set", "data.test_size=0",
              "--set", "train.gradient_accumulation_steps=3", "--set", "train.per_device_train_batch_size=2"]
    assert main(["train", str(tiny_config), "--output", str(a), *common]) == 0
    assert main(["train", str(tiny_config), "--output", str(b), *common, "--set", "data.packing=true",
                 "--set", "data.pack_max_tokens=64"]) == 0
    (la, ta), (lb, tb) = _losses(a, 3), _losses(b, 3)
    assert [json.loads((r / "summary.json").read_text())["pack_max_tokens"] for r in (a, b)] == [None, 64]
    assert ta == tb  # the same non-pad tokens were trained
    assert len(la) == len(lb) == 3 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    wa = load_file(a / "final" / "adapter_model.safetensors")
    wb = load_file(b / "final" / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.parametrize("flags,auto", [(("Xeon", frozenset({"avx512f", "avx512_bf16", "amx_bf16"})), 1024),
                                        (("AMD EPYC", frozenset({"avx2", "fma"})), 512)])
def test_pack_max_tokens_auto_splits_by_the_cpus_precision(monkeypatch, tmp_path, tiny_model, flags, auto):
    """data.pack_max_tokens: auto -> pieces of at most 1,024 tokens on a CPU with native bf16 (bf16-mixed; 4,096
    cost about twice the memory there) and 512 where bf16 is emulated (float32 keeps 1.7x the bytes per token;
    BENCHMARKS.md); a number given is used as is."""
    from tunelab import precision
    from tunelab.config import config_from_dict
    from tunelab.train import build_model, make_trainer, setup_data, training_arguments

    monkeypatch.setattr(precision, "cpu_info", lambda: flags)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": "ok"})
                              for i in range(8)) + "\n")
    got = []
    for pack in ("auto", 4096):
        cfg = config_from_dict({"model": {"name": str(tiny_model), "dtype": "auto"},
                                "data": {"path": str(data), "packing": True, "pack_max_tokens": pack,
                                         "max_seq_length": 256},
                                "train": {"max_steps": 1, "report_to": []}})
        s = setup_data(cfg)
        trainer = make_trainer(build_model(s), training_arguments(cfg, tmp_path / str(pack), s.device, s.dtype,
                                                                  has_eval=False), s, interactive=False)
        got.append(trainer.pack_max_tokens)
    assert got == [auto, 4096]


def test_group_by_length_batches_rows_of_similar_length(tmp_path, tiny_model):
    """train.group_by_length changes what the Trainer feeds: batches of similar-length rows, so far
    less padding than random batches over the same rows."""
    import random

    from tunelab.config import config_from_dict
    from tunelab.train import build_model, make_trainer, setup_data, training_arguments

    rng = random.Random(0)
    data = tmp_path / "varied.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "input": "",
                                           "output": " ".join(["the answer"] * rng.randint(1, 40))})
                              for i in range(64)) + "\n")
    padding = {}
    for grouped in (False, True):
        cfg = config_from_dict({"model": {"name": str(tiny_model)},
                                "data": {"path": str(data), "max_seq_length": 256},
                                "train": {"per_device_train_batch_size": 8, "max_steps": 8, "report_to": [],
                                          "group_by_length": grouped}})
        s = setup_data(cfg)
        trainer = make_trainer(build_model(s), training_arguments(cfg, tmp_path / str(grouped), s.device, s.dtype,
                                                                  has_eval=False), s, interactive=False)
        batches = list(trainer.get_train_dataloader())
        assert sum(b["input_ids"].shape[0] for b in batches) == 64  # every row once either way
        padding[grouped] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert padding[True] < 0.5 * padding[False], padding


def test_one_ignore_index():
    from pathlib import Path

    import tunelab

    src = Path(tunelab.__file__).parent
    defs = [f"{f.relative_to(src)}" for f in src.rglob("*.py") if "\nIGNORE_INDEX = " in f.read_text()]
    assert defs == ["data/pipeline.py"], defs
