"""A planted hub token never reaches a file tunelab writes (train, eval, generate, export) or its output."""

import os
import subprocess
import sys

PLANTED = "hf_tunelabPLANTEDsecret0123456789abcdef"


def _scan(folder, needle: bytes):
    hits = []
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                if needle in fh.read():
                    hits.append(p)
    return hits


def _pairs(folder):
    import json

    p = folder / "pairs.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"Add {i} and 1.", "chosen": f"The answer is {i + 1}.",
                                        "rejected": "No."}) for i in range(12)))
    return p


def test_planted_token_never_written(tmp_path, tiny_config):
    env = dict(os.environ, HF_TOKEN=PLANTED, HUGGING_FACE_HUB_TOKEN=PLANTED, TUNELAB_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "run"
    outputs = []
    data = tiny_config.parent / "data.jsonl"
    for argv in (["check", str(tiny_config)],
                 ["train", str(tiny_config), "--output", str(out)],
                 ["eval", str(out), "--tasks", f"ppl:{data}", "--limit", "4", "--out", str(tmp_path / "ev")],
                 ["generate", str(out), "-p", "Add 1 and 2.", "--max-new-tokens", "4", "--out", str(tmp_path / "g.jsonl")],
                 ["export", str(out), "--to", str(tmp_path / "exported"), "--gguf", "f16"],
                 # issue 12: a DPO run from the SFT run (TRL's trainer writes its own model card and args)
                 ["train", str(tiny_config), "--output", str(tmp_path / "dpo"), "--set", "train.method=dpo",
                  "--set", f"model.name={out}", "--set", f"data.path={_pairs(tmp_path)}"],
                 # an error path too: a hub id that can't be reached
                 ["train", str(tiny_config), "--output", str(tmp_path / "x"), "--set", "model.name=org/private-model"]):
        r = subprocess.run([sys.executable, "-m", "tunelab"] + argv, capture_output=True, env=env, cwd=tmp_path)
        outputs.append(r.stdout + r.stderr)
    assert b"error:" in outputs[-1]
    assert (out / "summary.json").is_file() and (out / "checkpoint-4").is_dir()
    assert (tmp_path / "dpo" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ev" / "results.json").is_file() and (tmp_path / "exported" / "model-f16.gguf").is_file()
    for text in outputs:
        assert PLANTED.encode() not in text
    assert _scan(tmp_path, PLANTED.encode()) == []
