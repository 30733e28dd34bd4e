"""Training throughput: tunelab vs the recipe's stack (TRL SFTTrainer), side by side, alternated.

    .venv/bin/python bench/bench_train.py                       # SmolLM2-135M, alpaca_en_demo, 2 x 8, 6 steps
    .venv/bin/python bench/bench_train.py --arms tunelab,recipe-fp32 --steps 4 --out /tmp/bench.json

Arms (same model, data, data order, max_seq_length, batch shape, optimizer, learning rate, steps):
  tunelab          tunelab's defaults: model.dtype=auto (bf16-mixed on a CPU with native bf16, i.e.
                   fp32 weights and optimizer state with bf16 autocast; float32 where bf16 would be
                   emulated; fused LoRA layers with bf16-mixed on a CPU), data.packing (one padding-free
                   row per optimizer step, per-example attention, split into pieces of
                   data.pack_max_tokens: auto = 1,024 tokens on a CPU with bf16-mixed, 512 in float32),
                   train.chunked_loss (logits only where labels exist); no gradient checkpointing. What a user gets without tuning anything.
                   Packing is the one setting the bench turns on: it is off by default in tunelab.
  tunelab-fp32     the same with model.dtype=float32: the exact-arithmetic twin of recipe-fp32
  tunelab-bf16     tunelab with model.dtype=bfloat16 (weights, adapter and compute in bf16)
  tunelab-compile  tunelab's defaults with every decoder layer compiled by torch.compile (inductor; dynamic
                   shapes, since packed pieces differ in length); its first step includes the compilation
  tunelab-mixed-compile  the same on model.dtype=bf16-mixed
  tunelab-t1       tunelab's defaults on one intra-op thread (the thread-settings lever: on a busy
                   machine every multi-threaded op waits for all its threads to be scheduled)
  tunelab-gc       tunelab's defaults with gradient checkpointing (reentrant), as recipe-fp32 has it: the
                   equal-memory comparison (packing a whole step into one row without
                   checkpointing keeps every layer's activations for ~3,000 tokens)
  recipe-shipped   TRL SFTTrainer as users run it: prompt/completion data, completion-only loss,
                   padding to the longest, no packing, SFTConfig defaults (bf16=True, gradient
                   checkpointing on), the same LoRA (r16, alpha16, dropout 0, 7 modules)
  recipe-fp32      the same, configured fairly: bf16=False, everything else as shipped
  recipe-fp32-nogc the same with gradient checkpointing off as well (the stack's fastest CPU setting)
A tunelab arm may set config keys after a colon, to measure a lever beside the default in one run:
  tunelab:data.pack_max_tokens=4096+lora.fused=false

One run of this script runs every arm: each arm lives in its own worker process (so that each
arm's peak RSS is its own), the parent hands a baton so that exactly one arm computes at a time,
one optimizer step per turn, round-robin. A noisy machine slows all arms alike, so the ratios
hold. A step is timed from the baton to the end of the optimizer step: it includes the data
loading of the step, forward, backward, gradient clipping, the optimizer and the scheduler.
The first step of each arm is a warm-up and is left out of the averages (reported apart).

Model FLOPs utilisation (MFU) against the machine's matmul peaks, measured here in the same run
(best of square matmuls 2048..4096 on all threads, a @ b and a @ b^T, fp32 and bf16, before and after the arms; the
higher of each is used). `mfu` is against the peak of the dtype the arm's matmuls ran in (bf16 for
bf16 weights or bf16 autocast, fp32 otherwise); `mfu_best_peak` against the best of the two peaks
(on an AVX2-only CPU bf16 is emulated and its peak is the lower one):
  per non-pad token: 4 N (forward 2N + input-gradient 2N through the frozen base; LoRA's own
  FLOPs and gradient-checkpointing recomputation are not counted), N = the parameters that
  multiply activations (every Linear of the decoder + the output head; a tied embedding counted
  once, as the head);
  plus attention, per example of length L and per layer: forward 2 x 2 x d x L(L+1)/2 (QK^T and
  PV over the causal half, d = heads x head_dim), backward twice that: 6 d L(L+1) per layer.
  `mfu` uses exactly that; `mfu_strict` counts the output head only at positions whose next token
  is trained (what tunelab actually computes; the stock loss computes it everywhere).

Output: a table on stdout and a JSON file (--out). Not a test: tests/test_bench_smoke.py runs a
few steps on the tiny model so that the script does not rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's tunelab, not an installed one
DEFAULT_DATA = REPO.parent / "shared" / "data" / "train" / "alpaca_en_demo" / "data.json"
ARMS = ["tunelab", "tunelab-fp32", "tunelab-mixed", "tunelab-bf16", "tunelab-gc", "tunelab-t1", "tunelab-compile",
        "tunelab-mixed-compile", "recipe-fp32", "recipe-fp32-nogc", "recipe-shipped"]
TUNELAB_DTYPE = {"tunelab": "auto", "tunelab-fp32": "float32", "tunelab-mixed": "bf16-mixed", "tunelab-bf16": "bfloat16", "tunelab-gc": "auto",
                 "tunelab-t1": "auto", "tunelab-compile": "auto", "tunelab-mixed-compile": "bf16-mixed"}
TAG = "@@BENCH "


# ---------------------------------------------------------------------------------------------
# shared helpers


def vm_hwm_gib() -> float:
    m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 2**20 if m else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def matmul_peak_gflops(sizes=(2048, 3072, 4096), reps=3, dtype: str = "float32", slow_s: float = 2.0) -> float:
    """Best GFLOP/s of square products, in both layouts a model uses: a @ b and F.linear's a @ b^T (where bf16 is
    emulated the two take different fallback loops: 0.3 vs ~30 GFLOP/s with torch held to AVX2). Where one
    product takes over `slow_s` seconds (a 4096 product would take minutes there), that first timing is the
    layout's figure and its larger sizes are skipped."""
    import torch
    import torch.nn.functional as F

    best = 0.0
    for product in (torch.matmul, F.linear):
        for n in sizes:
            a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
            t = time.perf_counter()
            product(a, b)
            first = time.perf_counter() - t
            if first > slow_s:
                best = max(best, 2 * n**3 / first / 1e9)
                break
            for _ in range(reps):
                t = time.perf_counter()
                product(a, b)
                best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
              "amx_int8", "amx_fp16")


def machine() -> dict:
    import torch

    from tunelab.models import cpu_has_native, cpu_info
    from tunelab.precision import ONEDNN_LIMITS

    cpu, flags = cpu_info()
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # settings that hold torch below the CPU's instructions (an AVX2-only CPU mimicked on a newer one)
            "isa_limits": {k: os.environ[k] for k in ONEDNN_LIMITS if os.environ.get(k)},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_flags": [f for f in SIMD_FLAGS if f in flags], "native_bf16": cpu_has_native(torch.bfloat16),
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags,
            "torch": torch.__version__, "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tunelab", "bench"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# worker: one arm


class Counter:
    """Wraps trainer.training_step; counts what each optimizer step trains (for tokens/s and FLOPs).

    Counted at training_step, not in the collator: accelerate's data loader fetches a batch ahead."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self):
        self.tokens = self.trained = self.attn_l2 = self.examples = 0

    def __call__(self, model, batch, *args, **kw):
        self.count(batch)
        return self.inner(model, batch, *args, **kw)

    def count(self, batch):
        labels = batch["labels"]
        if "cu_seq_lens_q" in batch:
            lens = (batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).tolist()
        else:
            lens = batch["attention_mask"].sum(1).tolist()
        self.tokens += int(sum(lens))
        self.trained += int((labels[:, 1:] != -100).sum())
        self.attn_l2 += int(sum(n * (n + 1) for n in lens))
        self.examples += len(lens)


def worker(arm: str, a) -> None:
    import torch
    from transformers import TrainerCallback

    def send(kind, **kw):
        sys.stdout.write(TAG + json.dumps({"kind": kind, **kw}) + "\n")
        sys.stdout.flush()

    def wait_go() -> bool:
        """True: run the next step; False: the parent's time budget is spent, stop training."""
        line = sys.stdin.readline().strip()
        if line not in ("go", "stop"):
            sys.exit(0)
        return line == "go"

    steps = a.shipped_steps if arm == "recipe-shipped" else a.steps
    if arm.endswith("-t1"):
        torch.set_num_threads(1)
    trainer, model_info = (build_tunelab if arm.startswith("tunelab") else build_recipe)(arm, a, steps)
    counter = Counter(trainer.training_step)
    trainer.training_step = counter
    log = {"step_s": [], "tokens": [], "trained": [], "attn_l2": [], "examples": [], "loss": []}

    class Baton(TrainerCallback):
        t0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            reset_hwm()
            send("ready", **model_info)
            wait_go()
            counter.reset()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            for k, v in (("step_s", dt), ("tokens", counter.tokens), ("trained", counter.trained),
                         ("attn_l2", counter.attn_l2), ("examples", counter.examples)):
                log[k].append(v)
            send("step", step=state.global_step, seconds=dt, tokens=counter.tokens)
            if state.global_step < steps:
                if not wait_go():
                    control.should_training_stop = True
                    return
                counter.reset()
                self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log["loss"].append(float(logs["loss"]))

    trainer.add_callback(Baton())
    trainer.train()
    send("done", peak_rss_train_gib=vm_hwm_gib(),
         peak_rss_process_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **log)


def _lora_modules():
    from tunelab.config import LLAMA_LORA_MODULES

    return list(LLAMA_LORA_MODULES)


def _flop_params(model) -> dict:
    """N: parameters of every Linear that multiplies activations (LoRA's own excluded); the head apart."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    n_lin = 0
    for name, mod in base.named_modules():
        if isinstance(mod, nn.Linear) and "lora_" not in name and mod is not head:
            n_lin += mod.weight.numel()
    cfg = base.config
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return {"n_body": n_lin, "n_head": head.weight.numel(), "n_layers": cfg.num_hidden_layers, "d_attn": d_attn}


def arm_overrides(arm: str) -> tuple[str, dict]:
    """"tunelab:data.pack_max_tokens=4096+lora.fused=false" -> ("tunelab", {"data.pack_max_tokens": 4096, ...}):
    any tunelab arm with config keys set (values read as YAML scalars), to measure a lever beside the default."""
    import yaml

    base, _, rest = arm.partition(":")
    over = {}
    for item in filter(None, rest.split("+")):
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise SystemExit(f"bench_train: arm {arm!r}: expected section.key=value after ':', got {item!r}")
        over[key.strip()] = yaml.safe_load(value)
    return base, over


def build_tunelab(arm, a, steps):
    import torch

    from tunelab.config import config_from_dict, validate
    from tunelab.train import build_model, make_trainer, setup_data, training_arguments

    spec = arm
    arm, over = arm_overrides(arm)
    raw = {
        "model": {"name": a.model, "dtype": TUNELAB_DTYPE[arm]},
        "data": {"path": str(a.data), "format": "alpaca", "template": "alpaca", "max_seq_length": a.max_seq_length,
                 "max_rows": a.max_rows, "packing": True,
                 "pack_max_tokens": a.pack_max_tokens if a.pack_max_tokens == "auto" else int(a.pack_max_tokens)},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": _lora_modules()},
        "train": {"per_device_train_batch_size": a.batch, "gradient_accumulation_steps": a.accum,
                  "learning_rate": a.lr, "warmup_steps": 0, "max_steps": steps, "lr_scheduler_type": "constant",
                  "optim": "adamw_torch", "logging_steps": 1, "save_steps": 10**6, "report_to": [],
                  "seed": 42, "chunked_loss": True, "gradient_checkpointing": arm == "tunelab-gc"},
    }
    for key, value in over.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    cfg = config_from_dict(raw)
    validate(cfg)
    s = setup_data(cfg)
    from transformers import set_seed

    set_seed(42)
    model = build_model(s)
    if arm.endswith("-compile"):  # the torch.compile lever: each decoder layer compiled in place (inductor)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in base.get_decoder().layers:
            layer.compile(dynamic=True)
    args = training_arguments(cfg, Path(a.tmp) / arm, s.device, s.dtype, has_eval=False)
    args.save_strategy = "no"
    trainer = make_trainer(model, args, s, interactive=False)  # no progress bar, overfit watch, signal handler
    from tunelab.models import pick_precision

    prec = pick_precision(cfg.model.dtype, s.device)
    return trainer, {"arm": spec, "rows": len(s.train), "gradient_checkpointing": cfg.train.gradient_checkpointing,
                     "pack_max_tokens": trainer.pack_max_tokens,
                     "torch_threads": torch.get_num_threads(),
                     "bf16": prec.compute == torch.bfloat16, "precision": prec.name,
                     "matmul_dtype": str(prec.compute).replace("torch.", ""), **_flop_params(model)}


def build_recipe(arm, a, steps):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from tunelab.config import DataConfig
    from tunelab.data.pipeline import DataStats, load_examples
    from tunelab.data.templates import render_prompt
    from tunelab.models import load_model, load_tokenizer, resolve_model

    folder = resolve_model(a.model)
    tok, _ = load_tokenizer(folder)  # the same tokenizer (pad != eos) for every arm
    dc = DataConfig(path=str(a.data), format="alpaca", template="alpaca")
    pairs = load_examples(dc, dc.path, DataStats())
    table = datasets.Dataset.from_dict({
        "prompt": [render_prompt("alpaca", ex, tok, None) for _, ex in pairs],
        "completion": [ex.response for _, ex in pairs],
    }).shuffle(seed=42)  # the order tunelab's pipeline uses (datasets shuffle, seed 42)
    if a.max_rows:
        table = table.select(range(min(a.max_rows, len(table))))
    kw = {}
    if arm in ("recipe-fp32", "recipe-fp32-nogc"):
        kw["bf16"] = False
    if arm == "recipe-fp32-nogc":
        kw["gradient_checkpointing"] = False
    args = SFTConfig(output_dir=str(Path(a.tmp) / arm), per_device_train_batch_size=a.batch,
                     gradient_accumulation_steps=a.accum, max_steps=steps, learning_rate=a.lr, warmup_steps=0,
                     lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.01, max_grad_norm=1.0,
                     seed=42, data_seed=42, logging_steps=1, save_strategy="no", report_to=[],
                     max_length=a.max_seq_length, packing=False, padding_free=False, completion_only_loss=True,
                     include_num_input_tokens_seen="non_padding", use_cpu=True, disable_tqdm=True,
                     dataloader_num_workers=0, **kw)
    model = load_model(folder, tok, dtype=torch.float32, device="cpu")
    set_seed(42)
    peft_cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=_lora_modules())
    trainer = SFTTrainer(model=model, args=args, train_dataset=table, processing_class=tok, peft_config=peft_cfg)
    info = {"arm": arm, "rows": len(table), "bf16": bool(args.bf16),
            "precision": "bf16-mixed" if args.bf16 else "float32", "matmul_dtype": "bfloat16" if args.bf16 else "float32",
            "torch_threads": torch.get_num_threads(),
            "gradient_checkpointing": bool(args.gradient_checkpointing), **_flop_params(trainer.model)}
    return trainer, info


# ---------------------------------------------------------------------------------------------
# parent: alternate the arms, collect, report


class Arm:
    def __init__(self, name, a, argv):
        self.name = name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv]
        self.log = open(Path(a.tmp) / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.info = self.read("ready")
        self.steps_done = 0
        self.result = None

    def read(self, kind):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                msg = json.loads(line[len(TAG):])
                if msg["kind"] == kind:
                    return msg
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise SystemExit(f"arm {self.name} stopped without '{kind}'; its log ends:\n{tail}")

    def step(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        msg = self.read("step")
        self.steps_done += 1
        return msg

    def stop(self):
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()

    def finish(self):
        self.result = self.read("done")
        try:  # its figures are in; a worker slow to exit on a busy machine must not fail the run
            self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def summarise(name, info, r, peaks: dict) -> dict:
    steps = r["step_s"]
    timed = slice(1, None) if len(steps) > 1 else slice(0, None)
    secs, toks = sum(steps[timed]), sum(r["tokens"][timed])
    trained, attn = sum(r["trained"][timed]), sum(r["attn_l2"][timed])
    L = info["n_layers"]
    attn_flops = 6 * info["d_attn"] * attn * L
    flops = 4 * (info["n_body"] + info["n_head"]) * toks + attn_flops
    flops_strict = 4 * info["n_body"] * toks + 4 * info["n_head"] * trained + attn_flops
    peak_gflops = peaks[info.get("matmul_dtype", "float32")]
    best = max(peaks.values())
    return {
        "arm": name, "bf16": info.get("bf16", False), "gradient_checkpointing": info.get("gradient_checkpointing", False),
        "precision": info.get("precision"), "matmul_dtype": info.get("matmul_dtype", "float32"),
        "torch_threads": info.get("torch_threads"), "pack_max_tokens": info.get("pack_max_tokens"),
        "steps": len(steps), "timed_steps": len(steps[timed]),
        "step_seconds": [round(x, 2) for x in steps],
        "seconds_per_step": round(secs / max(1, len(steps[timed])), 2),
        "first_step_seconds": round(steps[0], 2),
        "tokens_per_step": r["tokens"], "trained_tokens_per_step": r["trained"],
        "tokens_per_second": round(toks / secs, 2) if secs else None,
        "trained_tokens_per_second": round(trained / secs, 2) if secs else None,
        "gflops_per_second": round(flops / secs / 1e9, 2) if secs else None,
        "mfu": round(flops / secs / 1e9 / peak_gflops, 4) if secs else None,
        "mfu_strict": round(flops_strict / secs / 1e9 / peak_gflops, 4) if secs else None,
        "mfu_best_peak": round(flops / secs / 1e9 / best, 4) if secs else None,
        "mfu_strict_best_peak": round(flops_strict / secs / 1e9 / best, 4) if secs else None,
        "attention_share_of_flops": round(attn_flops / flops, 4) if flops else None,
        "peak_rss_train_gib": round(r["peak_rss_train_gib"], 3),
        "peak_rss_process_gib": round(r["peak_rss_process_gib"], 3),
        "losses": [round(x, 5) for x in r["loss"]],
        "final_loss": round(r["loss"][-1], 5) if r["loss"] else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--shipped-steps", type=int, default=1, help="steps for recipe-shipped (bf16 is slow on CPU)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--minutes", type=float, default=None,
                   help="start no new round after this many minutes (every arm keeps the steps it ran)")
    p.add_argument("--pack-max-tokens", default="auto",
                   help="tunelab arms: data.pack_max_tokens (default: tunelab's own, auto = 1024 on a CPU "
                        "with bf16-mixed, 512 in float32)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    p.add_argument("--tmp", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tmp is None:
        import tempfile

        a.tmp = tempfile.mkdtemp(prefix="tunelab-bench-")
    Path(a.tmp).mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a.worker, a)
        return 0
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    unknown = [x for x in arms if x.partition(":")[0] not in ARMS or (":" in x and not x.startswith("tunelab"))]
    if unknown or not arms:
        print(f"bench_train: unknown arm(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    if not Path(a.data).exists():
        print(f"bench_train: data not found: {a.data}", file=sys.stderr)
        return 2
    passthrough = ["--model", a.model, "--data", str(a.data), "--max-seq-length", str(a.max_seq_length),
                   "--batch", str(a.batch), "--accum", str(a.accum), "--steps", str(a.steps),
                   "--shipped-steps", str(a.shipped_steps), "--lr", str(a.lr), "--pack-max-tokens",
                   str(a.pack_max_tokens), "--tmp", a.tmp] + (["--max-rows", str(a.max_rows)] if a.max_rows else [])
    started = datetime.now(timezone.utc)
    load_before = load_avg()
    peak_before = matmul_peak_gflops()
    bf16_before = matmul_peak_gflops(dtype="bfloat16")
    print(f"matmul peaks (before): fp32 {peak_before:.1f}, bf16 {bf16_before:.1f} GFLOP/s; "
          f"load average {load_before}", flush=True)
    workers = []
    for name in arms:
        workers.append(Arm(name, a, passthrough))
        print(f"{name}: ready ({workers[-1].info['rows']} rows)", flush=True)
    target = {w.name: (a.shipped_steps if w.name == "recipe-shipped" else a.steps) for w in workers}
    rnd = 0
    t_start = time.time()
    while any(w.steps_done < target[w.name] for w in workers):
        if rnd > 0 and a.minutes and time.time() - t_start > 60 * a.minutes:
            print(f"time budget of {a.minutes} min spent after {rnd} rounds: stopping every arm", flush=True)
            for w in workers:
                if 0 < w.steps_done < target[w.name]:
                    w.stop()
            break
        order = workers if rnd % 2 == 0 else workers[::-1]  # alternate the order: no arm always goes first
        for w in order:
            if w.steps_done < target[w.name]:
                msg = w.step()
                print(f"  round {rnd + 1} {w.name}: step {msg['step']} {msg['seconds']:.1f} s, "
                      f"{msg['tokens']} tokens", flush=True)
        rnd += 1
    for w in workers:
        w.finish()
    load_end = load_avg()
    peak_after = matmul_peak_gflops()
    bf16_after = matmul_peak_gflops(dtype="bfloat16")
    peak = max(peak_before, peak_after)
    bf16_peak = max(bf16_before, bf16_after)
    rows = [summarise(w.name, w.info, w.result, {"float32": peak, "bfloat16": bf16_peak}) for w in workers]
    ratios = {}
    for t in rows:
        if not t["arm"].startswith("tunelab"):
            continue
        for r in rows:
            if r["arm"].startswith("recipe") and r["tokens_per_second"] and t["tokens_per_second"]:
                n = min(len(t["losses"]), len(r["losses"]))
                ratios[f"{t['arm']} vs {r['arm']}"] = {
                    "speedup_tokens_per_second": round(t["tokens_per_second"] / r["tokens_per_second"], 2),
                    "peak_rss_train_ratio": round(t["peak_rss_train_gib"] / r["peak_rss_train_gib"], 3),
                    "max_abs_loss_diff": round(max((abs(x - y) for x, y in zip(t["losses"][:n], r["losses"][:n])),
                                                   default=0.0), 5),
                    "same_tokens_per_step": t["tokens_per_step"][:n] == r["tokens_per_step"][:n],
                }
    result = {
        "benchmark": "train", "command": "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"), "commit": git_commit(), "machine": machine(),
        "threads": {"torch": torch_threads(), "cores": os.cpu_count()},
        "load_average_before": load_before, "load_average_after": load_end,
        "fp32_matmul_peak_gflops": {"before": round(peak_before, 1), "after": round(peak_after, 1), "used": round(peak, 1)},
        "bf16_matmul_peak_gflops": {"before": round(bf16_before, 1), "after": round(bf16_after, 1),
                                    "used": round(bf16_peak, 1)},
        "best_matmul_peak_gflops": round(max(peak, bf16_peak), 1),
        "setup": {"model": a.model, "data": str(a.data), "max_seq_length": a.max_seq_length, "batch": a.batch,
                  "accum": a.accum, "steps": a.steps, "shipped_steps": a.shipped_steps, "lr": a.lr,
                  "max_rows": a.max_rows, "pack_max_tokens": a.pack_max_tokens},
        "arms": rows, "tunelab_vs": ratios,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    hdr = (f"{'arm':18} {'precision':>10} {'tok/s':>8} {'s/step':>8} {'1st step s':>10} {'MFU':>6} {'MFU*':>6} "
           f"{'MFUbest':>7} {'peak RSS GiB':>12} {'final loss':>10}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['arm']:18} {r['precision']:>10} {r['tokens_per_second']:>8} {r['seconds_per_step']:>8} "
              f"{r['first_step_seconds']:>10} {100 * r['mfu']:>5.1f}% {100 * r['mfu_strict']:>5.1f}% "
              f"{100 * r['mfu_best_peak']:>6.1f}% {r['peak_rss_train_gib']:>12.2f} {r['final_loss']:>10}")
    print(f"(MFU against the measured matmul peak of the dtype the arm's matmuls ran in: fp32 {peak:.1f}, "
          f"bf16 {bf16_peak:.1f} GFLOP/s; MFUbest against the best of them; MFU* counts the output head only at "
          f"trained positions; peak RSS is the arm's process during training; load average "
          f"{load_before} -> {load_end})")
    for arm, rr in ratios.items():
        print(f"{arm}: {rr['speedup_tokens_per_second']}x tokens/s, peak RSS x{rr['peak_rss_train_ratio']}, "
              f"max |loss diff| {rr['max_abs_loss_diff']}, same tokens per step: {rr['same_tokens_per_step']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
