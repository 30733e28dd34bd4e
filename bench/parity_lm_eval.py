"""Parity with lm-evaluation-harness on task YAMLs in lm-eval's own format (issue 19 item 3).

    .venv/bin/pip install -e .[parity]      # lm_eval; the test suite itself never needs it
    .venv/bin/python bench/parity_lm_eval.py --limit 40 --out bench/results/parity_lm_eval.json

Three task files are written (into --workdir) over the shared benchmark data, each in lm-eval's format:
ARC-Easy (JSON lines, 0-shot), KoBEST-COPA (a .tsv with renamed columns, Jinja2 connector, 0-shot) and
MMLU anatomy (a headerless CSV, test = val here, 2 shots first_n from dev). The *same files* go to lm-eval
(`simple_evaluate` with a TaskManager on the folder, HFLM, batch 8) and to tunelab (`load_task_file` and
`batch_choice_logliks`, batch 8, what `tunelab eval` runs), both timed on the same items in one process.
For every item and choice the script compares the log-likelihoods, then the predictions and the task metrics; it exits 1 unless every log-likelihood is within 1e-3 and acc/acc_norm equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def task_files(folder: Path, bench: Path) -> list[Path]:
    arc = f"""task: parity_arc_easy
dataset_path: json
dataset_kwargs:
  data_files: {{test: {bench / 'arc' / 'arc_easy.jsonl'}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    copa = f"""task: parity_kobest_copa
dataset_path: csv
dataset_kwargs:
  data_files: {{test: {bench / 'kobest' / 'COPA' / 'dev.tsv'}}}
  sep: "\\t"
  quoting: 3
  column_names: [ID, premise, question, alternative_1, alternative_2, answer]
  header: 0
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{premise}}}} {{{{ {{'원인': ' 왜냐하면', '결과': ' 그래서'}}[question] }}}}"
doc_to_choice: "{{{{[alternative_1, alternative_2]}}}}"
doc_to_target: "{{{{answer - 1}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    mmlu = f"""task: parity_mmlu_anatomy
dataset_path: csv
dataset_kwargs:
  data_files: {{test: {bench / 'mmlu' / 'val' / 'anatomy_val.csv'}, dev: {bench / 'mmlu' / 'dev' / 'anatomy_dev.csv'}}}
  column_names: [question, A, B, C, D, answer]
  header: null
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: 2
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about anatomy.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    out = []
    for name, text in (("parity_arc_easy", arc), ("parity_kobest_copa", copa), ("parity_mmlu_anatomy", mmlu)):
        p = folder / f"{name}.yaml"
        p.write_text(text, encoding="utf-8")
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8, help="both sides (lm-eval's --batch_size)")
    ap.add_argument("--workdir", help="where the task YAMLs are written (default: a temporary folder)")
    ap.add_argument("--out", default="bench/results/parity_lm_eval.json")
    args = ap.parse_args(argv)
    bench = Path(os.environ.get("TUNELAB_BENCH_DIR", ROOT.parent / "shared/data/bench")).resolve()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tunelab.evaluate import scoring
    from tunelab.evaluate.tasks import load_task_file
    from tunelab.models import load_for_inference, resolve_model

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="tunelab-parity-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = task_files(folder, bench)
    loaded = load_for_inference(args.model, dtype="float32", device="cpu")
    lm = HFLM(pretrained=str(resolve_model(args.model)), dtype="float32", device="cpu", batch_size=args.batch_size)
    report, ok = {}, True
    for f in files:
        t = load_task_file(f)
        k = t.num_fewshot
        items = t.with_fewshot(k)[: args.limit]
        t0 = time.perf_counter()
        ours = scoring.batch_choice_logliks(loaded, [(it.context, it.choices, t.target_delimiter) for it in items],
                                            args.batch_size)  # what `tunelab eval` runs
        s_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=[t.name], task_manager=TaskManager(include_path=str(folder)),
                              limit=args.limit, log_samples=True, num_fewshot=k, bootstrap_iters=0)
        s_ref = time.perf_counter() - t0
        samples = sorted(res["samples"][t.name], key=lambda s: s["doc_id"])
        theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        same_ctx = sum(s["arguments"][0][0] == it.context if isinstance(s["arguments"][0], (list, tuple)) else True
                       for s, it in zip(samples, items)) if samples and "arguments" in samples[0] else None
        diffs = [abs(a - b) for o, th in zip(ours, theirs) for a, b in zip(o, th)]
        mine = {m: sum(scoring.score_choice(l, it.choices, it.gold)[m] for l, it in zip(ours, items)) / len(items)
                for m in ("acc", "acc_norm")}
        ref = {m: res["results"][t.name][f"{m},none"] for m in ("acc", "acc_norm")}
        same_pred = sum(max(range(len(o)), key=o.__getitem__) == max(range(len(th)), key=th.__getitem__)
                        for o, th in zip(ours, theirs))
        r = {"items": len(items), "fewshot": k, "choices": len(diffs), "max_abs_loglik_diff": max(diffs),
             "mean_abs_loglik_diff": sum(diffs) / len(diffs), "same_prediction": same_pred, "same_context": same_ctx,
             "tunelab": mine, "lm_eval": ref, "seconds_tunelab": round(s_ours, 1), "seconds_lm_eval": round(s_ref, 1)}
        r["ok"] = len(theirs) == len(ours) and max(diffs) < 1e-3 and mine == ref
        ok &= r["ok"]
        report[t.name] = r
        print(f"{t.name:24} n={len(items):3} {k}-shot  max|dll| {max(diffs):.1e}  same argmax {same_pred}/{len(items)}  "
              f"acc {mine['acc']:.4f}/{ref['acc']:.4f}  acc_norm {mine['acc_norm']:.4f}/{ref['acc_norm']:.4f}  "
              f"({s_ours:.0f}s / {s_ref:.0f}s)  {'OK' if r['ok'] else 'DIFFERENT'}")
    import lm_eval

    result = {"model": args.model, "tasks": report, "lm_eval_version": lm_eval.__version__,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
