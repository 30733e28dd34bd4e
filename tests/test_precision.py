"""model.dtype: the precision policy (auto -> float32 on a CPU, saying whether bf16-mixed would be native there;
bf16-mixed on request) and a tiny-model run where bf16 autocast is really active while the weights stay fp32."""

import json

import pytest
import torch
from torch import nn

from tunelab import precision as models  # the device/dtype policy (re-exported by tunelab.models)
from tunelab.cli import main

NATIVE = ("Intel(R) Xeon(R) Platinum 8480+", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
AVX2 = ("AMD EPYC 7B12", frozenset({"avx2", "fma"}))


@pytest.mark.parametrize("cpu,name,autocast,flag", [(NATIVE, "float32", None, "avx512_bf16"),
                                                    (AVX2, "float32", None, "avx2")])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, cpu, name, autocast, flag):
    monkeypatch.setattr(models, "cpu_info", lambda: cpu)
    p = models.pick_precision("auto", "cpu")
    assert (p.name, p.weights, p.autocast) == (name, torch.float32, autocast)
    assert cpu[0] in p.reason and flag in p.reason  # the flags it read are in the reason
    assert ("bf16-mixed" in p.reason) == (cpu is NATIVE)  # where it would be native, it says how to opt in
    assert models.pick_dtype("auto", "cpu") == torch.float32  # master weights are fp32 either way
    assert models.cpu_has_native(torch.bfloat16) == (cpu is NATIVE)
    # explicit choices are honoured whatever the CPU
    assert models.pick_precision("float32", "cpu").autocast is None
    mixed = models.pick_precision("bf16-mixed", "cpu")
    assert (mixed.weights, mixed.autocast) == (torch.float32, torch.bfloat16)
    assert models.pick_precision("bfloat16", "cpu").weights == torch.bfloat16


def _train_and_watch(monkeypatch, tmp_path, tiny_config, cpu, dtype="auto"):
    """Train the tiny model in-process with the CPU flags mocked; returns (summary, matmul output dtypes seen
    in training, parameter dtypes after training, optimizer state dtypes)."""
    import tunelab.train as train

    monkeypatch.setattr(models, "cpu_info", lambda: cpu)
    seen, holder = set(), {}
    build = train.build_model

    def watched(s):
        model = build(s)
        holder["model"] = model
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype) if mod.training else None)
        return model

    monkeypatch.setattr(train, "build_model", watched)
    out = tmp_path / "run"
    assert main(["train", str(tiny_config), "--output", str(out), "--set", f"model.dtype={dtype}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    params = {p.dtype for p in holder["model"].parameters()}
    opt = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    states = {t.dtype for st in opt["state"].values() for t in st.values() if torch.is_tensor(t) and t.ndim > 0}
    return summary, seen, params, states


def test_bf16_mixed_on_a_native_bf16_cpu_autocasts_with_fp32_weights(monkeypatch, tmp_path, tiny_config, capsys):
    summary, seen, params, states = _train_and_watch(monkeypatch, tmp_path, tiny_config, NATIVE, "bf16-mixed")
    assert summary["precision"]["name"] == "bf16-mixed" and summary["compute_dtype"] == "bf16-mixed"
    assert summary["precision"]["weights"] == "float32" and summary["precision"]["autocast"] == "bfloat16"
    assert "avx512_bf16" in summary["precision"]["reason"]
    assert torch.bfloat16 in seen  # autocast really ran the matmuls in bf16 (tunelab's chunked-loss path too)
    assert params == {torch.float32} and states == {torch.float32}  # master weights and Adam state stay fp32
    assert "precision: bf16-mixed" in capsys.readouterr().err.replace("\n", " ")


def test_auto_on_an_avx2_cpu_trains_fp32(monkeypatch, tmp_path, tiny_config, capsys):
    summary, seen, params, states = _train_and_watch(monkeypatch, tmp_path, tiny_config, AVX2)
    assert summary["precision"]["name"] == "float32" and summary["precision"]["autocast"] is None
    assert "avx2" in summary["precision"]["reason"]
    assert seen == {torch.float32} and params == {torch.float32}
    assert "precision: float32" in capsys.readouterr().err.replace("\n", " ")
