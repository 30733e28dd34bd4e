import json
import os

from tunelab.cli import main


def _scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_train_tiny_end_to_end_and_resume(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(["train", str(tiny_config), "--output", str(out)]) == 0
    finally:
        os.umask(old)
    # a run folder shared with a team is readable: the umask decides, not mkstemp's 0600
    for name in ("summary.json", "config.yaml", "data_stats.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["early_stopped"] is False
    assert summary["global_step"] == 4 and summary["eval_loss"] is not None
    assert summary["pad_token"] != summary["eos_token"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "trainer_state.json", "training_args.bin", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / "checkpoint-4" / name).is_file(), name
    tags = _scalars(out)
    assert {"train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= tags

    # refuses to overwrite the finished run
    assert main(["train", str(tiny_config), "--output", str(out)]) == 2
    # extend it: resume continues from checkpoint-4 to step 6
    assert main(["train", str(tiny_config), "--output", str(out), "--resume", "--set", "train.max_steps=6"]) == 0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps.count(3) == 1 and max(steps) == 6  # steps 1-4 not redone
    # resume with a changed training knob is refused
    assert main(["train", str(tiny_config), "--output", str(out), "--resume",
                 "--set", "train.learning_rate=5e-4"]) == 2
    # resume with a max_steps the run is already past: says so (it is not "completed" at 6/2 steps)
    capsys.readouterr()
    assert main(["train", str(tiny_config), "--output", str(out), "--resume", "--set", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "already at step 6" in err and "train.max_steps=2" in err, err
    assert json.loads((out / "summary.json").read_text())["global_step"] == 6


def test_written_files_follow_umask(tmp_path):
    from tunelab.fsutil import atomic_dir, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_resume_equals_uninterrupted(tmp_path, tiny_config):
    """Train 4 steps straight vs 2 + resume 2: same final adapter."""
    import torch
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(tiny_config), "--output", str(a), "--set", "data.test_size=0"]) == 0
    assert main(["train", str(tiny_config), "--output", str(b), "--set", "data.test_size=0",
                 "--set", "train.max_steps=2"]) == 0
    assert main(["train", str(tiny_config), "--output", str(b), "--set", "data.test_size=0", "--resume"]) == 0
    wa = load_file(a / "final" / "adapter_model.safetensors")
    wb = load_file(b / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert any(torch.count_nonzero(wa[k]) for k in wa if "lora_B" in k)  # training moved B away from zero


def test_eval_on_start_gives_loss_before_and_after(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tiny_config), "--output", str(out), "--set", "eval.eval_on_start=true"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["first_eval_step"] == 0 and s["eval_loss"] < s["first_eval_loss"]  # lr 1e-3 on a random model
    assert f"eval loss {s['first_eval_loss']} at step 0 -> {s['eval_loss']}" in " ".join(capsys.readouterr().err.split())


def test_collective_timeout_reaches_the_process_group(tmp_path, monkeypatch):
    """`tunelab train --launcher ... --collective-timeout N` passes N to the ranks' process group."""
    import torch

    from tunelab.cli import COLLECTIVE_TIMEOUT
    from tunelab.config import RunConfig
    from tunelab.train import training_arguments

    monkeypatch.setenv(COLLECTIVE_TIMEOUT, "42")
    args = training_arguments(RunConfig(), tmp_path, "cpu", torch.float32, has_eval=False)
    assert args.ddp_timeout == 42 and args.ddp_timeout_delta.total_seconds() == 42
