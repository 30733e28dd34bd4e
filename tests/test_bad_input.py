"""Bad input across config, data, model and CLI: one clear line, exit 2, no traceback, nothing damaged.

The README's troubleshooting table lists these cases; keep the two in step.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main

BASE = """
model:
  name: {model}
data:
  path: {data}
  max_seq_length: 128
train:
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1
  warmup_steps: 0
  max_steps: 2
  save_steps: 2
"""


def _run(tmp_path, tiny_model, *, yaml_text=None, data_text=None, data_name="d.jsonl", data_bytes=None,
         sets=(), command="train", extra=()):
    data = tmp_path / data_name
    if data_bytes is not None:
        data.write_bytes(data_bytes)
    else:
        data.write_text(data_text if data_text is not None else
                        '{"instruction": "Add 1 and 2.", "output": "3"}\n{"instruction": "Add 2 and 2.", "output": "4"}\n',
                        encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text if yaml_text is not None else BASE.format(model=tiny_model, data=data), encoding="utf-8")
    argv = [command, str(cfg)]
    if command == "train":
        argv += ["--output", str(tmp_path / "out")]
    for s in sets:
        argv += ["--set", s]
    return main(argv + list(extra))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _corrupt_model(tmp_path, tiny_model, what):
    import shutil

    bad = tmp_path / "badmodel"
    shutil.copytree(tiny_model, bad)
    if what == "safetensors":
        (bad / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    elif what == "noconfig":
        (bad / "config.json").unlink()
    return bad


# (id, expected text in the error line, kwargs for _run or a callable building them)
CASES = [
    # --- config -------------------------------------------------------------------------------
    ("malformed-yaml", "run.yaml:3: malformed YAML", lambda t, m: dict(yaml_text="model:\n  name: x\n bad: [\n")),
    ("not-a-mapping", "must be a mapping of sections", lambda t, m: dict(yaml_text="- a\n- b\n")),
    ("unknown-section", "unknown section 'trainer' (did you mean 'train'?)",
     lambda t, m: dict(yaml_text=BASE.format(model=m, data=t / "d.jsonl") + "trainer:\n  x: 1\n")),
    ("unknown-key", "run.yaml:12: unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)",
     lambda t, m: dict(yaml_text=BASE.format(model=m, data=t / "d.jsonl").replace("  max_steps: 2", "  max_steps: 2\n  lerning_rate: 1.0e-4"))),
    ("wrong-type-int", "train.max_steps: expected an integer, got 'ten'", lambda t, m: dict(sets=["train.max_steps=ten"])),
    ("wrong-type-bool", "lora.enabled: expected true or false", lambda t, m: dict(sets=["lora.enabled=maybe"])),
    ("lora-r-zero", "lora.r must be > 0", lambda t, m: dict(sets=["lora.r=0"])),
    ("warmup-past-max-steps", "train.warmup_steps (50) is larger than train.max_steps (2)",
     lambda t, m: dict(sets=["train.warmup_steps=50"])),
    ("bad-choice", "train.lr_scheduler_type='cosin' is not one of", lambda t, m: dict(sets=["train.lr_scheduler_type=cosin"])),
    ("set-without-equals", "--set: expected KEY=VALUE", lambda t, m: dict(sets=["train.max_steps"])),
    ("set-unknown-key", "--set: unknown key 'train.max_step' (did you mean 'max_steps'?)",
     lambda t, m: dict(sets=["train.max_step=3"])),
    ("test-size-1", "data.test_size must be in [0, 1)", lambda t, m: dict(sets=["data.test_size=1.5"])),
    ("dropout-range", "lora.dropout must be in [0, 1)", lambda t, m: dict(sets=["lora.dropout=1.5"])),
    ("no-data-path", "data.path is required", lambda t, m: dict(sets=["data.path="])),
    ("config-missing", "config file not found", lambda t, m: dict(extra=[], yaml_text=None, command="train-missing")),
    ("config-not-utf8", "config file is not UTF-8", lambda t, m: dict(yaml_text=None, command="train-latin1")),
    ("seq-past-context", "data.max_seq_length=1024 is above the model's context window (512",
     lambda t, m: dict(sets=["data.max_seq_length=1024"])),
    # --- data ---------------------------------------------------------------------------------
    ("data-missing", "data.path: file not found: nope.jsonl", lambda t, m: dict(sets=["data.path=nope.jsonl"])),
    ("data-empty", "d.jsonl: no rows", lambda t, m: dict(data_text="")),
    ("jsonl-malformed-line", "d.jsonl:2: malformed JSON",
     lambda t, m: dict(data_text='{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n')),
    ("jsonl-not-object", "d.jsonl:1: each line must be a JSON object", lambda t, m: dict(data_text='[1, 2]\n')),
    ("csv-column-count", "d.csv:3: 3 columns, the header has 2",
     lambda t, m: dict(data_name="d.csv", data_text="instruction,output\na,b\nc,d,e\n")),
    ("not-utf8-data", "d.jsonl:2: not UTF-8 text",
     lambda t, m: dict(data_bytes='{"instruction": "a", "output": "b"}\n{"instruction": "caf'.encode() + b"\xe9" + b'", "output": "x"}\n')),
    ("missing-field", "d.jsonl:1: missing field 'output'", lambda t, m: dict(data_text='{"instruction": "a", "answer": "b"}\n')),
    ("null-field", "d.jsonl:2: field 'output' is null",
     lambda t, m: dict(data_text='{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "", "output": null}\n')),
    ("field-wrong-type", "field 'output' should be text, got list", lambda t, m: dict(data_text='{"instruction": "a", "output": ["b"]}\n')),
    ("unsupported-extension", "unsupported data file type '.txt'", lambda t, m: dict(data_name="d.txt", data_text="hello\n")),
    ("all-rows-empty", "no usable rows left", lambda t, m: dict(data_text='{"instruction": "a", "output": "  "}\n')),
    ("prompt-past-max-seq", "so no response token is trained",
     lambda t, m: dict(data_text=json.dumps({"instruction": "word " * 200, "output": "x"}) + "\n")),
    ("huge-single-row", "so no response token is trained",
     lambda t, m: dict(data_text=json.dumps({"instruction": "x" * 3_000_000, "output": "y"}) + "\n")),
    ("chat-last-not-assistant", "the last message must be the assistant's",
     lambda t, m: dict(data_text=json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
                       sets=["data.format=chat", "data.template=chat_template"])),
    ("chat-needs-chat-template", "data.format=chat needs data.template=chat_template",
     lambda t, m: dict(sets=["data.format=chat"])),
    ("test-size-no-eval-row", "leaves no evaluation row", lambda t, m: dict(sets=["data.test_size=0.1"])),
    # --- model --------------------------------------------------------------------------------
    ("model-missing", "model: './nope' is neither a local folder nor a hub id",
     lambda t, m: dict(sets=["model.name=./nope"])),
    ("model-no-config", "is not a Hugging Face model folder (no config.json)",
     lambda t, m: dict(sets=[f"model.name={_corrupt_model(t, m, 'noconfig')}"])),
    ("model-corrupt-safetensors", "model weights in", lambda t, m: dict(sets=[f"model.name={_corrupt_model(t, m, 'safetensors')}"])),
    ("gguf-corrupt", "not a GGUF model transformers can read",
     lambda t, m: (t / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 64) and dict(sets=[f"model.name={t / 'bad.gguf'}"])),
    ("hub-offline", "is not in the local Hugging Face cache and the hub is unreachable",
     lambda t, m: dict(sets=["model.name=meta-llama/Meta-Llama-3-8B"])),
    ("bad-lora-targets", "lora.target_modules", lambda t, m: dict(sets=["lora.target_modules=[nonexistent_proj]"])),
    # --- CLI / output -------------------------------------------------------------------------
    ("unwritable-output", "cannot write there", lambda t, m: dict(extra=["--output", str(t / "d.jsonl" / "sub")])),
]


@pytest.mark.parametrize("case_id,expected,build", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, expected, build, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    kwargs = build(tmp_path, tiny_model)
    command = kwargs.pop("command", "train")
    if command == "train-missing":
        code = main(["train", str(tmp_path / "missing.yaml")])
    elif command == "train-latin1":
        (tmp_path / "run.yaml").write_bytes(b"model:\n  name: caf\xe9\n")
        code = main(["train", str(tmp_path / "run.yaml")])
    else:
        code = _run(tmp_path, tiny_model, **kwargs)
    err = capsys.readouterr().err
    assert code == 2, err[-1500:]
    assert "Traceback" not in err
    error_lines = [l for l in err.splitlines() if "error:" in l]
    assert len(error_lines) == 1, err[-1500:]
    assert expected in error_lines[0], error_lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_run_is_not_damaged(tmp_path, tiny_config, capsys):
    out = tmp_path / "done"
    assert main(["train", str(tiny_config), "--output", str(out), "--set", "train.max_steps=2"]) == 0
    before = _snapshot(out)
    # a second train into it, a resume with a changed knob, and a resume with a broken data file
    assert main(["train", str(tiny_config), "--output", str(out)]) == 2
    assert main(["train", str(tiny_config), "--output", str(out), "--resume", "--set", "lora.r=4"]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "differs from the run's saved config in lora.r" in err
    # the same config (the resume check passes) but its data file is now broken: the data is read,
    # the error names the line, and the run folder is left as it was
    data = Path(yaml.safe_load(tiny_config.read_text())["data"]["path"])
    data.write_text(data.read_text() + '{"instruction": "cut off\n')
    assert main(["train", str(tiny_config), "--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "differs" not in err and f"{data.name}:41" in err, err[-1500:]
    assert _snapshot(out) == before


@pytest.mark.parametrize("argv,expected", [
    (["train"], "the following arguments are required: config"),
    (["trian", "x.yaml"], "invalid choice: 'trian'"),
    (["train", "missing.yaml"], "config file not found"),
])
def test_cli_errors_in_a_real_process(tmp_path, argv, expected):
    r = subprocess.run([sys.executable, "-m", "tunelab"] + argv, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr
