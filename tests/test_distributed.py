"""Training under accelerate: 2 CPU processes (DDP, gloo) == 1 process with the same global batch."""

import json
import os

from tunelab.cli import main


def _losses(run, key="loss"):
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    return [h[key] for h in state["log_history"] if key in h]


def test_two_processes_match_one(tmp_path, tiny_config):
    # 4 eval rows (test_size 0.1 of 40), evaluated at steps 2 and 4: one batch of 4 in one process, 2 + 2 in two
    common = ["--set", "data.test_size=0.1", "--set", "train.max_steps=4", "--set", "train.save_steps=4",
              "--set", "train.gradient_accumulation_steps=1", "--set", "data.shuffle=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(tiny_config), "--output", str(one), "--set", "train.per_device_train_batch_size=4",
                 "--set", "train.per_device_eval_batch_size=4"]
                + common) == 0
    assert main(["train", str(tiny_config), "--output", str(two), "--set", "train.per_device_train_batch_size=2",
                 "--set", "train.per_device_eval_batch_size=2", "--launcher", "accelerate", "--num-processes", "2"] + common) == 0
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    # issue 11.9: the eval loss is the same token-weighted mean, not divided by the number of processes
    ea, eb = _losses(one, "eval_loss"), _losses(two, "eval_loss")
    assert len(ea) == len(eb) == 2 and max(abs(x - y) for x, y in zip(ea, eb)) < 1e-4, (ea, eb)
    assert json.loads((two / "summary.json").read_text())["eval_loss"] == round(eb[-1], 5)
    # the checkpoint is written once, by the main process: one folder, complete, no leftovers
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint", ".staging"))) == ["checkpoint-4"]
    assert (two / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((two / "summary.json").read_text())["global_step"] == 4
    assert not [p for p in two.iterdir() if p.name.startswith(".")]
    assert os.environ.get("RANK") is None
