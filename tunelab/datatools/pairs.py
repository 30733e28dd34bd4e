"""`tunelab data pairs`: preference pairs from a model's own mistakes, for DPO after SFT.

Each row of --data is asked the way `tunelab eval` asks a `kind: generate` task (the task file's
context and target templates, the run's prompt template when the task says `template: model`, greedy,
the task's stop strings and max_new_tokens, tunelab's batched generate path) and scored by the same
code (harness.score_task: the task's regex + exact match). For every row the model gets wrong the
output has one pair: prompt = the question as the task renders it, chosen = the reference answer
(the task's target), rejected = the answer the model actually gave. Rows it answers correctly give
no pair (counted). A DPO run with `model.name: <the same run>` and the run's `data.template` then
sees the prompt exactly as generation fed it.

The task's own file is its held-out set: --data may not be that file (pairs from it would leak the
test into training).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import ConfigError
from .common import (
    Provenance,
    add_output_args,
    check_inputs_not_outputs,
    guard_outputs,
    progress,
    sidecar,
    write_rows_with_provenance,
)


def add_parser(sub) -> None:
    p = sub.add_parser("pairs", help="DPO pairs from a model's wrong answers: chosen reference, rejected answer")
    p.add_argument("--model", required=True, help="model spec, run folder or checkpoint that answers (e.g. runs/demo)")
    p.add_argument("--task", required=True,
                   help="a `kind: generate` task .yaml (tunelab's format): its templates, stop, max_new_tokens, "
                        "regex and exact match, as `tunelab eval` uses them")
    p.add_argument("--data", required=True,
                   help="rows to answer (.jsonl/.json/.csv/.parquet) with the task's fields; not the task's own "
                        "(held-out) file")
    add_output_args(p)
    p.add_argument("--max-rows", type=int, help="answer only the first N rows of --data")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    p.add_argument("--no-cache", action="store_true", help="don't read or write the generation cache")


def load_rows_as_task(task_path: str, data: str):
    """The task file with --data's rows as its items (the same templates `eval` fills), and the task's own
    data file (to refuse it)."""
    import yaml

    from ..evaluate.tasks import TaskError, load_task_file

    tp = Path(task_path)
    if not tp.is_file():
        raise ConfigError(f"--task {task_path}: file not found")
    if not task_path.endswith((".yaml", ".yml")):
        raise ConfigError(f"--task {task_path}: expected a task .yaml file")
    dp = Path(data)
    if not dp.exists():
        raise ConfigError(f"--data {data}: file not found")
    spec = yaml.safe_load(tp.read_text(encoding="utf-8"))
    own = tp.parent / str(spec.get("path", "")) if isinstance(spec, dict) and spec.get("path") else None
    if own is not None and own.exists() and own.resolve() == dp.resolve():
        raise ConfigError(f"--data {data} is the task's own (held-out) file; build pairs from training rows "
                          f"so the evaluation stays held out")
    task = load_task_file(tp, data=dp)
    if task.kind != "generate":
        raise TaskError(f"--task {task_path}: a {task.kind} task; pairs need a `kind: generate` task "
                        f"(a generated answer scored by exact match)")
    if not task.items:
        raise TaskError(f"--data {data}: no rows")
    return task


def build_pairs(task, items, outputs: list[str], scores: list[float]) -> tuple[list[dict], dict[str, int]]:
    """(pair rows, counts of rows without a pair by reason) from the model's answers and their scores."""
    rows: list[dict] = []
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for it, out, score in zip(items, outputs, scores):
        rejected = out.strip()
        if score >= 1.0:
            skip("answered correctly")
        elif not it.target.strip():
            skip("no reference answer")
        elif not rejected:
            skip("empty answer (nothing to reject)")
        elif rejected == it.target.strip():
            skip("answer equals the reference text")  # scored wrong by the regex, yet the same text
        else:
            rows.append({"prompt": it.context, "chosen": it.target.strip(), "rejected": rejected})
    return rows, skipped


def _most_common(values) -> list:
    """[[text, count], ...] of the 3 most frequent texts on one side of the pairs."""
    from collections import Counter

    return [list(x) for x in Counter(values).most_common(3)]


def one_sided(rows: list[dict], share: float = 0.1, min_count: int = 5) -> list[tuple[str, int, int]]:
    """(answer, times rejected, times chosen) for answers rejected in at least `share` of the pairs (and
    `min_count`) but chosen in under a quarter as many. Such a pair set teaches "never say X" rather than
    when X is wrong: a model that answers one word to every even/odd question gets pairs that only ever
    reject that word, and DPO then flips it to the other word everywhere."""
    from collections import Counter

    rejected, chosen = Counter(r["rejected"] for r in rows), Counter(r["chosen"] for r in rows)
    return [(a, n, chosen[a]) for a, n in rejected.most_common()
            if n >= max(min_count, share * len(rows)) and chosen[a] * 4 < n]


def cmd_pairs(args) -> int:
    from ..cache import Cache
    from ..evaluate.harness import score_task
    from ..models import load_for_inference
    from ..ui import console

    if args.max_rows is not None and args.max_rows < 1:
        raise ConfigError(f"--max-rows must be >= 1, got {args.max_rows}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    guard_outputs([out, sidecar(out, "provenance")], args.overwrite)
    check_inputs_not_outputs([args.data, args.task], out)
    task = load_rows_as_task(args.task, args.data)
    items = task.with_fewshot(None)  # the task's description and default shots, as `eval` prepares items
    n_read = len(items)
    if args.max_rows is not None:
        items = items[: args.max_rows]
    t0 = time.perf_counter()
    loaded = load_for_inference(args.model)
    cache = None if args.no_cache else Cache()
    with progress() as bar:
        per = score_task(loaded, task, items, cache, args.batch_size, bar)
    seconds = time.perf_counter() - t0
    scores, outputs = per["exact_match"], per["outputs"]
    rows, skipped = build_pairs(task, items, outputs, scores)
    correct = int(sum(1 for s in scores if s >= 1.0))
    prov = Provenance("pairs", [args.data, args.task], rows_in=n_read, settings={
        "model": args.model, "task": task.name, "template": loaded.template if task.template == "model" else "plain",
        "system_prompt": loaded.system_prompt, "max_new_tokens": task.max_new_tokens, "stop": list(task.stop),
        "regex": task.regex, "decoding": "greedy", "max_rows": args.max_rows, "batch_size": args.batch_size})
    for reason, n in skipped.items():
        prov.drop(reason, n)
    if n_read > len(items):
        prov.drop(f"beyond --max-rows {args.max_rows}", n_read - len(items))
    prov.extra.update({"answered": len(items), "correct": correct, "wrong": len(items) - correct,
                       "exact_match": round(correct / len(items), 4), "seconds": round(seconds, 1),
                       # a skewed side (one answer rejected again and again) teaches a bias, not a skill
                       "most_common_chosen": _most_common(r["chosen"] for r in rows),
                       "most_common_rejected": _most_common(r["rejected"] for r in rows)})
    skew = one_sided(rows)
    prov.extra["one_sided_rejected"] = [{"answer": a, "rejected": n, "chosen": c} for a, n, c in skew]
    write_rows_with_provenance(out, rows, prov)
    tmpl = prov.settings["template"]
    console.print(f"pairs {args.data} with {args.model} on {task.name}: answered {len(items)}, correct {correct} "
                  f"({100 * correct / len(items):.1f}%), wrong {len(items) - correct}; pairs written {len(rows)} -> "
                  f"{out} ({seconds:.0f} s)"
                  + "".join(f"\n  no pair: {n} {r}" for r, n in skipped.items() if r != "answered correctly")
                  + f"\n  train on them with data.template: {tmpl} (the prompts are the task's, as generation saw "
                    f"them)\n  provenance: {sidecar(out, 'provenance')}")
    for a, n, c in skew:
        console.print(f"[yellow]warning: {a!r} is the rejected answer of {n} of {len(rows)} pairs and the chosen "
                      f"one of {c}: DPO on these learns to avoid {a!r} everywhere, not when it is wrong (add pairs "
                      f"that choose it, or leave that kind out)[/yellow]")
    return 0
