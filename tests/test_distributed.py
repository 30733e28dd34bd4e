"""Training under accelerate: 2 CPU processes (DDP, FSDP2, DeepSpeed, two "nodes"; gloo) == 1 process with
the same global batch. Every distributed run has a wall-clock bound (a hang is a failure). The one-process
runs most tests compare against are trained once per module (`baseline`)."""

import json
import os
from pathlib import Path

import pytest

from tunelab.cli import main


def _losses(run, key="loss", step=4):
    state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h[key] for h in state["log_history"] if key in h]


# The shared setup: 10 steps, a checkpoint and an evaluation (4 rows: test_size 0.1 of 40) at 5 and 10,
# 1 process x batch 4 vs 2 processes x batch 2.
STEPS = 10
COMMON = ["--set", "data.test_size=0.1", "--set", f"train.max_steps={STEPS}", "--set", f"train.save_steps={STEPS // 2}",
          "--set", f"train.eval_steps={STEPS // 2}", "--set", "train.gradient_accumulation_steps=1",
          "--set", "data.shuffle=false"]
ONE = ["--set", "train.per_device_train_batch_size=4", "--set", "train.per_device_eval_batch_size=4"]
TWO = ["--set", "train.per_device_train_batch_size=2", "--set", "train.per_device_eval_batch_size=2"]
FULL = ["--set", "lora.enabled=false", "--set", "train.learning_rate=1e-4"]  # a full fine-tune
TOL = 1e-4  # per-step loss and weights, 2 processes vs 1 (float32; final weights seen within 3e-7)


class Baseline:
    """One-process runs of the shared setup with the model's own (stock) loss, trained on first use and kept
    for the module."""

    def __init__(self, root: Path, config: Path):
        self.root, self.config, self.runs = root, config, {}

    def run(self, kind: str) -> Path:
        if kind not in self.runs:
            out = self.root / f"one-{kind}"
            _train_bounded([str(self.config), "--output", str(out), "--set", "train.chunked_loss=false"] + ONE
                           + COMMON + (FULL if kind == "full" else []), 240, self.root)
            self.runs[kind] = out
        return self.runs[kind]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model):
    from tiny import write_alpaca

    root = tmp_path_factory.mktemp("baseline")
    data = write_alpaca(root / "data.jsonl")
    cfg = root / "run.yaml"
    cfg.write_text(f"""
model: {{name: {tiny_model}, dtype: float32}}
data: {{path: {data}, max_seq_length: 128}}
train: {{warmup_steps: 1, learning_rate: 1.0e-3}}
""")
    return Baseline(root, cfg)


def _same_run(one: Path, two: Path, weights: str = "adapter_model.safetensors"):
    """Per-step losses, eval losses and the final weights of two runs of the shared setup agree within TOL."""
    from safetensors.torch import load_file

    a, b = _losses(one, step=STEPS), _losses(two, step=STEPS)
    assert len(a) == len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b)) < TOL, (a, b)
    # issue 11.9: the eval loss is the same token-weighted mean, not divided by the number of processes
    ea, eb = _losses(one, "eval_loss", STEPS), _losses(two, "eval_loss", STEPS)
    assert len(ea) == len(eb) == 2 and max(abs(x - y) for x, y in zip(ea, eb)) < TOL, (ea, eb)
    wa, wb = load_file(one / "final" / weights), load_file(two / "final" / weights)
    assert sorted(wa) == sorted(wb) and max((wa[k] - wb[k]).abs().max().item() for k in wa) < TOL


def test_two_processes_match_one(tmp_path, baseline):
    """2 CPU processes (DDP, gloo) x batch 2 == 1 process x batch 4: per-step losses, eval losses, adapter.
    The one process uses the model's own loss, the two the chunked loss through the DDP wrapper (the
    default), so this also checks the chunked loss under DDP against the stock one."""
    two = _two(tmp_path, baseline, ["--num-processes", "2"])
    one = baseline.run("lora")
    _same_run(one, two)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["eval_loss"] == round(_losses(two, "eval_loss", STEPS)[-1], 5)
    assert summary["global_step"] == STEPS and summary["fsdp"] is None
    assert json.loads((one / "summary.json").read_text())["loss_computation"] == "stock"
    assert summary["loss_computation"] == "chunked"
    # the checkpoints are written once, by the main process: complete, no leftovers
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint", "."))) == \
        [f"checkpoint-{STEPS}", f"checkpoint-{STEPS // 2}"]
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


def test_two_nodes_match_one_process(tmp_path, baseline):
    """issue 15.4: two "nodes" (accelerate launch, num_machines 2, machine_rank 0 and 1, rendezvous on
    127.0.0.1, one process each) train into one run folder (as on a shared filesystem): the losses and
    the adapter equal one process with the same global batch; only global rank 0 writes."""
    two = tmp_path / "two"
    port = _free_port()
    nodes = [[str(baseline.config), "--output", str(two), "--launcher", "accelerate",
              "--accelerate-config", str(_multinode_config(tmp_path / f"node{r}.yaml", r, port))] + TWO + COMMON
             for r in (0, 1)]
    _run_together(nodes, 300, tmp_path)
    _same_run(baseline.run("lora"), two)
    assert json.loads((two / "summary.json").read_text())["global_step"] == STEPS
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint", "."))) == \
        [f"checkpoint-{STEPS}", f"checkpoint-{STEPS // 2}"]


def _adapted(name, path, fsdp=None, **updates):
    """One of configs/accelerate/*.yaml as a user adapts it to this machine: 2 CPU processes, no mixed
    precision; `fsdp` updates its fsdp_config."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/accelerate" / name).read_text())
    cfg.update(num_processes=2, mixed_precision="no", main_process_port=_free_port(), **updates)
    cfg.get("fsdp_config", {}).update(fsdp or {})
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two(tmp_path, baseline, launch, extra=(), bound_s=300):
    """The shared setup under `tunelab train --launcher accelerate` (2 processes x batch 2); `launch`: an
    accelerate config file, or the launcher flags. Returns the run folder."""
    two = tmp_path / "two"
    launch = ["--accelerate-config", str(launch)] if isinstance(launch, Path) else launch
    _train_bounded([str(baseline.config), "--output", str(two), "--launcher", "accelerate"] + launch + TWO + COMMON
                   + list(extra), bound_s, tmp_path)
    return two


def _loads_on_one_process(tmp_path, run):
    """`tunelab generate`, `eval` and `export` take the run's final model in one process."""
    assert main(["generate", str(run), "--prompt", "Add 2 and 3.", "--max-new-tokens", "4"]) == 0
    (tmp_path / "t.txt").write_text("Add 1 and 2.\nThe answer is 3.\n\nAdd 4 and 5.\nThe answer is 9.\n")
    assert main(["eval", str(run), "--tasks", f"ppl:{tmp_path / 't.txt'}", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["tasks"]["ppl:t.txt"]["items"] == 2
    assert main(["export", str(run), "--to", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def _sharded_halves(run, processes=2):
    """summary.json's FSDP report: each process holds about 1/processes of the parameters (DTensor local
    shards), not the whole model as under DDP."""
    r = json.loads((run / "summary.json").read_text())["fsdp"]
    assert r is not None and r["processes"] == processes and len(r["local_param_elements"]) == processes, r
    for n in r["local_param_elements"]:
        assert abs(n / r["param_elements"] - 1 / processes) < 0.02, r
    assert sum(r["local_param_elements"]) <= r["param_elements"] * 1.02, r


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp2_on_cpu_shards_and_matches_one_process(tmp_path, baseline, monkeypatch, kind):
    """issue 15.2: configs/accelerate/fsdp.yaml (FSDP2) on 2 CPU processes (gloo) really shards: each process
    holds half of the parameters; LoRA and a full fine-tune give the same per-step losses (10 steps) and
    final weights as one process within 1e-4; the LoRA adapter is an ordinary PEFT adapter that
    generate, eval and export load in one process."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    two = _two(tmp_path, baseline, _adapted("fsdp.yaml", tmp_path / "fsdp.yaml"), FULL if kind == "full" else [])
    _sharded_halves(two)
    assert "FSDP: parameters sharded over 2 processes; each holds 50.0%, 50.0%" in \
        " ".join((tmp_path / "stderr.log").read_text().split())
    assert list(two.glob(f"checkpoint-{STEPS}/pytorch_model_fsdp*")), "not an FSDP checkpoint"
    if kind == "full":
        _same_run(baseline.run("full"), two, "model.safetensors")
        assert main(["generate", str(two), "--prompt", "Add 2 and 3.", "--max-new-tokens", "4"]) == 0
        return
    _same_run(baseline.run("lora"), two)
    assert json.loads((two / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    _loads_on_one_process(tmp_path, two)


def _kill_after_checkpoint(argv, step, bound_s, tmp_path):
    """`tunelab train` killed (SIGKILL, every process) as soon as its checkpoint-`step` is committed."""
    import subprocess
    import sys
    import time

    from tunelab.cli import kill_tree

    out = Path(argv[argv.index("--output") + 1])
    with open(tmp_path / "killed.log", "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "tunelab", "train"] + argv, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + bound_s
        try:
            while not (out / f"checkpoint-{step}").is_dir():
                assert p.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.time() < deadline, f"no checkpoint-{step} within {bound_s}s (hang)"
                time.sleep(0.05)
        finally:
            kill_tree(p.pid)
            p.wait()
    assert not (out / "final").exists(), "the run ended before it could be killed"


def test_fsdp2_sharded_checkpoint_kill_resume_matches_uninterrupted(tmp_path, baseline):
    """issue 15.2: FSDP2 with fsdp_state_dict_type SHARDED_STATE_DICT (torch.distributed.checkpoint shards)
    on 2 CPU processes: killed right after the step-5 checkpoint, `--resume` continues to step 10; the
    losses and the adapter equal one uninterrupted process, and the final adapter is written in the
    ordinary PEFT layout (the Trainer writes none for a sharded state dict; tunelab gathers it)."""
    cfg = _adapted("fsdp.yaml", tmp_path / "fsdp.yaml", fsdp={"fsdp_state_dict_type": "SHARDED_STATE_DICT"})
    two = tmp_path / "two"
    launch = [str(baseline.config), "--output", str(two), "--launcher", "accelerate", "--accelerate-config", str(cfg)] \
        + TWO + COMMON
    _kill_after_checkpoint(launch, STEPS // 2, 300, tmp_path)
    assert list((two / f"checkpoint-{STEPS // 2}").glob("pytorch_model_fsdp_0/*.distcp")), "not a sharded checkpoint"
    _train_bounded(launch + ["--resume"], 300, tmp_path)
    assert f"resuming from checkpoint-{STEPS // 2}" in (tmp_path / "stderr.log").read_text()
    _same_run(baseline.run("lora"), two)
    _sharded_halves(two)


def test_fsdp_options_that_need_a_gpu_fail_in_one_line(tmp_path, tiny_config, capsys):
    """issue 15.2: on a CPU-only machine FSDP1 and parameter offload cannot run; `tunelab train` says so in
    one line before launching anything (offload: FSDP2 pins host memory, which needs an accelerator)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs these")
    for fsdp, says in (({"fsdp_version": 1}, "fsdp_version 1 (FSDP1) needs GPUs"),
                       ({"fsdp_offload_params": True}, "fsdp_offload_params: true needs a GPU")):
        cfg = _adapted("fsdp.yaml", tmp_path / "fsdp.yaml", fsdp=fsdp)
        assert main(["train", str(tiny_config), "--output", str(tmp_path / "run"), "--launcher", "accelerate",
                     "--accelerate-config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


def test_chunked_loss_under_ddp_syncs_gradients(tmp_path, tiny_model):
    """issue 15 follow-up: the chunked loss inside DDP (tests/ddp_chunked_worker.py, 2 gloo processes, a full
    fine-tune, different rows per process): the forward runs through the DDP wrapper, so the gradients,
    the tied embedding/head's included, equal one process's stock-loss gradients on all rows, and the
    processes hold identical parameters after a step. The control (forward on the bare model) shows
    what the wrapper prevents: unsynchronised gradients, ranks drifting apart."""
    import subprocess
    import sys

    out = tmp_path / "ddp.json"
    worker = Path(__file__).parent / "ddp_chunked_worker.py"
    with open(tmp_path / "worker.log", "wb") as log:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(worker), str(tiny_model), str(out)], stdout=log, stderr=subprocess.STDOUT, timeout=240)
    assert p.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2
    w, d = r["wrapper"], r["direct"]
    assert w["grad_max_diff_to_one_process"] < 1e-6 and w["head_grad_max_diff_to_one_process"] < 1e-6, w
    assert w["param_max_diff_between_ranks"] == 0.0, w
    assert d["param_max_diff_between_ranks"] > 1e-3 and d["grad_max_diff_to_one_process"] > 1e-3, d


# ZeRO-3's shipped config offloads the optimizer to the CPU, which compiles DeepSpeed's cpu_adam op on first
# use (minutes on 2 cores); the tests keep the optimizer where it is, so only the small shm comm op is built.
def _deepspeed_config(tmp_path, name):
    import yaml

    pytest.importorskip("deepspeed", reason="pip install 'tunelab[deepspeed]'")
    cfg = _adapted(name, tmp_path / name)
    ds = yaml.safe_load(cfg.read_text())
    ds["deepspeed_config"]["offload_optimizer_device"] = "none"
    cfg.write_text(yaml.safe_dump(ds))
    return cfg


def test_deepspeed_zero2_two_cpu_processes_match_one(tmp_path, baseline):
    """issue 15.3: configs/accelerate/deepspeed_zero2.yaml on 2 CPU processes (DeepSpeed's CPU accelerator,
    gloo): a real DeepSpeed engine (its checkpoint layout), the losses equal one process, and the adapter
    is an ordinary PEFT adapter that loads in one process. (ZeRO-3: the resume test below, whose resumed
    run must equal one uninterrupted process.)"""
    two = _two(tmp_path, baseline, _deepspeed_config(tmp_path, "deepspeed_zero2.yaml"), bound_s=400)
    assert (two / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()  # DeepSpeed's own engine saved it
    _same_run(baseline.run("lora"), two)
    assert main(["generate", str(two), "--prompt", "Add 2 and 3.", "--max-new-tokens", "4"]) == 0


def test_deepspeed_zero3_checkpoint_resume_matches_one_process(tmp_path, baseline):
    """issue 15.3: ZeRO-3 on 2 CPU processes killed right after its step-5 checkpoint; `--resume` loads
    DeepSpeed's sharded checkpoint and continues to step 10: the losses and the adapter equal one
    uninterrupted process."""
    cfg = _deepspeed_config(tmp_path, "deepspeed_zero3.yaml")
    two = tmp_path / "two"
    launch = [str(baseline.config), "--output", str(two), "--launcher", "accelerate", "--accelerate-config", str(cfg)] \
        + TWO + COMMON
    _kill_after_checkpoint(launch, STEPS // 2, 400, tmp_path)
    assert (two / f"checkpoint-{STEPS // 2}" / f"global_step{STEPS // 2}").is_dir()
    _train_bounded(launch + ["--resume"], 400, tmp_path)
    assert f"resuming from checkpoint-{STEPS // 2}" in (tmp_path / "stderr.log").read_text()
    assert (two / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()  # DeepSpeed's own engine saved it
    _same_run(baseline.run("lora"), two)
    assert main(["generate", str(two), "--prompt", "Add 2 and 3.", "--max-new-tokens", "4"]) == 0


def test_accelerate_still_needs_the_cpu_fsdp_switch(tmp_path):
    """tunelab/distributed.py finishes accelerate's FSDP switch on CPU processes. This goes red when accelerate
    changes: if AcceleratorState turns FSDP on for CPU processes itself, the override is dead code (remove
    it); if the state no longer takes it, FSDP on CPU is lost (the sharding tests go red too). One gloo
    process, in a subprocess (AcceleratorState is a process-wide singleton)."""
    import subprocess
    import sys

    script = (
        "from accelerate import Accelerator, PartialState\n"
        "from accelerate.utils import DistributedType\n"
        "from tunelab.distributed import enable_fsdp_on_cpu\n"
        "acc = Accelerator(cpu=True)\n"
        "before = acc.state.distributed_type\n"
        "changed = enable_fsdp_on_cpu(acc)\n"
        "print(before, changed, acc.state.distributed_type, PartialState().distributed_type,\n"
        "      acc.state.fsdp_plugin.fsdp_version, acc.is_fsdp2)\n")
    env = dict(os.environ, ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    before, changed, after, partial, version, fsdp2 = p.stdout.split()[-6:]
    assert before == "DistributedType.MULTI_CPU", f"accelerate now sets {before} on CPU: revisit tunelab/distributed.py"
    assert (changed, after, partial, version, fsdp2) == ("True", "DistributedType.FSDP", "DistributedType.FSDP",
                                                         "2", "True")
