"""tunelab/fastlora.py: the fused LoRA layers of bf16-mixed training on a CPU. Differential tests against peft's
own layers (outputs and every LoRA gradient), the sibling grouping (one Function call per group), the
fallbacks to peft (dropout, DoRA, disabled and merged adapters), a run through `tunelab train`, and a test that
goes red when peft's LoRA Linear changes what fuse_lora reads."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunelab import fastlora
from tunelab.cli import main

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(tiny_model, **kw):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, **kw))
    with torch.no_grad():  # B is zero at init: give the adapter a real contribution to check
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst(grads, ref):
    return max(((grads[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


@pytest.mark.parametrize("autocast", [True, False])
def test_fused_layers_match_peft_outputs_and_gradients(tiny_model, autocast):
    """Same loss and LoRA gradients as peft's layers in fp32, within bf16's rounding of the frozen matmuls, and
    at least as close to fp32 as peft under bf16 autocast (which also rounds the adapter's path to bf16)."""
    ref = _lora(tiny_model)
    fused = copy.deepcopy(ref)
    assert fastlora.fuse_lora(fused) == 2 * len(MODULES)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    loss32, g32 = _loss_and_grads(ref, ids, False)
    loss_ac, g_ac = _loss_and_grads(ref, ids, True)
    loss_f, g_f = _loss_and_grads(fused, ids, autocast)
    assert set(g_f) == set(g32) and all("lora_" in k for k in g_f)
    assert abs(loss_f - loss32) < 2e-3 * loss32
    assert _worst(g_f, g32) < 0.03, _worst(g_f, g32)
    assert _worst(g_f, g32) < 1.2 * _worst(g_ac, g32) + 1e-3
    # every adapter's gradient is there and right: a fused layer that dropped B's product would be far off
    assert min(g.norm().item() for g in g_f.values()) > 0


def test_siblings_are_one_matmul_and_frozen_weights_bf16_views(tiny_model, monkeypatch):
    model = _lora(tiny_model)
    fastlora.fuse_lora(model)
    assert fastlora.fuse_lora(model) == 0  # idempotent
    calls = []
    apply = fastlora._LoraGroup.apply
    monkeypatch.setattr(fastlora._LoraGroup, "apply", lambda *a: calls.append(len(a[3][0])) or apply(*a))
    ids = torch.randint(0, 300, (1, 16))
    model(input_ids=ids).logits.sum().backward()
    # per decoder layer: q/k/v together, o alone, gate/up together, down alone
    assert sorted(calls) == sorted([3, 1, 2, 1] * 2), calls
    attn = model.base_model.model.model.layers[0].self_attn
    group = attn.q_proj.tunelab_group
    assert group is attn.k_proj.tunelab_group is attn.v_proj.tunelab_group
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        w = m.get_base_layer().weight
        assert w.dtype == torch.bfloat16 and not w.requires_grad
        assert w.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_a_sibling_called_with_another_input_is_computed_on_its_own(tiny_model):
    model = _lora(tiny_model)
    ref = copy.deepcopy(model)
    fastlora.fuse_lora(model)
    attn, attn_ref = (m.base_model.model.model.layers[0].self_attn for m in (model, ref))
    x, y = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    q = attn.q_proj(x)  # computes q, k and v of x, keeps k and v
    x.mul_(2)  # x changed in place: the kept k of the old x must not be served
    k = attn.k_proj(x)
    v_other = attn.v_proj(y)  # not x: v of y
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expect = [attn_ref.q_proj(x / 2), attn_ref.k_proj(x), attn_ref.v_proj(y)]
    for got, want in zip((q, k, v_other), expect):
        assert torch.allclose(got, want.float(), atol=2e-2, rtol=2e-2), (got - want).abs().max()


@pytest.mark.parametrize("kw", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_unsupported_adapters_keep_peft_layers(tiny_model, kw):
    assert fastlora.fuse_lora(_lora(tiny_model, **kw)) == 0


def test_trained_base_biases_keep_peft_layers():
    """lora.bias=all/lora_only trains the projections' own biases (Qwen2's q/k/v have them): the fused path
    would add a detached copy, so such layers keep peft's, and the bias gets its gradient."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules=MODULES, bias="all"))
    assert fastlora.fuse_lora(model) == 4  # o/gate/up/down have no bias: fused; q/k/v: peft's
    assert fastlora.fused_layers(model)["groups"] == {"o_proj": 1, "gate_proj+up_proj": 1, "down_proj": 1}
    ids = torch.randint(0, 64, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.get_base_layer().bias.grad is not None and q.get_base_layer().bias.grad.norm() > 0


def test_disabled_and_merged_adapters_fall_back_to_peft(tiny_model):
    """DPO's reference pass disables the adapter (often outside autocast): with the frozen weights now bf16,
    peft's path must still run, and give the base model's output."""
    model = _lora(tiny_model)
    base_logits = None
    with torch.no_grad(), model.disable_adapter():
        base_logits = copy.deepcopy(model).base_model.model(input_ids=torch.arange(10)[None]).logits
    fastlora.fuse_lora(model)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits  # no autocast, fp32 input, bf16 frozen weights
        on = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert torch.allclose(off.float(), base_logits, atol=0.05), (off - base_logits).abs().max()
    assert (on.float() - off.float()).abs().max() > 0.05  # the adapter does something...
    assert torch.allclose(merged.float(), on.float(), atol=0.1)  # ...and merging keeps it


def test_peft_fallback_of_a_fused_layer_keeps_the_lora_sum_in_fp32(tiny_model):
    """train.build_model hooks every LoRA base layer (precision.lora_sums_in_fp32) before fusing; the fused path
    never calls them, but peft's path does where a fused layer falls back to it with extra arguments (a mixed batch's
    adapter_names): the hook keeps that sum in fp32 there, as on unfused layers."""
    from tunelab.precision import lora_sums_in_fp32

    model = _lora(tiny_model)
    lora_sums_in_fp32(model)
    fastlora.fuse_lora(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, q.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = q(x)
        fallback = q(x, adapter_names=["default", "default"])
    assert fused.dtype == fallback.dtype == torch.float32
    assert torch.allclose(fallback, fused, atol=2e-2, rtol=2e-2)


def test_peft_lora_linear_still_has_what_fuse_lora_reads():
    """fuse_lora reimplements peft's vanilla LoRA Linear (result = base(x) + lora_B(lora_A(dropout(x))) * scaling)
    and reads its state; red when peft renames or changes any of it."""
    from peft.tuners.lora.layer import Linear

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 6)), LoraConfig(r=2, lora_alpha=4,
                                                                                 target_modules=["0"]))
    m = model.base_model.model[0]
    assert type(m) is Linear
    for attr in ("disable_adapters", "merged", "active_adapters", "lora_A", "lora_B", "lora_dropout", "scaling",
                 "lora_variant", "fan_in_fan_out", "get_base_layer"):
        assert hasattr(m, attr), attr
    torch.nn.init.normal_(m.lora_B["default"].weight)
    x = torch.randn(3, 8)
    a, b, s = m.lora_A["default"], m.lora_B["default"], m.scaling["default"]
    assert s == 2.0 and fastlora.eligible(m)
    assert torch.allclose(m(x), m.get_base_layer()(x) + b(a(x)) * s, atol=1e-6)


def test_training_with_fused_layers_tracks_peft(monkeypatch, tmp_path, tiny_config, tiny_model, capsys):
    """`tunelab train` on bf16-mixed with lora.fused on (the default) and off: the same losses within bf16
    rounding, and the fused run's adapter is an ordinary peft adapter. The run log and summary.json say whether
    the fused layers were used: counts that match the model's layers, or the reason they were not."""
    from test_precision import NATIVE

    from tunelab import precision

    monkeypatch.setattr(precision, "cpu_info", lambda: NATIVE)
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    expect = {True: {"enabled": True, "layers": len(MODULES) * layers, "swiglu_mlps": layers,
                     "rms_norms": 2 * layers + 1,  # two per decoder layer and the final norm
                     "groups": {"q_proj+k_proj+v_proj": layers, "o_proj": layers, "gate_proj+up_proj": layers,
                                "down_proj": layers}},
              False: {"enabled": False, "reason": "lora.fused=false"}}
    lines = {True: f"fused LoRA layers: {layers} q/k/v + {layers} o + {layers} gate/up + {layers} down groups "
                   f"({len(MODULES) * layers} layers), {layers} SwiGLU, {2 * layers + 1} RMSNorm (lora.fused)",
             False: "fused LoRA layers: off (lora.fused=false)"}
    losses = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        capsys.readouterr()
        assert main(["train", str(tiny_config), "--output", str(out), "--set", "model.dtype=bf16-mixed",
                     "--set", f"lora.fused={str(fused).lower()}", "--set", "train.logging_steps=1"]) == 0
        assert lines[fused] in capsys.readouterr().err.splitlines()
        assert json.loads((out / "summary.json").read_text())["fused_lora"] == expect[fused]
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        losses[fused] = [h["loss"] for h in state["log_history"] if "loss" in h]
        assert (out / "final" / "adapter_model.safetensors").exists()
    out = tmp_path / "float32"  # the tiny config's dtype
    assert main(["train", str(tiny_config), "--output", str(out), "--set", "train.max_steps=1"]) == 0
    assert "fused LoRA layers: off (float32: the fused layers are for bf16-mixed)" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["fused_lora"] == {
        "enabled": False, "reason": "float32: the fused layers are for bf16-mixed"}
    a, b = losses[True], losses[False]
    assert len(a) == len(b) == 4 and all(abs(x - y) < 0.01 * abs(y) for x, y in zip(a, b)), (a, b)
    assert a[-1] < a[0]  # it trains


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_fusing_releases_the_checkpoint_map(tiny_model, tmp_path):
    """transformers' CPU load leaves the weights as views of safetensors' map of the checkpoint; after fusing, the
    frozen projections live in bf16 copies and the map (their fp32 pages) is released, the other parameters
    copied unchanged."""
    import gc
    import shutil

    folder = shutil.copytree(tiny_model, tmp_path / "model")  # a file no other test's model maps
    path = str(folder / "model.safetensors")

    def mapped():
        return any(line.rstrip().endswith(path) for line in open("/proc/self/maps"))

    model = _lora(folder)
    assert mapped()
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if "proj" not in n}
    assert fastlora.fuse_lora(model) > 0
    gc.collect()
    assert not mapped()
    now = dict(model.named_parameters())
    assert kept and all(torch.equal(now[n], v) for n, v in kept.items())


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """A loop that allocates and frees a 64 MB tensor: glibc maps fresh pages (page faults) each time by default,
    and reuses its heap once keep_freed_memory() ran."""
    code = """
import resource, sys, torch
from tunelab.precision import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory()
for _ in range(3):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {flag: int(subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for flag in ("0", "1")}
    assert faults["0"] > 20 * 1000  # 16,384 pages of 4 KiB per allocation
    # seen 327,700 -> 32,768-98,305 (the kernel's DAMON reclaims some idle heap pages, which fault again)
    assert faults["1"] < faults["0"] / 2, faults


def test_llama_mlp_is_still_down_of_silu_gate_times_up(tiny_model):
    """The fused MLP forward reimplements LlamaMLP's; red when transformers changes it."""
    model = _lora(tiny_model)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        want = mlp(x)  # transformers' forward over peft's layers
        got = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.allclose(want, got)
        fastlora.fuse_lora(model)
        assert "forward" in vars(mlp)  # the fused MLP forward is in place
        assert torch.allclose(mlp(x), want, atol=3e-2, rtol=3e-2)


def test_rms_norm_matches_transformers(tiny_model):
    """The hand-written RMSNorm against transformers' LlamaRMSNorm: output, input gradient and weight gradient
    (red if transformers changes the formula, e.g. to Gemma's 1 + w)."""
    model = _lora(tiny_model)
    norm = model.base_model.model.model.layers[0].input_layernorm
    assert type(norm).__name__ in fastlora.RMS_NORMS
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    norm.weight.requires_grad_(True)
    x = (torch.randn(2, 9, 64) * 3).requires_grad_(True)
    g = torch.randn(2, 9, 64)
    ref = norm(x)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, norm.weight), g)
    fastlora.fuse_lora(model)
    assert "forward" in vars(norm)
    out = norm(x)
    gx, gw = torch.autograd.grad(out, (x, norm.weight), g)
    assert torch.allclose(out, ref, atol=1e-5) and out.dtype == ref.dtype
    assert torch.allclose(gx, gx_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-4)
    xb = x.detach().bfloat16()
    assert torch.equal(norm(xb), type(norm).forward(norm, xb))  # a bf16 input: transformers' own path


@pytest.mark.parametrize("reentrant", [True, False])
def test_fused_layers_under_gradient_checkpointing(tiny_model, reentrant):
    """Checkpointing recomputes each layer in the backward pass: the kept sibling outputs must follow the
    recomputed input, and the gradients equal the plain fused run's."""
    model = _lora(tiny_model)
    fastlora.fuse_lora(model)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    _, plain = _loss_and_grads(model, ids, True)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    _, ckpt = _loss_and_grads(model, ids, True)
    assert set(ckpt) == set(plain)
    assert _worst(ckpt, plain) < 1e-5, _worst(ckpt, plain)


@pytest.mark.parametrize("dtype,fsdp,expected,reason", [
    ("bf16-mixed", False, 2 * len(MODULES), None), ("bf16-mixed", True, 0, "FSDP: the frozen weights are sharded"),
    ("float32", False, 0, "float32: the fused layers are for bf16-mixed")])
def test_build_model_fuses_only_bf16_mixed_lora_without_fsdp(monkeypatch, tiny_config, dtype, fsdp, expected,
                                                             reason):
    from tunelab.config import load_config
    from tunelab.train import build_model, fused_lora_report, setup_data

    if fsdp:  # FSDP shards the frozen weights: a group buffer would hold them whole on every rank
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg, _ = load_config(tiny_config, [f"model.dtype={dtype}"])
    model = build_model(setup_data(cfg, tiny_config.parent))
    assert sum(hasattr(m, "tunelab_group") for m in model.modules()) == expected
    report = fused_lora_report(model, cfg, "cpu")  # summary.json `fused_lora`
    assert report["enabled"] == (reason is None) and report.get("reason") == reason
    assert report.get("layers", 0) == expected


@pytest.mark.parametrize("change,reason", [
    ({"lora.dropout": 0.1}, "lora.dropout=0.1 > 0"), ({"lora.use_dora": True}, "lora.use_dora=true"),
    ({"lora.fused": False}, "lora.fused=false"), ({"quantization.load_in_4bit": True}, "QLoRA: the 4-bit base keeps "
                                                  "peft's layers"),
    ({"lora.enabled": False}, "full fine-tune, no LoRA layers"),
    ({"train.method": "dpo"}, "train.method=dpo: fused layers are for SFT runs")])
def test_fused_lora_report_names_why_peft_layers_stayed(tiny_config, change, reason):
    """summary.json `fused_lora` of a model without fused layers: the reason, from the run's settings."""
    from tunelab.config import load_config
    from tunelab.train import fused_lora_report

    cfg, _ = load_config(tiny_config, ["model.dtype=bf16-mixed"])
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    assert fused_lora_report(torch.nn.Linear(2, 2), cfg, "cpu") == {"enabled": False, "reason": reason}
    cfg, _ = load_config(tiny_config, ["model.dtype=bf16-mixed"])
    assert fused_lora_report(torch.nn.Linear(2, 2), cfg, "cuda")["reason"] == "cuda: the fused layers are for CPUs"
