"""Parity with lm-evaluation-harness: per-choice log-likelihoods and accuracy on the same items.

    .venv/bin/pip install lm_eval          # optional extra: pip install -e .[parity]
    .venv/bin/python bench/parity_lm_eval.py --task arc_easy --limit 50 --out bench/results/parity.json

Both sides score the same model (the embedded SmolLM2's cached safetensors folder, fp32, CPU) on
the same (context, continuation) pairs from tunelab's task loader; lm-eval's HFLM does its own
tokenization, batching and padding. Prints the largest per-choice difference and both accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--out", default="bench/results/parity_lm_eval.json")
    args = ap.parse_args()
    os.environ.setdefault("TUNELAB_BENCH_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/bench"))

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tunelab.evaluate import scoring
    from tunelab.evaluate.tasks import load_task
    from tunelab.models import load_for_inference, resolve_model

    task = load_task(args.task)
    items = task.items[: args.limit]
    t0 = time.perf_counter()
    loaded = load_for_inference(args.model, dtype="float32", device="cpu")
    ours = [scoring.choice_logliks(loaded, it.context, it.choices, task.target_delimiter) for it in items]
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(resolve_model(args.model)), dtype="float32", device="cpu", batch_size=8)
    reqs = [Instance("loglikelihood", {}, (it.context, task.target_delimiter + c), j)
            for it in items for j, c in enumerate(it.choices)]
    flat = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    t_ref = time.perf_counter() - t0
    theirs, k = [], 0
    for it in items:
        theirs.append(flat[k: k + len(it.choices)])
        k += len(it.choices)

    diffs = [abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t)]
    acc = lambda lls: sum(scoring.score_choice(l, it.choices, it.gold)["acc"] for l, it in zip(lls, items)) / len(items)
    accn = lambda lls: sum(scoring.score_choice(l, it.choices, it.gold)["acc_norm"] for l, it in zip(lls, items)) / len(items)
    same_pred = sum(max(range(len(o)), key=o.__getitem__) == max(range(len(t)), key=t.__getitem__)
                    for o, t in zip(ours, theirs))
    result = {"task": args.task, "items": len(items), "choices": len(diffs), "model": args.model,
              "max_abs_loglik_diff": max(diffs), "mean_abs_loglik_diff": sum(diffs) / len(diffs),
              "acc_tunelab": acc(ours), "acc_lm_eval": acc(theirs), "acc_norm_tunelab": accn(ours),
              "acc_norm_lm_eval": accn(theirs), "same_prediction": same_pred,
              "seconds_tunelab": round(t_ours, 2), "seconds_lm_eval": round(t_ref, 2)}
    print(f"{'':24}{'tunelab':>12}{'lm-eval':>12}")
    print(f"{'acc':24}{result['acc_tunelab']:>12.4f}{result['acc_lm_eval']:>12.4f}")
    print(f"{'acc_norm':24}{result['acc_norm_tunelab']:>12.4f}{result['acc_norm_lm_eval']:>12.4f}")
    print(f"{'seconds':24}{t_ours:>12.1f}{t_ref:>12.1f}")
    print(f"max |loglik diff| over {len(diffs)} choices: {result['max_abs_loglik_diff']:.2e} "
          f"(mean {result['mean_abs_loglik_diff']:.2e}); same argmax on {same_pred}/{len(items)} items")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    ok = result["max_abs_loglik_diff"] < 1e-3 and result["acc_tunelab"] == result["acc_lm_eval"]
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
