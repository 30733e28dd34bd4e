"""Where a tunelab training step spends its time: torch.profiler over whole optimizer steps.

    .venv/bin/python bench/profile_train.py                  # SmolLM2-135M, alpaca_en_demo, 2 x 8, packed
    .venv/bin/python bench/profile_train.py --set train.gradient_checkpointing=true --steps 2

Runs tunelab's real Trainer (the bench's `tunelab` arm), skips one warm-up step, profiles the
next --steps steps and prints (and writes as JSON) the self CPU time by category: matrix
products (mm/addmm/bmm/linear), attention (SDPA kernels), the loss (tunelab/loss.py's chunks
included in matmul/elementwise; logsumexp/exp/gather here), elementwise and normalisation,
copies/reshapes, the optimizer, and the rest; then the 25 most expensive operators.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

CATEGORIES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("loss (softmax/logsumexp/gather)", ("logsumexp", "aten::exp", "gather", "log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("Optimizer.step", "_foreach", "adam", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("copies/reshape/cat", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::index", "aten::to",
                            "aten::_to_copy", "aten::slice", "aten::select", "aten::fill_", "aten::zero_", "aten::empty")),
    ("elementwise/norm/activation", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow", "aten::rsqrt",
                                     "aten::mean", "aten::silu", "aten::neg", "aten::sum", "aten::cos", "aten::sin",
                                     "silu_backward", "aten::where", "aten::masked", "aten::sigmoid")),
]


def categorise(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def main(argv=None) -> int:
    import bench_train
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(bench_train.DEFAULT_DATA))
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--pack-max-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing (the tunelab-gc arm)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "profile_train.json"))
    a = p.parse_args(argv)
    a.tmp = "/tmp/tunelab-profile"
    arm = "tunelab-gc" if a.gc else "tunelab"
    trainer, info = bench_train.build_tunelab(arm, a, a.steps + 1)
    state = {"prof": None, "t0": 0.0, "wall": 0.0, "tokens": 0}
    orig = trainer.training_step

    def counting(model, inputs, *x, **k):
        if state["prof"] is not None:
            state["tokens"] += int(inputs["cu_seq_lens_q"][-1]) if "cu_seq_lens_q" in inputs else int(inputs["attention_mask"].sum())
        return orig(model, inputs, *x, **k)

    trainer.training_step = counting

    class Prof(TrainerCallback):
        def on_step_end(self, args, st, control, **kw):
            if st.global_step == 1:  # warm-up done: profile the following steps
                state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif st.global_step == a.steps + 1 and state["prof"] is not None:
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)

    trainer.add_callback(Prof())
    trainer.train()
    prof = state["prof"]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    cats: dict[str, float] = {}
    for e in events:
        c = categorise(e.key)
        cats[c] = cats.get(c, 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    result = {"arm": arm, "steps_profiled": a.steps, "wall_seconds": round(state["wall"], 2),
              "tokens": state["tokens"], "torch_threads": torch.get_num_threads(),
              "self_cpu_seconds_total": round(total / 1e6, 2),
              "by_category": {k: {"seconds": round(v / 1e6, 2), "share": round(v / total, 4)}
                              for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
              "top_ops": [{"op": e.key, "seconds": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count,
                           "share": round(e.self_cpu_time_total / total, 4)} for e in top]}
    print(f"{arm}: {a.steps} step(s), {state['tokens']} tokens, {state['wall']:.1f} s wall "
          f"(profiler overhead included), self CPU {total / 1e6:.1f} s")
    for k, v in result["by_category"].items():
        print(f"  {k:34} {v['seconds']:8.2f} s  {100 * v['share']:5.1f}%")
    print("top operators:")
    for t in result["top_ops"]:
        print(f"  {t['op']:48} {t['seconds']:8.3f} s  {100 * t['share']:5.1f}%  x{t['calls']}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
