"""Training under accelerate: 2 CPU processes (DDP, gloo) == 1 process with the same global batch."""

import json
import os
from pathlib import Path

import pytest

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


def _varied_rows(path, n=48, seed=0):
    """Rows of very different lengths, so that data.pack_max_tokens splits each rank's share of a
    step into a different number of pieces."""
    import random

    rng = random.Random(seed)
    path.write_text("\n".join(json.dumps({"instruction": f"Add {rng.randint(1, 50)} and {rng.randint(1, 50)}.",
                                          "input": "", "output": " ".join(["the answer is"] * rng.randint(1, 10))})
                              for _ in range(n)) + "\n")
    return path


def _train_bounded(argv, bound_s, tmp_path):
    """`tunelab train`; a run over `bound_s` seconds (a hang) fails the test, and all its processes are
    killed (the ranks live in sessions of their own, so the whole tree is collected first)."""
    import subprocess
    import sys

    from tunelab.cli import kill_tree

    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:  # a file, not a pipe: a stuck rank holding a pipe can't block the test
        p = subprocess.Popen([sys.executable, "-m", "tunelab", "train"] + argv, stdout=subprocess.DEVNULL, stderr=err)
        try:
            p.wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)
            p.wait()
            raise AssertionError(f"tunelab train {' '.join(argv)} took more than {bound_s}s (hang)") from None
    assert p.returncode == 0, log.read_text()[-3000:]


def test_packed_uneven_splits_two_processes_match_one(tmp_path, tiny_config):
    """issue 15.1: with packing, each rank splits its share of a step by pack_max_tokens into its own
    number of pieces; only the last piece syncs gradients, so the ranks never wait on each other's
    extra collectives (before: a deadlock), and the result equals one process."""
    from safetensors.torch import load_file

    data = _varied_rows(tmp_path / "varied.jsonl")
    common = ["--set", f"data.path={data}", "--set", "data.test_size=0", "--set", "data.packing=true",
              "--set", "data.pack_max_tokens=170", "--set", "train.max_steps=3", "--set", "train.save_steps=3",
              "--set", "train.gradient_accumulation_steps=2", "--set", "train.eval_steps=100"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train_bounded([str(tiny_config), "--output", str(one), "--set", "train.per_device_train_batch_size=4"] + common, 240,
                   tmp_path)
    _train_bounded([str(tiny_config), "--output", str(two), "--set", "train.per_device_train_batch_size=2",
                    "--launcher", "accelerate", "--num-processes", "2"] + common, 300, tmp_path)
    a = [h["loss"] for h in json.loads((one / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
         if "loss" in h]
    b = [h["loss"] for h in json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
         if "loss" in h]
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa = load_file(one / "final" / "adapter_model.safetensors")
    wb = load_file(two / "final" / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_sigterm_to_tunelab_stops_launcher_and_every_rank(tmp_path, tiny_config):
    """issue 15.5: SIGTERM to `tunelab train --launcher accelerate` (as a process manager sends it, to
    that process alone) reaches every rank: they finish the step, checkpoint together and exit; the
    launcher and the ranks are gone, and the hint resumes with the same launcher."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "run"
    sets = ["data.test_size=0", "train.max_steps=100000", "train.save_steps=100000", "train.logging_steps=50"]
    argv = [sys.executable, "-m", "tunelab", "train", str(tiny_config), "--output", str(out),
            "--launcher", "accelerate", "--num-processes", "2"] + sum([["--set", s] for s in sets], [])
    log = tmp_path / "stderr.log"
    errf = open(log, "wb")  # a file, not a pipe: orphaned ranks holding a pipe would block the test
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf)
    family = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not (out / "tensorboard").exists():
            time.sleep(0.1)
        time.sleep(2.0)
        family = psutil.Process(p.pid).children(recursive=True)
        ranks = [c for c in family if "tunelab" in " ".join(c.cmdline()) and "launch" not in " ".join(c.cmdline())]
        assert len(ranks) == 2, [c.cmdline() for c in family]
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=180)
        err = log.read_text()
        assert p.returncode == 143, err[-3000:]
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, [c.cmdline() for c in alive]
    finally:
        errf.close()
        for c in family + [psutil.Process(p.pid)] if p.poll() is None else family:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
    last = err.strip().splitlines()[-1]
    assert "--launcher accelerate --num-processes 2" in last and last.endswith("--resume"), last
    assert "Traceback" not in err, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    step = summary["global_step"]
    assert step > 0 and (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "final").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_together(argvs, bound_s, tmp_path):
    """Several `tunelab train` commands at once (the nodes of one run); any still running after `bound_s`
    seconds (a hang) fails the test, and every process tree is killed."""
    import subprocess
    import sys
    import time

    from tunelab.cli import kill_tree

    procs, logs = [], []
    for i, argv in enumerate(argvs):
        logs.append(tmp_path / f"node{i}.log")
        with open(logs[-1], "wb") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "tunelab", "train"] + argv,
                                          stdout=subprocess.DEVNULL, stderr=err))
    deadline = time.time() + bound_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the nodes took more than {bound_s}s (hang)") from None
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]


def _multinode_config(path, rank, port):
    """configs/accelerate/multinode_ddp.yaml as a user adapts it: 2 machines x 1 process, this machine's
    rank, the main node's address (here both "machines" are this one), no mixed precision on CPU."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/accelerate/multinode_ddp.yaml").read_text())
    cfg.update(num_machines=2, num_processes=2, machine_rank=rank, main_process_ip="127.0.0.1",
               main_process_port=port, mixed_precision="no")
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_nodes_match_one_process(tmp_path, tiny_config):
    """issue 15.4: two "nodes" (accelerate launch, num_machines 2, machine_rank 0 and 1, rendezvous on
    127.0.0.1, one process each) train into one run folder (as on a shared filesystem): the losses and
    the adapter equal one process with the same global batch; only global rank 0 writes."""
    from safetensors.torch import load_file

    common = ["--set", "data.test_size=0", "--set", "train.max_steps=3", "--set", "train.save_steps=3",
              "--set", "train.gradient_accumulation_steps=1", "--set", "data.shuffle=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train_bounded([str(tiny_config), "--output", str(one), "--set", "train.per_device_train_batch_size=4"] + common,
                   240, tmp_path)
    port = _free_port()
    nodes = [[str(tiny_config), "--output", str(two), "--set", "train.per_device_train_batch_size=2",
              "--launcher", "accelerate", "--accelerate-config", str(_multinode_config(tmp_path / f"node{r}.yaml", r, port))]
             + common for r in (0, 1)]
    _run_together(nodes, 300, tmp_path)
    a = [h["loss"] for h in json.loads((one / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
         if "loss" in h]
    b = [h["loss"] for h in json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
         if "loss" in h]
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa = load_file(one / "final" / "adapter_model.safetensors")
    wb = load_file(two / "final" / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert json.loads((two / "summary.json").read_text())["global_step"] == 3
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint", "."))) == ["checkpoint-3"]


def _adapted(name, path, **updates):
    """One of configs/accelerate/*.yaml as a user adapts it to this machine: 2 CPU processes, no mixed precision."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/accelerate" / name).read_text())
    cfg.update(num_processes=2, mixed_precision="no", main_process_port=_free_port(), **updates)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_and_two(tmp_path, tiny_config, accelerate_config, steps=3, bound_s=300):
    """The same run in 1 process (batch 4) and under `accelerate_config` (2 processes x batch 2): both
    run folders and their per-step losses."""
    common = ["--set", "data.test_size=0", "--set", f"train.max_steps={steps}", "--set", f"train.save_steps={steps}",
              "--set", "train.gradient_accumulation_steps=1", "--set", "data.shuffle=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train_bounded([str(tiny_config), "--output", str(one), "--set", "train.per_device_train_batch_size=4"] + common,
                   240, tmp_path)
    _train_bounded([str(tiny_config), "--output", str(two), "--set", "train.per_device_train_batch_size=2",
                    "--launcher", "accelerate", "--accelerate-config", str(accelerate_config)] + common, bound_s, tmp_path)
    losses = [[h["loss"] for h in json.loads((run / f"checkpoint-{steps}" / "trainer_state.json").read_text())
               ["log_history"] if "loss" in h] for run in (one, two)]
    return one, two, losses[0], losses[1]


def test_fsdp_config_on_cpu_says_it_runs_as_ddp_and_matches_one(tmp_path, tiny_config):
    """issue 15.2: configs/accelerate/fsdp.yaml (FSDP2) on 2 CPU processes: accelerate 1.15 enables FSDP only
    on GPU-like devices and silently runs DDP over gloo instead; tunelab says so (one warning), the losses
    equal one process, and the saved adapter is an ordinary PEFT adapter that loads in one process."""
    from safetensors.torch import load_file

    cfg = _adapted("fsdp.yaml", tmp_path / "fsdp.yaml")
    one, two, a, b = _one_and_two(tmp_path, tiny_config, cfg)
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa = load_file(one / "final" / "adapter_model.safetensors")
    wb = load_file(two / "final" / "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb) and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert main(["generate", str(two), "--prompt", "Add 2 and 3.", "--max-new-tokens", "4"]) == 0
    assert " ".join((tmp_path / "stderr.log").read_text().split()).count("FSDP needs GPUs") == 1


# ZeRO-3's shipped config offloads the optimizer to the CPU, which compiles DeepSpeed's cpu_adam op on first
# use (minutes on 2 cores); the test keeps the optimizer where it is, so only the small shm comm op is built.
@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_two_cpu_processes_match_one(tmp_path, tiny_config, name):
    """issue 15.3: configs/accelerate/deepspeed_zero{2,3}.yaml on 2 CPU processes (DeepSpeed's CPU accelerator,
    gloo): a real DeepSpeed engine (its checkpoint layout), the losses equal one process, and the adapter
    is an ordinary PEFT adapter that loads in one process."""
    import yaml
    from safetensors.torch import load_file

    pytest.importorskip("deepspeed", reason="pip install 'tunelab[deepspeed]'")
    cfg = _adapted(name, tmp_path / name)
    ds = yaml.safe_load(cfg.read_text())
    ds["deepspeed_config"]["offload_optimizer_device"] = "none"
    cfg.write_text(yaml.safe_dump(ds))
    one, two, a, b = _one_and_two(tmp_path, tiny_config, cfg, bound_s=400)
    assert (two / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own engine saved it
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa = load_file(one / "final" / "adapter_model.safetensors")
    wb = load_file(two / "final" / "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb) and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert main(["generate", str(two), "--prompt", "Add 2 and 3.", "--max-new-tokens", "4"]) == 0


def test_deepspeed_zero3_checkpoint_resume_matches_one_process(tmp_path, tiny_config):
    """issue 15.3: ZeRO-3 on 2 CPU processes stops at a checkpoint (step 2), `--resume` loads DeepSpeed's
    sharded checkpoint and continues to step 4: the loss curve equals one uninterrupted process."""
    import yaml

    pytest.importorskip("deepspeed", reason="pip install 'tunelab[deepspeed]'")
    cfg = _adapted("deepspeed_zero3.yaml", tmp_path / "zero3.yaml")
    ds = yaml.safe_load(cfg.read_text())
    ds["deepspeed_config"]["offload_optimizer_device"] = "none"  # see test_deepspeed_two_cpu_processes_match_one
    cfg.write_text(yaml.safe_dump(ds))
    common = ["--set", "data.test_size=0", "--set", "train.save_steps=2", "--set", "data.shuffle=false",
              "--set", "train.gradient_accumulation_steps=1", "--set", "train.lr_scheduler_type=constant_with_warmup"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train_bounded([str(tiny_config), "--output", str(one), "--set", "train.per_device_train_batch_size=4",
                    "--set", "train.max_steps=4"] + common, 240, tmp_path)
    launch = ["--set", "train.per_device_train_batch_size=2", "--launcher", "accelerate", "--accelerate-config", str(cfg)]
    _train_bounded([str(tiny_config), "--output", str(two), "--set", "train.max_steps=2"] + launch + common, 400, tmp_path)
    assert (two / "checkpoint-2" / "global_step2").is_dir()
    _train_bounded([str(tiny_config), "--output", str(two), "--set", "train.max_steps=4", "--resume"] + launch + common,
                   400, tmp_path)
    assert "resuming from checkpoint-2" in (tmp_path / "stderr.log").read_text()
    a = [h["loss"] for h in json.loads((one / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
         if "loss" in h]
    b = [h["loss"] for h in json.loads((two / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
         if "loss" in h]
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
