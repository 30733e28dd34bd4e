"""GPU benchmark: QLoRA with Llama-3-8B's exact shapes, tunelab vs the recipe's stack.

    python bench/gpu_qlora.py --out OUT_DIR                 # on a machine with an NVIDIA GPU
    python bench/gpu_qlora.py --out /tmp/x --cpu-dry-run    # tiny shapes on CPU, no 4-bit: checks the code path

The base is a randomly initialised LlamaForCausalLM with Meta-Llama-3-8B's configuration (vocab
128256, hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336, rope theta 500000, untied
head): nothing to download, and speed does not depend on the weight values. Its Linear layers
are quantized to 4-bit NF4 with double quantization and bf16 compute (bitsandbytes Linear4bit,
as `BitsAndBytesConfig(load_in_4bit=True, ...)` would), then:
  recipe   TRL SFTTrainer as RECIPE.md runs it: bf16, gradient checkpointing (reentrant),
           adamw_8bit, LoRA r16/alpha16/dropout 0 on the 7 projections, padding to the longest,
           completion-only loss, no packing, 2 x 8 accumulation, max length 2048;
  tunelab  tunelab's Trainer with the same model, LoRA, optimizer and gradient checkpointing,
           plus data.packing (pack_max_tokens 4096 = one recipe micro-batch of 2 x 2048) and
           train.chunked_loss.
Data: synthetic token rows (seed 0), lengths uniform in [--min-len, 2048] (--min-len 2048 gives
full rows), a quarter of each row masked as prompt. Each arm runs in its own process (peak GPU
memory = torch.cuda.max_memory_allocated of that process, after the model is built), one
warm-up step then --steps timed steps. Targets (issue 6): tunelab >= 1.5x tokens/s and <= 60%
of the recipe's peak memory.

Budget: designed to finish within 8 minutes on an H200 (two model builds of ~16 GB bf16 each,
quantized on the GPU, and 1 + 3 steps per arm); --deadline stops early and still writes JSON.

The GPU machine has no network: it needs transformers >= 5.20, peft, trl, bitsandbytes and
accelerate as in pyproject.toml. Carry them as wheels (pip download --no-deps ... -d wheels) and
`pip install --no-index wheels/*.whl` there before running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TAG = "@@GPU "

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, pad_token_id=128255)
TINY = dict(LLAMA3_8B, vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic_rows(n, min_len, max_len, vocab, seed=0):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        L = rng.randint(min_len, max_len)
        ids = [rng.randrange(10, min(vocab, 128000)) for _ in range(L)]
        p = L // 4
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def build_model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(TINY if a.cpu_dry_run else LLAMA3_8B))
    cfg._attn_implementation = "sdpa"
    device = "cpu" if a.cpu_dry_run else "cuda"
    dtype = torch.float32 if a.cpu_dry_run else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    if not a.cpu_dry_run:
        import bitsandbytes as bnb
        from torch import nn

        for layer in model.model.layers:  # quantize every projection in place, on the GPU
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, nn.Linear):
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                              compress_statistics=True, quant_type="nf4", device="meta")
                        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4", module=q).to("cuda")
                        setattr(parent, name, q)
                        del lin
        model.is_loaded_in_4bit = True
        model.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                            "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                                            "quant_method": "bitsandbytes"}
        torch.cuda.empty_cache()
    model.config.use_cache = False
    return model


class PadTok:
    """What the Trainer needs of a tokenizer here (synthetic ids): the pad id; saving is off."""

    pad_token_id = 128255
    eos_token = "<|end_of_text|>"
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, pad):
        self.pad_token_id = pad

    def save_pretrained(self, *a, **k):
        return None


def worker(arm, a):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import TrainerCallback, set_seed

    t_build = time.perf_counter()
    model = build_model(a)
    cfg_model = TINY if a.cpu_dry_run else LLAMA3_8B
    rows = synthetic_rows(a.batch * a.accum * (a.steps + 1), min(a.min_len, a.seq), a.seq, cfg_model["vocab_size"])
    use_cuda = not a.cpu_dry_run
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=MODULES)
    optim = "adamw_torch" if a.cpu_dry_run else "adamw_8bit"
    steps = a.steps + 1
    if arm == "recipe":
        import datasets
        from trl import SFTConfig

        ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                         "completion_mask": [[0 if x == -100 else 1 for x in r["labels"]] for r in rows]})
        args = SFTConfig(output_dir=str(Path(a.out) / "scratch" / arm), per_device_train_batch_size=a.batch,
                         gradient_accumulation_steps=a.accum, max_steps=steps, learning_rate=1e-4, warmup_steps=0,
                         lr_scheduler_type="constant", optim=optim, logging_steps=1, save_strategy="no",
                         report_to=[], max_length=a.seq, packing=False, padding_free=False, completion_only_loss=True,
                         bf16=use_cuda, use_cpu=not use_cuda, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": True}, seed=42, disable_tqdm=True,
                         include_num_input_tokens_seen="non_padding")
        # TRL itself enables input gradients for checkpointing and casts the adapters to bf16 for a
        # quantized base; it does not call prepare_model_for_kbit_training (tunelab's build_model does).
        trainer = _sft(model, args, ds, lora, cfg_model)
    else:
        from tunelab.config import config_from_dict
        from tunelab.data.pipeline import DataStats, TokenizedExample
        from tunelab.train import Setup, make_trainer, prepare_quantized, training_arguments

        cfg = config_from_dict({
            "model": {"name": "llama3-8b-random", "dtype": "bfloat16" if use_cuda else "float32"},
            "data": {"path": "synthetic", "max_seq_length": a.seq, "packing": True, "pack_max_tokens": a.pack_max_tokens or a.batch * a.seq},
            "quantization": {"load_in_4bit": use_cuda, "compute_dtype": "bfloat16"},
            "train": {"per_device_train_batch_size": a.batch, "gradient_accumulation_steps": a.accum,
                      "max_steps": steps, "learning_rate": 1e-4, "warmup_steps": 0, "lr_scheduler_type": "constant",
                      "optim": optim, "logging_steps": 1, "save_steps": 10**6, "report_to": [],
                      "gradient_checkpointing": True, "gradient_checkpointing_use_reentrant": True,
                      "chunked_loss": True},
        })
        if use_cuda and a.peft_prepare:  # the earlier path, kept to measure what it cost
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        else:  # what tunelab's build_model does for a 4-bit base
            prepare_quantized(model, True, True)
        set_seed(42)
        model = get_peft_model(model, lora)
        train = [TokenizedExample(r["input_ids"], r["labels"], len(r["input_ids"]) // 4, len(r["input_ids"])) for r in rows]
        s = Setup(cfg, Path("."), "cuda" if use_cuda else "cpu", torch.bfloat16 if use_cuda else torch.float32,
                  PadTok(cfg_model["pad_token_id"]), None, train, [], DataStats(), [])
        args = training_arguments(cfg, Path(a.out) / "scratch" / arm, s.device, s.dtype, has_eval=False)
        args.save_strategy = "no"
        trainer = make_trainer(model, args, s, interactive=False)  # no progress bar, overfit watch, signal handler
    build_s = time.perf_counter() - t_build
    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    static = torch.cuda.memory_allocated() / 2**30 if use_cuda else 0.0
    times, tokens, losses = [], [], []
    seen = {"tokens": 0}
    orig = trainer.training_step

    def counting_step(model, inputs, *x, **k):
        if "cu_seq_lens_q" in inputs:
            seen["tokens"] += int(inputs["cu_seq_lens_q"][-1])
        else:
            seen["tokens"] += int(inputs["attention_mask"].sum())
        return orig(model, inputs, *x, **k)

    trainer.training_step = counting_step
    deadline = time.time() + a.deadline

    class Timer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if use_cuda:
                torch.cuda.synchronize()
            if not self.t0:
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if use_cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - self.t0)
            tokens.append(seen["tokens"])
            seen["tokens"] = 0
            self.t0 = now
            if time.time() > deadline:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Timer())
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else 0.0
    timed = times[1:] or times
    ttok = tokens[1:] or tokens
    out = {"arm": arm, "build_seconds": round(build_s, 1), "step_seconds": [round(x, 3) for x in times],
           "seconds_per_step": round(sum(timed) / len(timed), 3), "tokens_per_step": tokens,
           "tokens_per_second": round(sum(ttok) / sum(timed), 1), "peak_gpu_gib": round(peak, 3),
           "static_gpu_gib_after_build": round(static, 3), "losses": losses}
    sys.stdout.write(TAG + json.dumps(out) + "\n")
    sys.stdout.flush()


def _sft(model, args, ds, lora, cfg_model):
    """TRL SFTTrainer on pre-tokenized rows (input_ids + completion_mask), as the recipe's stack."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    # SFTTrainer insists on a real tokenizer for the pad token: a word-level stub with the ids used.
    vocab = {f"t{i}": i for i in range(cfg_model["vocab_size"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=f"t{cfg_model['pad_token_id']}",
                                  eos_token=f"t{cfg_model['eos_token_id']}", unk_token="t0")
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(42)
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_qlora.json")
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--min-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--arms", default="tunelab,recipe")
    p.add_argument("--deadline", type=float, default=200, help="seconds per arm after which it stops after the step")
    p.add_argument("--cpu-dry-run", action="store_true")
    p.add_argument("--pack-max-tokens", type=int, default=0, help="tunelab arm: data.pack_max_tokens (default batch x seq)")
    p.add_argument("--peft-prepare", action="store_true",
                   help="tunelab arm: prepare the 4-bit base with peft's prepare_model_for_kbit_training (fp32 upcast)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a)
        return 0
    import torch

    if not a.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_qlora: no CUDA GPU visible (use --cpu-dry-run to check the code path on CPU)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    results = []
    for arm in [x.strip() for x in a.arms.split(",") if x.strip()]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--out", str(out), "--steps", str(a.steps),
               "--seq", str(a.seq), "--min-len", str(a.min_len), "--batch", str(a.batch), "--accum", str(a.accum),
               "--deadline", str(a.deadline)] + (["--cpu-dry-run"] if a.cpu_dry_run else []) \
            + (["--peft-prepare"] if a.peft_prepare else []) + ["--pack-max-tokens", str(a.pack_max_tokens)]
        with open(out / f"{arm}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        msg = next((json.loads(line[len(TAG):]) for line in proc.stdout.splitlines() if line.startswith(TAG)), None)
        if msg is None:
            msg = {"arm": arm, "error": f"exit {proc.returncode}; see {out / (arm + '.log')}"}
        results.append(msg)
        print(json.dumps(msg), flush=True)
    by = {r["arm"]: r for r in results if "error" not in r}
    verdict = {}
    if "tunelab" in by and "recipe" in by:
        t, r = by["tunelab"], by["recipe"]
        verdict = {"speedup_tokens_per_second": round(t["tokens_per_second"] / r["tokens_per_second"], 3),
                   "memory_ratio": round(t["peak_gpu_gib"] / r["peak_gpu_gib"], 3) if r["peak_gpu_gib"] else None}
        verdict["meets_targets"] = verdict["speedup_tokens_per_second"] >= 1.5 and (verdict["memory_ratio"] or 1) <= 0.6
    result = {"benchmark": "gpu_qlora", "started_utc": started.isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
              "torch": torch.__version__, "shapes": "tiny (dry run)" if a.cpu_dry_run else "Meta-Llama-3-8B",
              "seq": a.seq, "min_len": a.min_len, "pack_max_tokens": a.pack_max_tokens or a.batch * a.seq, "batch": a.batch, "accum": a.accum, "arms": results, "tunelab_vs_recipe": verdict}
    (out / "gpu_qlora.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
