from pathlib import Path

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


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["smollm2-demo.yaml", "smollm2-alpaca.yaml", "korean-chatbot.yaml"])
def test_shipped_configs_find_their_data_from_any_folder(tmp_path, monkeypatch, name):
    if name != "smollm2-demo.yaml" and not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not on this machine")
    monkeypatch.chdir(tmp_path)
    cfg, _ = load_config(REPO / "configs" / name)
    assert Path(cfg.data.path).is_absolute() and Path(cfg.data.path).is_file(), cfg.data.path


def test_config_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "d.jsonl").write_text("{}\n")
    (tmp_path / "cfgs" / "e.jsonl").write_text("{}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "d.jsonl").write_text("{}\n")  # same name in the current folder: the config's wins
    (tmp_path / "elsewhere" / "only_here.jsonl").write_text("{}\n")
    run = tmp_path / "cfgs" / "run.yaml"
    run.write_text("model:\n  name: org/hub-model\ndata:\n  path: d.jsonl\n  eval_path: ./e.jsonl\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg, _ = load_config(run)
    assert cfg.data.path == str(tmp_path / "cfgs" / "d.jsonl")
    assert cfg.data.eval_path == str(tmp_path / "cfgs" / "e.jsonl")
    assert cfg.model.name == "org/hub-model"  # a hub id stays a hub id
    # a path that exists only beside the current folder is kept for it (configs written for the repo root)
    run.write_text("data:\n  path: only_here.jsonl\n")
    assert load_config(run)[0].data.path == "only_here.jsonl"
    # --set paths are the shell's: relative to the current folder, untouched
    run.write_text("data:\n  path: d.jsonl\n")
    assert load_config(run, ["data.path=d.jsonl"])[0].data.path == "d.jsonl"


def test_bench_dir_found_from_any_folder(tmp_path, monkeypatch):
    from tunelab.evaluate.tasks import BENCH_DIR_ENV, bench_dir

    if not (REPO.parent / "shared" / "data" / "bench").is_dir():
        pytest.skip("../shared/data/bench is not on this machine")
    monkeypatch.delenv(BENCH_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert (bench_dir() / "arc").is_dir(), bench_dir()
    monkeypatch.setenv(BENCH_DIR_ENV, "mine")
    assert bench_dir() == Path("mine")


def test_pack_max_tokens_auto_per_device_and_bad_values(tmp_path):
    from tunelab.config import pack_max_tokens

    d = RunConfig().data
    assert d.pack_max_tokens == "auto"
    # on a CPU by precision: float32 (auto where bf16 is emulated) keeps 1.7x the bytes per token -> half the piece
    assert [pack_max_tokens(d, dev, p) for dev, p in [("cpu", "bf16-mixed"), ("cpu", "float32"), ("cpu", "bfloat16"),
                                                     ("cuda", "float32"), ("h200", "bfloat16")]] == [1024, 512, 1024,
                                                                                                     4096, 4096]
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  path: x.jsonl\n  pack_max_tokens: 2048\n")
    cfg, _ = load_config(p)
    assert cfg.data.pack_max_tokens == 2048 and pack_max_tokens(cfg.data, "cpu", "float32") == 2048
    cfg, _ = load_config(p, ["data.pack_max_tokens=512"])
    assert cfg.data.pack_max_tokens == 512
    cfg, _ = load_config(p, ["data.pack_max_tokens=auto"])
    assert pack_max_tokens(cfg.data, "cpu", "bf16-mixed") == 1024
    p.write_text("data:\n  path: x.jsonl\n  pack_max_tokens: fast\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: data.pack_max_tokens must be a positive integer or auto, "
                                          r"got 'fast'"):
        load_config(p)
    p.write_text("data:\n  path: x.jsonl\n  pack_max_tokens: 0\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: data.pack_max_tokens must be > 0"):
        load_config(p)
