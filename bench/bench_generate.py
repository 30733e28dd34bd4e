"""Generation throughput: batched (left padding) vs the recipe's one-prompt-at-a-time loop.

    .venv/bin/python bench/bench_generate.py --prompts 64 --max-new-tokens 64 --out bench/results/generate.json

Both arms run greedy decoding on the same prompts with the same template in the same process; the
script checks the outputs are identical and reports generated tokens per second for each.

Then, for the first prompt alone (--reps times, arms alternated): a plain KV-cache decoding loop
(forward, argmax, feed the token back with the cache) on all threads and on one thread, against
tunelab's generate_batch (model.generate, with the thread count decode_threads picks). Load average,
CPU and threads are recorded: on a busy machine the thread count, not the decoding code, decides.
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


def prompts_from(path: Path, n: int) -> list[str]:
    from tunelab.data.sources import read_rows

    rows = read_rows(str(path))
    out = [r["instruction"] for r in rows if not r.get("input")]
    return out[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/train/alpaca_en_demo/data.json"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2, help="alternated repetitions of the single-prompt arms")
    ap.add_argument("--out", default="bench/results/generate.json")
    args = ap.parse_args()

    import torch

    from tunelab.data.templates import encode_prompt
    from tunelab.generate import GenParams, build_prompt, generate
    from tunelab.models import cpu_info, load_for_inference

    loaded = load_for_inference(args.model)
    prompts = prompts_from(Path(args.data), args.prompts)
    params = GenParams(max_new_tokens=args.max_new_tokens)
    tok = loaded.tokenizer

    # The recipe's loop: one prompt at a time, model.generate, decode.
    t0 = time.perf_counter()
    single, single_tokens = [], 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([encode_prompt(tok, build_prompt(loaded, p))])
            out = loaded.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            single_tokens += len(new)
            single.append(tok.decode(new, skip_special_tokens=True))
    t_single = time.perf_counter() - t0

    t0 = time.perf_counter()
    batched = generate(loaded, prompts, params, batch_size=args.batch_size)
    t_batched = time.perf_counter() - t0
    batched_tokens = sum(c.tokens for c in batched)
    same = sum(a == b.text for a, b in zip(single, batched))

    # One prompt: a plain KV-cache loop vs tunelab's generate_batch, alternated.
    from tunelab.generate import decode_threads, generate_batch

    ids = torch.tensor([encode_prompt(tok, build_prompt(loaded, prompts[0]))])
    n_threads = torch.get_num_threads()

    def plain_loop(threads: int) -> list[int]:
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                toks = [int(out.logits[0, -1].argmax())]
                while len(toks) < args.max_new_tokens and toks[-1] != tok.eos_token_id:
                    out = loaded.model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values,
                                       use_cache=True, logits_to_keep=1)
                    toks.append(int(out.logits[0, -1].argmax()))
            return toks
        finally:
            torch.set_num_threads(n_threads)

    arms = {f"plain loop, {n_threads} threads": lambda: len(plain_loop(n_threads)),
            "plain loop, 1 thread": lambda: len(plain_loop(1)),
            "tunelab generate_batch": lambda: generate_batch(loaded, [prompts[0]], params)[0].tokens}
    one = {k: {"seconds": [], "tokens": 0} for k in arms}
    chosen = []
    for rep in range(args.reps):
        chosen.append(decode_threads(loaded.model, 1))
        for name in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            t = time.perf_counter()
            one[name]["tokens"] = arms[name]()
            one[name]["seconds"].append(round(time.perf_counter() - t, 2))
    for v in one.values():
        v["best_seconds"] = min(v["seconds"])
        v["tok_per_s"] = round(v["tokens"] / v["best_seconds"], 2)

    res = {"model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
           "batch_size": args.batch_size, "single_seconds": round(t_single, 2), "single_tokens": single_tokens,
           "single_tok_per_s": round(single_tokens / t_single, 2), "batched_seconds": round(t_batched, 2),
           "batched_tokens": batched_tokens, "batched_tok_per_s": round(batched_tokens / t_batched, 2),
           "speedup": round((batched_tokens / t_batched) / (single_tokens / t_single), 2),
           "identical_outputs": f"{same}/{len(prompts)}", "machine": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "cpu": cpu_info()[0],
           "single_prompt": one, "decode_threads_chosen": chosen, "load_average": [round(x, 2) for x in os.getloadavg()],
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip(),
           "date": time.strftime("%Y-%m-%d")}
    print(f"{'arm':<22}{'seconds':>10}{'tokens':>10}{'tok/s':>10}")
    print(f"{'one at a time':<22}{t_single:>10.1f}{single_tokens:>10}{res['single_tok_per_s']:>10.1f}")
    print(f"{'batched (' + str(args.batch_size) + ')':<22}{t_batched:>10.1f}{batched_tokens:>10}{res['batched_tok_per_s']:>10.1f}")
    print(f"speedup {res['speedup']}x, identical greedy outputs {res['identical_outputs']}")
    for name, v in one.items():
        print(f"one prompt, {name:<26} {v['tokens']:>4} tokens, seconds {v['seconds']}, {v['tok_per_s']} tok/s")
    print(f"decode_threads chose {chosen}; load average {res['load_average']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
