"""End to end on the embedded SmolLM2-135M-Instruct: a few real steps, checkpoint layout, resume, TensorBoard."""

import json

import pytest

from conftest import SHARED
from tunelab.cli import main

pytestmark = pytest.mark.slow


def test_smollm2_train_resume_tensorboard(tmp_path, capsys):
    data = SHARED / "train" / "alpaca_en_demo" / "data.json"
    if not data.is_file():
        from tiny import write_alpaca

        data = write_alpaca(tmp_path / "d.jsonl", n=60)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{name: smollm2-135m}}
data: {{path: {data}, only_empty_input: true, max_rows: 40, test_size: 0.1, max_seq_length: 128, drop_untrainable: true}}
train: {{per_device_train_batch_size: 2, per_device_eval_batch_size: 4, gradient_accumulation_steps: 1,
        warmup_steps: 1, max_steps: 2, eval_steps: 2, save_steps: 2, learning_rate: 2.0e-4}}
""")
    out = tmp_path / "run"
    assert main(["check", str(cfg)]) == 0
    assert main(["train", str(cfg), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    from tunelab.precision import pick_precision

    auto = pick_precision("auto", "cpu").name  # bf16-mixed where this CPU has native bf16, float32 otherwise
    assert f"compute dtype {auto}" in err and "pad token was '<|im_end|>'" in err
    ck = out / "checkpoint-2"
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json", "training_args.bin", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (ck / name).is_file(), name
    adapter_cfg = json.loads((ck / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and sorted(adapter_cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert main(["train", str(cfg), "--output", str(out), "--resume", "--set", "train.max_steps=3",
                 "--set", "train.save_steps=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["input_tokens_seen"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (out / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= tags


@pytest.mark.parametrize("config", ["configs/smollm2-alpaca.yaml", "configs/korean-chatbot.yaml",
                                    "configs/smollm2-dpo.yaml", "configs/smollm2-classify.yaml"])
def test_shipped_configs_pass_preflight_on_real_data(config, capsys):
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    assert main(["check", config]) == 0
    assert "preflight passed" in capsys.readouterr().err


def test_smollm2_dpo_end_to_end_on_hh_rlhf(tmp_path, capsys):
    """Issue 12: DPO on the embedded model with the shipped config, on real HH-RLHF pairs; the result loads
    for eval/generate like any run."""
    if not (SHARED / "pref" / "hh_rlhf_harmless" / "test.jsonl").is_file():
        pytest.skip("../shared/data is not beside this checkout")
    from tunelab.models import load_for_inference

    out = tmp_path / "dpo"
    assert main(["train", "configs/smollm2-dpo.yaml", "--output", str(out), "--set", "data.max_rows=12",
                 "--set", "data.max_seq_length=256", "--set", "data.test_size=0", "--set", "train.max_steps=2",
                 "--set", "train.save_steps=2", "--set", "train.gradient_accumulation_steps=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_method"] == "dpo" and summary["global_step"] == 2
    assert "last_rewards/margins" in summary and "reference model: the base (adapter disabled)" in capsys.readouterr().err
    loaded = load_for_inference(str(out))
    assert loaded.adapter == out / "final" and loaded.template == "chat_template"
