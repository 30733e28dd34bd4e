"""QLoRA, full fine-tune, early stopping and the overfitting warning, on the tiny model."""

import json

from safetensors.torch import load_file

from tunelab.cli import main


def test_qlora_4bit_nf4_trains_on_cpu(tmp_path, tiny_config, capsys):
    out = tmp_path / "q"
    code = main(["train", str(tiny_config), "--output", str(out), "--set", "quantization.load_in_4bit=true",
                 "--set", "quantization.compute_dtype=float32", "--set", "train.optim=adamw_8bit"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "QLoRA (4-bit base)" and summary["global_step"] == 4
    w = load_file(out / "final" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in w) and all(t.isfinite().all() for t in w.values())
    assert "QLoRA" in capsys.readouterr().err


def test_full_finetune_saves_whole_model(tmp_path, tiny_config):
    out = tmp_path / "full"
    assert main(["train", str(tiny_config), "--output", str(out), "--set", "lora.enabled=false",
                 "--set", "train.learning_rate=1e-4"]) == 0
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final" / "adapter_config.json").exists()
    assert json.loads((out / "summary.json").read_text())["method"] == "full fine-tune"


def test_early_stopping_and_overfit_warning(tmp_path, tiny_config, capsys):
    out = tmp_path / "es"
    # a very high learning rate on a tiny set: eval loss turns up quickly
    code = main(["train", str(tiny_config), "--output", str(out), "--set", "train.max_steps=60",
                 "--set", "train.eval_steps=2", "--set", "train.save_steps=2", "--set", "train.learning_rate=3e-2",
                 "--set", "eval.early_stopping_patience=3", "--set", "data.test_size=0.25"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped"] and summary["global_step"] < 60
    assert summary["best_eval_step"] < summary["global_step"]


def test_overfit_watch_logic():
    from types import SimpleNamespace

    from tunelab.callbacks import OverfitWatch

    w = OverfitWatch()
    hist = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 31)]
    for step, ev in [(10, 1.0), (20, 1.1), (30, 1.2)]:
        w.on_evaluate(None, SimpleNamespace(global_step=step, log_history=hist), None, metrics={"eval_loss": ev})
    assert w.message and "possible overfitting" in w.message
    w2 = OverfitWatch()
    for step, ev in [(10, 1.0), (20, 0.9), (30, 0.8)]:
        w2.on_evaluate(None, SimpleNamespace(global_step=step, log_history=hist), None, metrics={"eval_loss": ev})
    assert w2.message is None


def test_check_command_reports_and_passes(tiny_config, capsys):
    assert main(["check", str(tiny_config)]) == 0
    err = capsys.readouterr().err
    assert "preflight passed" in err and "⟦<|im_end|>⟧◀" in err and "'<|endoftext|>'" in err
    assert "p50" in err and "rows" in err


def test_check_fails_on_pad_equal_eos(tiny_config, capsys):
    assert main(["check", str(tiny_config), "--set", "model.pad_token=<|im_end|>"]) == 2
    assert "is the EOS token" in capsys.readouterr().err


def test_gradient_checkpointing_reentrant_lora_matches_plain(tmp_path, tiny_config):
    """Recomputation must not change the math: same losses with and without gradient checkpointing."""
    curves = []
    for name, gc in (("plain", "false"), ("gc", "true")):
        out = tmp_path / name
        assert main(["train", str(tiny_config), "--output", str(out), "--set", f"train.gradient_checkpointing={gc}",
                     "--set", "data.test_size=0"]) == 0
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        curves.append([h["loss"] for h in state["log_history"] if "loss" in h])
    assert len(curves[0]) == 4
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-4


def test_dtype_warning_only_where_the_cpu_emulates_it(monkeypatch):
    import torch

    from tunelab import precision as models

    # cpu_has_native answers from the CPU's flags (a tautological isinstance check stood here before)
    monkeypatch.setattr(models, "cpu_info", lambda: ("AMD EPYC", frozenset({"avx2", "fma"})))
    assert models.cpu_has_native(torch.bfloat16) is False
    monkeypatch.setattr(models, "cpu_info", lambda: ("Xeon", frozenset({"avx512f", "avx512_bf16"})))
    assert models.cpu_has_native(torch.bfloat16) is True
    assert models.pick_dtype("auto", "cpu") == torch.float32 and models.dtype_warning(torch.float32, "cpu") is None
    monkeypatch.setattr(models, "cpu_has_native", lambda dtype: False)
    msg = models.dtype_warning(torch.bfloat16, "cpu")
    assert "without native bfloat16 support" in msg and msg.endswith("set model.dtype=float32")
    monkeypatch.setattr(models, "cpu_has_native", lambda dtype: True)
    assert models.dtype_warning(torch.bfloat16, "cpu") is None
    assert models.dtype_warning(torch.bfloat16, "cuda") is None


def test_qlora_keeps_unquantized_weights_in_compute_dtype(tiny_config):
    """peft's prepare_model_for_kbit_training upcasts embeddings, norms and head to fp32 (+2 GiB on an 8B
    model, slower on a GPU); tunelab keeps them in the compute dtype, frozen, and trains only the adapters."""
    import torch

    from tunelab.config import load_config
    from tunelab.train import build_model, setup_data

    cfg, _ = load_config(tiny_config, ["model.dtype=bfloat16", "quantization.load_in_4bit=true",
                                       "quantization.compute_dtype=bfloat16"])
    model = build_model(setup_data(cfg))
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
