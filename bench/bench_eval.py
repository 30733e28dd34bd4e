"""Multiple-choice scoring: the context's forward pass shared by the choices vs one pass per choice.

    .venv/bin/python bench/bench_eval.py --task arc_easy --limit 40 --out bench/results/eval.json

tunelab runs each item's context once and lets every choice continue from its KV cache
(`scoring.choice_logliks`); the naive way (and what a per-request harness does without grouping)
runs context + choice once per choice (`scoring._full_loglik`). Both arms score the same items in
the same process, alternating per item so machine load hits both alike; the script checks the
log-likelihoods agree and reports items per second for each. A third arm, timed once over all items, is what
`tunelab eval` runs: `scoring.batch_choice_logliks` (left-padded batches of --batch-size sequences).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_easy", help="a built-in task or a task .yaml file")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--fewshot", type=int, default=0, help="longer contexts make sharing pay more")
    ap.add_argument("--batch-size", type=int, default=8, help="the batched arm's sequences per forward pass")
    ap.add_argument("--out", default="bench/results/eval.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("TUNELAB_BENCH_DIR", str(ROOT.parent / "shared/data/bench"))

    import torch
    from rich.console import Console
    from rich.table import Table

    from tunelab.evaluate import scoring
    from tunelab.evaluate.tasks import load_task
    from tunelab.models import load_for_inference

    task = load_task(args.task)
    items = task.with_fewshot(args.fewshot)[: args.limit]
    loaded = load_for_inference(args.model, dtype="float32", device="cpu")
    tok = loaded.tokenizer
    times = {"shared": 0.0, "per_choice": 0.0}
    max_diff, same_pred, n_choices, ctx_tokens = 0.0, 0, 0, 0
    with torch.inference_mode():
        scoring.choice_logliks(loaded, items[0].context, items[0].choices)  # warm-up, not timed
        for i, it in enumerate(items):
            pairs = [scoring.encode_pair(tok, it.context, task.target_delimiter + c) for c in it.choices]
            ctx_tokens += len(pairs[0][0])
            n_choices += len(pairs)
            arms = ["shared", "per_choice"] if i % 2 == 0 else ["per_choice", "shared"]
            got = {}
            for arm in arms:
                t0 = time.perf_counter()
                if arm == "shared":
                    got[arm] = scoring.choice_logliks(loaded, it.context, it.choices, task.target_delimiter)
                else:
                    got[arm] = [scoring._full_loglik(loaded.model, c, x, loaded.device) for c, x in pairs]
                times[arm] += time.perf_counter() - t0
            max_diff = max(max_diff, *(abs(a - b) for a, b in zip(got["shared"], got["per_choice"])))
            pred = [max(range(len(v)), key=v.__getitem__) for v in (got["shared"], got["per_choice"])]
            same_pred += pred[0] == pred[1]

    t0 = time.perf_counter()  # what `tunelab eval` runs: all items in left-padded batches
    batched = scoring.batch_choice_logliks(loaded, [(it.context, it.choices, task.target_delimiter) for it in items],
                                           args.batch_size)
    times["batched"] = time.perf_counter() - t0
    with torch.inference_mode():
        ref = [scoring.choice_logliks(loaded, it.context, it.choices, task.target_delimiter) for it in items]
    max_diff = max(max_diff, *(abs(a - b) for x, y in zip(ref, batched) for a, b in zip(x, y)))

    n = len(items)
    table = Table(title=f"{task.name}, {n} items, {n_choices} choices, {args.fewshot}-shot, "
                        f"mean context {ctx_tokens / n:.0f} tokens ({args.model}, fp32, CPU)")
    for c in ("arm", "seconds", "items/s"):
        table.add_column(c)
    table.add_row("one forward pass per choice", f"{times['per_choice']:.1f}", f"{n / times['per_choice']:.2f}")
    table.add_row("context once, KV cache shared", f"{times['shared']:.1f}", f"{n / times['shared']:.2f}")
    table.add_row(f"batched, {args.batch_size} sequences per pass", f"{times['batched']:.1f}",
                  f"{n / times['batched']:.2f}")
    Console().print(table)
    speedup = times["per_choice"] / times["shared"]
    print(f"speed-up {speedup:.2f}x; largest log-likelihood difference {max_diff:.1e}; "
          f"same prediction on {same_pred}/{n} items")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"task": task.name, "items": n, "choices": n_choices, "fewshot": args.fewshot,
              "mean_context_tokens": ctx_tokens / n, "model": args.model, "seconds": times, "speedup": speedup,
              "max_loglik_diff": max_diff, "same_prediction": same_pred, "commit": commit,
              "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if max_diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
