"""Matmul throughput at the model's own shapes: the attainable peak for a training step, and levers that raise it.

    .venv/bin/python bench/bench_matmul.py                         # SmolLM2-135M's shapes, rows 512..4096
    .venv/bin/python bench/bench_matmul.py --rows 1024 --threads 1,2 --out /tmp/matmul.json

bench_train.py's peaks are square matmuls of 2048..4096; a training step of SmolLM2-135M (hidden 576,
intermediate 1536, 9 query / 3 key-value heads of 64) multiplies [rows, 576] by [576, 576 | 192 | 1536] and
[rows, 1536] by [1536, 576], where rows = the tokens of one forward pass (one packed piece: at most
data.pack_max_tokens). Measured here per shape, fp32 and bf16, on each thread count, the way the model calls
it (F.linear with the weight stored [out, in]), forward (x W^T) and the input gradient (g W):
  linear       F.linear(x, W) as nn.Linear does;
  fused-qkv    q, k and v as one [576, 960] weight and gate+up as one [576, 3072] (the fused-projection lever:
               fewer, wider matmuls);
  weighted     the layer's own mix: every projection of one decoder layer, forward + input gradient, in
               GFLOP/s over the whole layer: the attainable peak for a step's linear work at that row count.
Each figure is the best of --reps timings after a warm-up. Output: a table and a JSON file (--out). The load
average is recorded before and after: on a busy machine the figures are not this CPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, in, out) of one SmolLM2-135M decoder layer's projections
LAYER = [("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576), ("gate", 576, 1536),
         ("up", 576, 1536), ("down", 1536, 576)]
FUSED = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)]


def best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(rows: int, dtype, reps: int, shapes) -> dict:
    """GFLOP/s per projection (forward and input gradient apart) and over the layer (both together)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    out, total_flops, total_s = {}, 0, 0.0
    for name, n_in, n_out in shapes:
        x = torch.randn(rows, n_in, generator=g).to(dtype)
        w = (torch.randn(n_out, n_in, generator=g) * 0.02).to(dtype)
        gy = torch.randn(rows, n_out, generator=g).to(dtype)
        flops = 2 * rows * n_in * n_out
        fwd = best_seconds(lambda: F.linear(x, w), reps)
        bwd = best_seconds(lambda: gy @ w, reps)  # dL/dx of x W^T (the frozen base's only gradient)
        out[name] = {"forward_gflops": round(flops / fwd / 1e9, 1), "input_grad_gflops": round(flops / bwd / 1e9, 1)}
        total_flops += 2 * flops
        total_s += fwd + bwd
    out["layer_gflops"] = round(total_flops / total_s / 1e9, 1)
    return out


def square_peak(dtype, reps: int, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return round(2 * n**3 / best_seconds(lambda: a @ b, reps) / 1e9, 1)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="512,1024,2048,4096", help="tokens per forward pass (comma list)")
    p.add_argument("--threads", default=None, help="intra-op thread counts (comma list; default: torch's)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "matmul.json"))
    a = p.parse_args(argv)
    rows = [int(x) for x in a.rows.split(",")]
    threads = [int(x) for x in a.threads.split(",")] if a.threads else [torch.get_num_threads()]
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    from tunelab.precision import cpu_info

    cpu, flags = cpu_info()
    result = {"benchmark": "matmul", "command": "python bench/bench_matmul.py " + " ".join(argv or sys.argv[1:]),
              "cpu": cpu, "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2"))),
              "torch": torch.__version__, "load_average_before": list(os.getloadavg()), "runs": []}
    hdr = f"{'threads':>7} {'dtype':>8} {'rows':>5} {'square':>7} {'layer':>7} {'fused':>7}  per projection fwd/grad"
    print(hdr + "\n" + "-" * len(hdr))
    for t in threads:
        torch.set_num_threads(t)
        for dt in dtypes:
            sq = square_peak(dt, a.reps)
            for r in rows:
                plain, fused = measure(r, dt, a.reps, LAYER), measure(r, dt, a.reps, FUSED)
                name = str(dt).replace("torch.", "")
                result["runs"].append({"threads": t, "dtype": name, "rows": r, "square_2048_gflops": sq,
                                       "linear": plain, "fused": fused})
                per = " ".join(f"{k} {v['forward_gflops']:.0f}/{v['input_grad_gflops']:.0f}"
                               for k, v in plain.items() if isinstance(v, dict))
                print(f"{t:>7} {name:>8} {r:>5} {sq:>7} {plain['layer_gflops']:>7} {fused['layer_gflops']:>7}  {per}",
                      flush=True)
    result["load_average_after"] = list(os.getloadavg())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"(GFLOP/s; square: 2048^3 matmul; layer: one decoder layer's projections, forward + input gradient; "
          f"fused: q/k/v and gate/up as one weight each; load average {result['load_average_before']} -> "
          f"{result['load_average_after']})\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
