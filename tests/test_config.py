import pytest

from tunelab.config import ConfigError, RunConfig, load_config, parse_overrides


def test_recipe_preset_value_for_value():
    cfg, warnings = load_config("configs/llama3-8b-qlora.yaml")
    assert warnings == []
    m, q, lo, d, t = cfg.model, cfg.quantization, cfg.lora, cfg.data, cfg.train
    assert (m.name, m.device, m.pad_token) == ("meta-llama/Meta-Llama-3-8B", "cuda", "<|reserved_special_token_250|>")
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert (lo.r, lo.alpha, lo.dropout, lo.bias) == (16, 16, 0.0, "none")
    assert lo.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (d.path, d.shuffle, d.seed, d.only_empty_input, d.test_size, d.max_seq_length, d.num_proc) == (
        "yahma/alpaca-cleaned", True, 42, True, 0.01, 2048, 2)
    assert (d.format, d.template) == ("alpaca", "alpaca")
    assert (t.per_device_train_batch_size, t.per_device_eval_batch_size, t.gradient_accumulation_steps) == (2, 2, 8)
    assert (t.warmup_steps, t.max_steps, t.eval_steps, t.save_steps, t.logging_steps) == (50, 100, 10, 50, 1)
    assert (t.learning_rate, t.optim, t.weight_decay, t.lr_scheduler_type, t.seed) == (
        1e-4, "adamw_8bit", 0.01, "constant_with_warmup", 42)
    assert t.gradient_checkpointing and t.gradient_checkpointing_use_reentrant and t.report_to == ["tensorboard"]


def test_demo_config_loads():
    cfg, _ = load_config("configs/smollm2-demo.yaml")
    assert cfg.model.name == "smollm2-135m" and cfg.model.dtype == "auto"


def test_set_overrides_any_dotted_key_and_parses_scalars(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  path: x.jsonl\n")
    cfg, _ = load_config(p, ["train.learning_rate=2e-4", "lora.target_modules=[q_proj, v_proj]",
                             "data.fields={instruction: Q, output: A}", "train.max_steps=7",
                             "train.warmup_steps=0"])
    assert cfg.train.learning_rate == 2e-4 and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.fields == {"instruction": "Q", "output": "A"}
    assert parse_overrides(["a.b=true"]) == {"a": {"b": True}}


def test_yaml_float_without_dot_is_accepted(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  path: x.jsonl\ntrain:\n  learning_rate: 2e-4\n")  # YAML 1.1 reads this as a string
    cfg, _ = load_config(p)
    assert cfg.train.learning_rate == 2e-4


def test_learning_rate_warning(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  path: x.jsonl\n")
    _, warnings = load_config(p, ["train.learning_rate=1e-2"])
    assert any("outside the usual 1e-5..5e-4" in w for w in warnings)


def test_error_names_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  path: x.jsonl\nlora:\n  r: 16\n  alpah: 16\n")
    with pytest.raises(ConfigError, match=r"r.yaml:5: unknown key 'lora.alpah' \(did you mean 'alpha'\?\)"):
        load_config(p)


def test_early_stopping_needs_eval_data(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  path: x.jsonl\neval:\n  early_stopping_patience: 2\n")
    with pytest.raises(ConfigError, match="early stopping needs evaluation data"):
        load_config(p)


def test_defaults_are_valid_apart_from_data():
    assert RunConfig().model.name == "smollm2-135m"
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None)


@pytest.mark.parametrize("text,expected", [
    ("train:\n  max_steps: 5\n  warmup_steps: 2\ndata:\n  path: d.jsonl\ntrain:\n  learning_rate: 1.0e-4\n",
     "run.yaml:6: duplicate section 'train' (first at line 1)"),
    ("data:\n  path: d.jsonl\ntrain:\n  max_steps: 5\n  max_steps: 7\n",
     "run.yaml:5: duplicate key 'train.max_steps' (first at line 4)"),
    ("data:\n  path: d.jsonl\n  fields:\n    output: a\n    output: b\n",
     "run.yaml:5: duplicate key 'data.fields.output' (first at line 4)"),
])
def test_duplicate_keys_are_an_error_with_both_lines(tmp_path, text, expected):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value).startswith(str(cfg.parent / expected)) or expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
