"""Crash safety, interrupts, numerical faults, disk full, determinism (issue: reliability)."""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tunelab.cli import main

CKPT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
              "rng_state.pth", "trainer_state.json", "training_args.bin")


def _cmd(cfg, out, *sets):
    args = [sys.executable, "-m", "tunelab", "train", str(cfg), "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    return args


def _assert_complete_checkpoints(out: Path, leftovers_ok: bool = False):
    """Every visible checkpoint-N is complete. After a kill -9 a hidden .staging may remain (it is
    never read, and the next start removes it); after a clean exit nothing hidden may remain."""
    import torch

    if not leftovers_ok:
        assert not list(out.glob(".staging*")) and not list(out.glob(".tmp-*"))
    for ck in out.glob("checkpoint-*"):
        for name in CKPT_FILES:
            assert (ck / name).is_file(), f"{ck.name} lacks {name}"
        load_file(ck / "adapter_model.safetensors")
        torch.load(ck / "optimizer.pt", weights_only=True)
        json.loads((ck / "trainer_state.json").read_text())


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_kill9_at_random_moments_then_resume_equals_uninterrupted(tmp_path, tiny_config):
    sets = ["data.test_size=0", "train.max_steps=30", "train.save_steps=1", "train.save_total_limit=2"]
    ref = tmp_path / "ref"
    assert main(["train", str(tiny_config), "--output", str(ref)] + sum([["--set", s] for s in sets], [])) == 0
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = during_save = 0
    for attempt in range(40):
        p = subprocess.Popen(_cmd(tiny_config, out, *sets) + ["--resume"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if kills >= 10:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
            break
        aim_save = kills % 2 == 0  # every other kill waits for a checkpoint write in progress
        deadline = time.time() + 120
        delay = rng.uniform(0.0, 1.5)
        started = None
        while p.poll() is None and time.time() < deadline:
            if (out / "config.yaml").exists() and started is None:
                started = time.time()
            if aim_save and (out / ".staging").exists():
                during_save += 1
                break
            if not aim_save and started is not None and time.time() - started > delay:
                break
            time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            _assert_complete_checkpoints(out, leftovers_ok=True)
        else:
            assert p.returncode == 0, p.stderr.read().decode()[-2000:]
            break
    assert kills >= 10, f"only {kills} kills landed before the run finished"
    assert during_save >= 3, f"only {during_save} kills hit a checkpoint save"
    _assert_complete_checkpoints(out)
    assert len(list(out.glob("checkpoint-*"))) <= 2  # save_total_limit held
    assert (out / "checkpoint-30").is_dir()
    assert _max_diff(ref / "final" / "adapter_model.safetensors", out / "final" / "adapter_model.safetensors") < 1e-5


def _finished_run(tmp_path, tiny_config):
    sets = ["data.test_size=0", "train.max_steps=6", "train.save_steps=1", "train.save_total_limit=2"]
    out = tmp_path / "run"
    args = ["train", str(tiny_config), "--output", str(out)] + sum([["--set", s] for s in sets], [])
    assert main(args) == 0
    return out, args


def _unsave_final(out):
    """As if killed after the last checkpoint and before the final save."""
    import shutil

    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()


def test_resume_of_a_finished_run_changes_nothing(tmp_path, tiny_config, capsys):
    """--resume of a run that finished: nothing trained, nothing rewritten (the Trainer, resumed at max_steps,
    would train a step more and overwrite final/)."""
    out, args = _finished_run(tmp_path, tiny_config)
    before = {p: p.read_bytes() for p in [out / "summary.json", *sorted((out / "final").iterdir())]}
    assert main(args + ["--resume"]) == 0
    assert "finished at step 6" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_resume_after_the_last_checkpoint_saves_it_as_final(tmp_path, tiny_config):
    """Killed after checkpoint-6 (= max_steps) and before the final save: --resume writes that checkpoint's weights
    as final/, with no step more, and the summary says step 6."""
    out, args = _finished_run(tmp_path, tiny_config)
    reference = load_file(out / "final" / "adapter_model.safetensors")
    _unsave_final(out)
    assert main(args + ["--resume"]) == 0
    assert not (out / "checkpoint-7").exists()
    assert _max_diff(out / "checkpoint-6" / "adapter_model.safetensors", out / "final" / "adapter_model.safetensors") == 0
    assert max((reference[k] - v).abs().max().item() for k, v in load_file(out / "final" / "adapter_model.safetensors").items()) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 6


def test_the_trainer_still_steps_past_max_steps_on_resume(tmp_path, tiny_config, monkeypatch):
    """Why tunelab.callbacks.NoStepPastMaxSteps exists: without it, transformers' Trainer resumed from a checkpoint
    at max_steps trains one step more (checkpoint-7 of 6). Red the day the Trainer stops doing it: then the
    callback can go."""
    from tunelab.callbacks import NoStepPastMaxSteps

    out, args = _finished_run(tmp_path, tiny_config)
    _unsave_final(out)
    monkeypatch.setattr(NoStepPastMaxSteps, "on_step_begin", lambda self, *a, **k: None)
    assert main(args + ["--resume"]) == 0
    assert (out / "checkpoint-7").is_dir()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_exits(tmp_path, tiny_config, sig, code):
    out = tmp_path / "run"
    sets = ["data.test_size=0", "train.max_steps=100000", "train.save_steps=100000", "train.logging_steps=50"]
    p = subprocess.Popen(_cmd(tiny_config, out, *sets),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "tensorboard").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == code, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert "--resume" in last_line and "Traceback" not in err
    # the hint is the interrupted command: following it resumes the same run (same --set flags)
    hint = shlex.split(last_line.split("Resume with: ", 1)[1])
    assert hint == ["tunelab", "train", str(tiny_config), "--output", str(out)] + sum([["--set", s] for s in sets], []) \
        + ["--resume"], last_line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["early_stopped"] is False
    step = summary["global_step"]
    assert step > 0 and (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    _assert_complete_checkpoints(out)
    assert not (out / "final").exists()


def test_nan_loss_stops_without_saving_bad_weights(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    code = main(["train", str(tiny_config), "--output", str(out), "--set", "data.test_size=0",
                 "--set", "train.max_steps=20", "--set", "train.save_steps=1", "--set", "train.learning_rate=1e30",
                 "--set", "train.max_grad_norm=0"])
    err = capsys.readouterr().err
    assert code == 2
    line = [l for l in err.splitlines() if "error:" in l][-1]
    assert ("nan" in line or "inf" in line) and "at step" in line and "last good checkpoint: checkpoint-" in line
    assert not (out / "final").exists()
    _assert_complete_checkpoints(out)
    for ck in out.glob("checkpoint-*"):
        w = load_file(ck / "adapter_model.safetensors")
        assert all(t.isfinite().all() for t in w.values()), f"{ck.name} holds non-finite weights"


def _poisoned(build_model, name_part: str):
    """build_model, with a nan planted in the gradient of the first trainable parameter whose name holds
    name_part, on that parameter's third backward."""

    def poisoned(s):
        model = build_model(s)
        p = next(p for n, p in model.named_parameters() if p.requires_grad and name_part in n)
        calls = [0]

        def hook(g):
            calls[0] += 1
            return g * float("nan") if calls[0] == 3 else g

        p.register_hook(hook)
        return model

    return poisoned


@pytest.mark.parametrize("max_grad_norm", ["0", "1.0"])
def test_nonfinite_gradient_never_reaches_the_weights(tmp_path, tiny_config, capsys, monkeypatch, max_grad_norm):
    """A nan gradient with a finite loss (poisoned at the 3rd backward) stops the run before
    optimizer.step(), whether or not the Trainer clips (it only clips when max_grad_norm > 0)."""
    import tunelab.train as train

    monkeypatch.setattr(train, "build_model", _poisoned(train.build_model, "lora_B"))
    out = tmp_path / "run"
    code = main(["train", str(tiny_config), "--output", str(out), "--set", "data.test_size=0",
                 "--set", "train.max_steps=5", "--set", "train.save_steps=1", "--set", f"train.max_grad_norm={max_grad_norm}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    line = [l for l in err.splitlines() if "error:" in l][-1]
    assert "gradient norm is nan at step 3" in line and "last good checkpoint: checkpoint-2" in line, line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "final").exists()
    _assert_complete_checkpoints(out)
    for ck in out.glob("checkpoint-*"):
        w = load_file(ck / "adapter_model.safetensors")
        assert all(t.isfinite().all() for t in w.values()), f"{ck.name} holds non-finite weights"


def _mount_tmpfs(path: Path, size_kib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, tiny_config, capsys):
    sets = ["data.test_size=0", "train.max_steps=6", "train.save_steps=1", "train.report_to=[]"]
    probe = tmp_path / "probe"
    assert main(["train", str(tiny_config), "--output", str(probe)] + sum([["--set", s] for s in sets], [])) == 0
    ck = sum(f.stat().st_size for f in (probe / "checkpoint-1").rglob("*") if f.is_file())
    small = sum(f.stat().st_size for f in probe.glob("*.json")) + sum(
        f.stat().st_size for f in probe.glob("*.yaml"))
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, (small + int(ck * 1.6)) // 1024 + 8):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "run"
        code = main(["train", str(tiny_config), "--output", str(out)] + sum([["--set", s] for s in sets], []))
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        line = [l for l in err.splitlines() if "error:" in l][-1]
        assert "disk full" in line and "checkpoint-1 is intact" in line
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
        _assert_complete_checkpoints(out)
        assert not (out / "final").exists()
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazily, if a handle is still open


def test_same_seed_same_loss_curve(tmp_path, tiny_config):
    curves = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", str(tiny_config), "--output", str(out), "--set", "train.max_steps=6"]) == 0
        state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
        curves.append([(h["step"], h.get("loss"), h.get("eval_loss")) for h in state["log_history"]
                       if "loss" in h or "eval_loss" in h])
    assert curves[0] == curves[1] and len(curves[0]) >= 6


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_methods_kill9_sigterm_resume_equal_uninterrupted(tmp_path, tiny_model, alpaca_file, method):
    """Issue 12.9: the crash-safe checkpoints, signals and exact resume hold for DPO and GRPO too."""
    from test_preference import REWARDS, method_config, write_pairs

    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    data = write_pairs(tmp_path / "pairs.jsonl") if method == "dpo" else alpaca_file
    extra = "grpo:\n  rewards: [toy_rewards:vowels]\n  num_generations: 2\n  max_completion_length: 6" \
        if method == "grpo" else ""
    cfg = method_config(tmp_path, tiny_model, data, method, extra=extra, steps=6)
    sets = ["train.save_steps=1", "train.save_total_limit=2", "train.report_to=[]"]
    ref = tmp_path / "ref"
    assert main(["train", str(cfg), "--output", str(ref)] + sum([["--set", s] for s in sets], [])) == 0
    out = tmp_path / "run"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # 1) kill -9 while a checkpoint is being written
    p = subprocess.Popen(_cmd(cfg, out, *sets), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline and not (out / ".staging").exists():
        time.sleep(0.002)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    _assert_complete_checkpoints(out, leftovers_ok=True)
    # 2) SIGTERM: finish the step, save, exit 143
    p = subprocess.Popen(_cmd(cfg, out, *sets) + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env)
    while p.poll() is None and time.time() < deadline and not (out / "checkpoint-2").exists():
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    if p.returncode == 143:
        assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    else:  # the run was already done when the signal came
        assert p.returncode == 0, err.decode()[-2000:]
    _assert_complete_checkpoints(out)
    # 3) resume to the end: the same adapter as the uninterrupted run
    r = subprocess.run(_cmd(cfg, out, *sets) + ["--resume"], capture_output=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    _assert_complete_checkpoints(out)
    assert _max_diff(ref / "final" / "adapter_model.safetensors", out / "final" / "adapter_model.safetensors") < 1e-5


def _method_run(tmp_path, tiny_model, alpaca_file, method, steps):
    from test_preference import REWARDS, method_config, write_pairs

    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    data = write_pairs(tmp_path / "pairs.jsonl") if method == "dpo" else alpaca_file
    extra = "grpo:\n  rewards: [toy_rewards:vowels]\n  num_generations: 2\n  max_completion_length: 6" \
        if method == "grpo" else ""
    return method_config(tmp_path, tiny_model, data, method, extra=extra, steps=steps)


def _finite_checkpoints(out: Path) -> list[str]:
    names = []
    for ck in sorted(out.glob("checkpoint-*")):
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
            assert (ck / name).is_file(), f"{ck.name} lacks {name}"
        weights = list(ck.glob("*.safetensors"))
        assert weights, f"{ck.name} holds no weights"
        for f in weights:
            assert all(t.isfinite().all() for t in load_file(f).values()), f"{ck.name} holds non-finite weights"
        names.append(ck.name)
    return names


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_methods_nonfinite_gradient_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model, alpaca_file, capsys,
                                                                         monkeypatch, method):
    """Issue 12.9: a nan gradient with a finite loss (poisoned at the 3rd backward) stops a DPO/GRPO run with
    the one-line message before optimizer.step(); checkpoints 1-2 stay, finite. Without FiniteGradients among
    the method trainer's callbacks the nan update would be applied and saved (max_grad_norm=0: no clipping)."""
    import tunelab.methods.run as mrun

    # full fine-tune: load_causal returns build_model's model as the policy
    monkeypatch.setattr(mrun, "build_model", _poisoned(mrun.build_model, "layers.1.mlp.down_proj"))
    cfg = _method_run(tmp_path, tiny_model, alpaca_file, method, steps=5)
    out = tmp_path / "run"
    code = main(["train", str(cfg), "--output", str(out), "--set", "lora.enabled=false", "--set", "train.save_steps=1",
                 "--set", "train.max_grad_norm=0", "--set", "train.learning_rate=1e-4", "--set", "train.report_to=[]"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    line = [l for l in err.splitlines() if "error:" in l][-1]
    assert "gradient norm is nan at step 3" in line and "last good checkpoint: checkpoint-2" in line, line
    assert "Traceback" not in err
    assert _finite_checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "final").exists() and not list(out.glob(".staging*"))


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_methods_nan_loss_stops_without_saving_bad_weights(tmp_path, tiny_model, alpaca_file, capsys, method):
    """A learning rate of 1e30 blows the weights up: the DPO/GRPO run ends with one line, exit 2, and every
    checkpoint it left holds finite weights (the SFT test above, for the methods)."""
    cfg = _method_run(tmp_path, tiny_model, alpaca_file, method, steps=20)
    out = tmp_path / "run"
    code = main(["train", str(cfg), "--output", str(out), "--set", "train.save_steps=1",
                 "--set", "train.learning_rate=1e30", "--set", "train.max_grad_norm=0", "--set", "train.report_to=[]"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    line = [l for l in err.splitlines() if "error:" in l][-1]
    assert ("nan" in line or "inf" in line) and "at step" in line and "last good checkpoint: checkpoint-" in line, line
    assert "Traceback" not in err
    assert _finite_checkpoints(out) and not (out / "final").exists()
