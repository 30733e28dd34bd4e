"""Multi-GPU benchmark (issue 15.6): DDP vs FSDP vs DeepSpeed ZeRO-3 for a Llama-3-8B-shaped LoRA,
through `tunelab train --launcher accelerate` and the configs in configs/accelerate/.

    python bench/gpu_multi.py --out OUT_DIR                  # on a machine with >= 2 NVIDIA GPUs
    python bench/gpu_multi.py --out /tmp/x --cpu-dry-run     # tiny model, 2 CPU processes: checks the code path

The base is a randomly initialised LlamaForCausalLM with Meta-Llama-3-8B's configuration (vocab 128256,
hidden 4096, 32 layers, 32/8 heads, MLP 14336), saved once in bf16 under OUT_DIR/model (about 16 GB of
disk); nothing is downloaded and speed does not depend on the weight values. Every arm trains the same LoRA
(r 16 on the 7 projections, bf16 mixed precision, gradient checkpointing) on synthetic alpaca rows for
--steps steps, one process per GPU, and reports tokens/s (input tokens seen by all ranks / train runtime)
and rank 0's peak GPU memory (summary.json's peak_gpu_gib; every rank holds the same share under these
engines). QLoRA is run under DDP only: 4-bit weights under FSDP/ZeRO-3 need bnb_4bit_quant_storage set to
the compute dtype, which tunelab does not wire yet.

Not run yet: this machine has no GPU. The dry run proves the arms start, train and write summary.json
(on CPU the FSDP arm runs FSDP2 over gloo, tunelab/distributed.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ARMS = {"ddp": None, "fsdp": "fsdp.yaml", "zero3": "deepspeed_zero3.yaml", "qlora-ddp": None}


def build_model(folder: Path, dry: bool) -> Path:
    if (folder / "config.json").is_file():
        return folder
    if dry:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import build_tiny_model

        return build_tiny_model(folder)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import build_tokenizer

    tok = build_tokenizer(folder)  # any tokenizer whose ids fit the vocab: speed does not depend on it
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cuda"):  # initialising 8B parameters on the CPU takes minutes
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def accelerate_config(name: str, out: Path, nproc: int, dry: bool) -> Path:
    cfg = yaml.safe_load((REPO / "configs/accelerate" / name).read_text())
    cfg.update(num_processes=nproc, mixed_precision="no" if dry else "bf16")
    if "deepspeed_config" in cfg:
        cfg["deepspeed_config"]["offload_optimizer_device"] = "none"  # measure ZeRO-3 itself, not CPU Adam
    path = out / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_arm(arm: str, model: Path, data: Path, out: Path, nproc: int, args) -> dict:
    run = out / f"run-{arm}"
    sets = [f"model.name={model}", f"data.path={data}", "data.test_size=0", f"train.max_steps={args.steps}",
            f"train.save_steps={args.steps}", f"train.per_device_train_batch_size={args.batch}",
            "train.gradient_accumulation_steps=1", f"data.max_seq_length={args.seq}", "model.device=auto",
            "train.warmup_steps=1"]
    if not args.cpu_dry_run:
        sets += ["model.dtype=bfloat16", "train.gradient_checkpointing=true"]
    if arm == "qlora-ddp":
        sets += ["quantization.load_in_4bit=true"]
    cmd = [sys.executable, "-m", "tunelab", "train", str(REPO / "configs/smollm2-demo.yaml"), "--output", str(run),
           "--launcher", "accelerate"]
    cmd += ["--accelerate-config", str(accelerate_config(ARMS[arm], out, nproc, args.cpu_dry_run))] if ARMS[arm] \
        else ["--num-processes", str(nproc)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    with open(out / f"{arm}.log", "wb") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.deadline,
                              check=False).returncode
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    res = {"arm": arm, "exit": code, "wall_s": round(time.time() - t0, 1), "processes": nproc}
    if summary.get("train_runtime_s"):
        res.update(tokens_per_second=round(summary["input_tokens_seen"] / summary["train_runtime_s"], 1),
                   peak_gpu_gib_rank0=summary.get("peak_gpu_gib"), train_loss=summary.get("train_loss"))
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default="ddp,fsdp,zero3,qlora-ddp")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--deadline", type=float, default=900, help="seconds per arm")
    p.add_argument("--cpu-dry-run", action="store_true")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_dry_run:
        nproc, args.seq, args.steps = 2, 128, min(args.steps, 2)
    else:
        import torch

        nproc = torch.cuda.device_count()
        if nproc < 2:
            sys.exit("gpu_multi: needs >= 2 CUDA GPUs (or --cpu-dry-run)")
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import write_alpaca

    model = build_model(out / "model", args.cpu_dry_run)
    data = write_alpaca(out / "data.jsonl", n=max(64, args.steps * args.batch * nproc * 2))
    results = []
    for arm in args.arms.split(","):
        if arm == "qlora-ddp" and args.cpu_dry_run:
            continue  # bitsandbytes 4-bit needs a GPU
        results.append(run_arm(arm, model, data, out, nproc, args))
        print(json.dumps(results[-1]), flush=True)
    (out / "gpu_multi.json").write_text(json.dumps({"dry_run": args.cpu_dry_run, "results": results}, indent=1))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
