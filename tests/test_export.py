import json
import shutil

import pytest
import torch

from tunelab.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    from tiny import write_alpaca

    d = tmp_path_factory.mktemp("exp")
    data = write_alpaca(d / "d.jsonl")
    cfg = d / "run.yaml"
    cfg.write_text(f"model: {{name: {tiny_model}}}\ndata: {{path: {data}, max_seq_length: 128}}\n"
                   "train: {per_device_train_batch_size: 4, gradient_accumulation_steps: 1, warmup_steps: 0,\n"
                   "        max_steps: 6, save_steps: 6, learning_rate: 5.0e-3}\n")
    runs = {}
    for name, sets in (("lora", []), ("qlora", ["--set", "quantization.load_in_4bit=true",
                                                 "--set", "quantization.compute_dtype=float32"])):
        runs[name] = d / name
        assert main(["train", str(cfg), "--output", str(runs[name])] + sets) == 0
    return runs


def test_export_lora_safetensors_and_gguf_f16(tmp_path, trained, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(trained["lora"]), "--to", str(out), "--gguf", "f16"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "verified: greedy outputs of the export equal the adapter model's on 3/3" in err
    assert "Converting and de-quantizing GGUF" not in err and "Writing model shards" not in err  # third-party bars
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "model-f16.gguf").stat().st_size > 10_000
    # the merged weights really contain the adapter: they differ from the base
    from safetensors.torch import load_file

    base_folder = json.loads((trained["lora"] / "config.yaml").read_text().split("name: ")[1].split("\n")[0].join(['"', '"']))
    base = load_file(f"{base_folder}/model.safetensors")
    merged = load_file(out / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[k], merged[k])
    # GGUF round trip through transformers' loader gives the same weights (f16 precision)
    from transformers import AutoModelForCausalLM

    g = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-f16.gguf", dtype=torch.float32)
    assert torch.allclose(g.state_dict()[k], merged[k].float(), atol=2e-3)
    # issue 17.2/17.5: the training template (alpaca here) travels in tokenizer_config, the GGUF and the Modelfile
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from tunelab.data.templates import Example, render_prompt

    etok = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "Add 12 and 30."}]
    want = render_prompt("alpaca", Example(instruction="Add 12 and 30."))
    assert etok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    field = GGUFReader(str(out / "model-f16.gguf")).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == etok.chat_template
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == etok.eos_token_id
    mf = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in mf and "### Instruction:\n{{ .Prompt }}" in mf and "PARAMETER stop" in mf
    # issue 17.1: the parity report (probes: the run's last training rows, it has no held-out set)
    parity = json.loads((out / "parity.json").read_text())
    steps = {r["step"]: r for r in parity["steps"]}
    assert parity["passed"] and "training rows" in parity["probe_source"]
    merged_p = steps["merged (float32)"]
    assert merged_p["rows"] == 32 and merged_p["max_abs_dlogp"] <= 1e-5 and merged_p["greedy_identical"] == 32
    assert steps["gguf f16"]["greedy_identical"] == 32 and "parity vs the adapter model on 32 probes" in err
    assert main(["export", str(trained["lora"]), "--to", str(out), "--verify-only", "--probe-rows", "4"]) == 0
    assert json.loads((out / "parity.json").read_text())["steps"][1]["rows"] == 4
    # refuses to overwrite
    assert main(["export", str(trained["lora"]), "--to", str(out)]) == 2


def test_export_qlora_merges_into_dequantized_16bit_and_q8_gguf(tmp_path, trained, capsys):
    out = tmp_path / "mq"
    assert main(["export", str(trained["qlora"] / "checkpoint-6"), "--to", str(out), "--gguf", "q8_0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "de-quantised from its 4-bit nf4 weights, saved in bfloat16" in err and "verified" in err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
    assert (out / "model-q8_0.gguf").is_file()


def test_export_missing_base_says_which(tmp_path, trained, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained["lora"], run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("name: ", "name: /nonexistent/base", 1)
                                     .replace("/nonexistent/base/", "/nonexistent/base-"))
    assert main(["export", str(run), "--to", str(tmp_path / "x")]) == 2
    assert "needs its base model '/nonexistent/base" in capsys.readouterr().err


def test_a_failing_parity_step_removes_its_output_and_exits_2(tmp_path, trained, capsys, monkeypatch):
    from tunelab import parity

    out = tmp_path / "strict"
    # a GGUF bound no f16 file can meet: the GGUF goes, the verified safetensors export stays
    monkeypatch.setitem(parity.THRESHOLDS, "gguf f16", (0.0, 0.0, 1.0))
    assert main(["export", str(trained["lora"]), "--to", str(out), "--gguf", "f16", "--probe-rows", "4"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "parity check failed for model-f16.gguf" in err and "FAIL" in err
    assert (out / "model.safetensors").is_file() and not (out / "model-f16.gguf").exists()
    assert not json.loads((out / "parity.json").read_text())["passed"]
    # a merged model outside its bound: nothing is written
    monkeypatch.setitem(parity.THRESHOLDS, "merged (float32)", (-1.0, -1.0, 1.0))
    assert main(["export", str(trained["lora"]), "--to", str(tmp_path / "none"), "--probe-rows", "4"]) == 2
    assert "merged model differs" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["export", str(trained["lora"]), "--to", str(out), "--verify-only", "--probe-rows", "4"]) == 2


# ---- issue 17.1: `tunelab serve` of the export and exact match in the parity report ------------------------


def test_parity_serves_the_export_and_keeps_exact_match(tmp_path, trained, tiny_model, capsys, monkeypatch):
    from tunelab import parity
    from tunelab.generate import GenParams, generate
    from tunelab.models import load_for_inference

    # a generation task the adapter model answers right on half the items (targets: its own first word)
    loaded = load_for_inference(str(trained["lora"]))
    qs = [f"Question: Add {i} and {i}.\nAnswer:" for i in range(8)]
    outs = generate(loaded, qs, GenParams(max_new_tokens=4), template="plain")
    targets = [(o.text.split() or ["?"])[0] if i % 2 == 0 else "zzzz" for i, o in enumerate(outs)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"q": f"Add {i} and {i}.", "a": a}) + "\n"
                                              for i, a in enumerate(targets)))
    (tmp_path / "t.yaml").write_text("name: firstword\nkind: generate\npath: t.jsonl\n"
                                     "context: \"Question: {q}\\nAnswer:\"\ntarget: \"{a}\"\nmax_new_tokens: 4\n"
                                     "regex: \"^\\\\s*(\\\\S+)\"\n")
    out = tmp_path / "e"
    capsys.readouterr()
    assert main(["export", str(trained["lora"]), "--to", str(out), "--probe-rows", "8",
                 "--task", str(tmp_path / "t.yaml")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    rep = json.loads((out / "parity.json").read_text())
    steps = {r["step"]: r for r in rep["steps"]}
    assert rep["passed"] and rep["exact_match"]["adapter"] == {"firstword": 0.5}
    assert rep["exact_match"]["items"] == {"firstword": 8}
    assert steps["merged (float32)"]["exact_match"] == {"firstword": 0.5}
    srv = steps["serve (float32)"]
    assert srv["greedy_identical"] == srv["rows"] == 8 and srv["exact_match"] == {"firstword": 0.5}
    assert srv["max_abs_dlogp"] is None and "logprobs with a 400" in srv["note"]
    assert "serve (float32)" in err and "exact match of the adapter model: firstword 50.0%" in err
    # the server's weights are what is measured: an export whose weights are the untuned base fails there
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shutil.copy(tiny_model / "model.safetensors", bad / "model.safetensors")
    assert main(["export", str(trained["lora"]), "--to", str(bad), "--verify-only", "--probe-rows", "8"]) == 2
    steps = {r["step"]: r for r in json.loads((bad / "parity.json").read_text())["steps"]}
    assert not steps["serve (float32)"]["passed"] and steps["serve (float32)"]["greedy_identical"] < 8
    # a serve step outside its bound: exit 2 with the table, the (verified) export is kept
    monkeypatch.setitem(parity.EXACT_MATCH_DROP, "serve (float32)", -0.01)
    capsys.readouterr()
    assert main(["export", str(trained["lora"]), "--to", str(tmp_path / "s"), "--probe-rows", "8",
                 "--task", str(tmp_path / "t.yaml")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "parity check failed for `tunelab serve` of the export" in err and "FAIL" in err
    assert (tmp_path / "s" / "model.safetensors").is_file()
