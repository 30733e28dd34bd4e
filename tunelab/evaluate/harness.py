"""`tunelab eval`: benchmark tasks over one or more models, one table with 95% bootstrap CIs
and, for every model after the first, the paired difference to the first on the same items.

Every scored item is cached (see cache.py): Ctrl-C keeps what is done and a rerun continues.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..cache import Cache, model_fingerprint
from ..data.templates import Example
from ..fsutil import atomic_write_text
from ..generate import GenParams, generate
from ..ui import Progress, console, show
from . import scoring
from .stats import bootstrap_ci, bootstrap_ratio_ci, paired_diff_ci
from .tasks import Item, TaskError, load_task

PRIMARY = {"multiple_choice": "acc", "generate": "exact_match", "perplexity": "loss"}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="benchmark one or more models / checkpoints on tasks")
    p.add_argument("models", nargs="+", help="model specs, run folders or checkpoints (the first is the reference)")
    p.add_argument("--tasks", "-t", required=True,
                   help="comma-separated: arc_easy, arc_challenge, mmlu, mmlu_<subject>, kobest_{boolq,copa,hellaswag,"
                        "sentineg,wic}, gsm8k, ppl:<instruction data file or .txt text>, or task .yaml files")
    p.add_argument("--limit", type=int, help="first N items of each task")
    p.add_argument("--fewshot", "-k", type=int, default=0, help="solved examples before each item")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size (generative tasks)")
    p.add_argument("--out", help="folder for results.json (read by `tunelab report`)")
    p.add_argument("--no-cache", action="store_true")


def _ppl_task(path: str):
    """`ppl:FILE`: an instruction set (the run's template, loss on the responses) or, for a .txt
    file, plain text (one document per blank-line-separated block, no template)."""
    from ..config import DataConfig
    from ..data.pipeline import DataStats, load_examples
    from .tasks import Item, Task

    if path.endswith(".txt"):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TaskError(f"perplexity text file not found: {path}") from None
        except UnicodeDecodeError:
            raise TaskError(f"{path}: not UTF-8 text") from None
        docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
        if not docs:
            raise TaskError(f"{path}: no text to score")
        return Task(f"ppl:{Path(path).name}", "perplexity", [Item("", response=d) for d in docs])
    try:
        pairs = load_examples(DataConfig(path=path), path, DataStats())
    except ValueError as e:
        raise TaskError(str(e)) from None
    # the whole example (instruction, input, turns) goes to the run's template, as in training
    items = [ExampleItem(ex.display(), response=ex.response, example=ex) for _, ex in pairs]
    return Task(f"ppl:{Path(path).name}", "perplexity", items)


@dataclass
class ExampleItem(Item):
    """A perplexity item scored after its whole example (instruction, input, turns) in the run's template."""

    example: Example | None = None


def resolve_tasks(spec: str) -> list:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise TaskError("--tasks is empty")
    return [_ppl_task(n[4:]) if n.startswith("ppl:") else load_task(n) for n in names]


def score_task(loaded, task, items, cache: Cache | None, batch_size: int, progress) -> dict:
    """Per-item scores for one model on one task: {metric: [values]} (+ 'outputs' for generation)."""
    fp = model_fingerprint(loaded)
    bar = progress.add_task(f"{task.name}", total=len(items))
    per: dict[str, list] = {}
    if task.kind == "multiple_choice":
        for it in items:
            key = Cache.key("ll", fp, it.context, it.choices, task.target_delimiter)
            lls = cache.get_raw(key) if cache else None
            if lls is None:
                lls = scoring.choice_logliks(loaded, it.context, it.choices, task.target_delimiter)
                if cache:
                    cache.put_raw(key, "ll", lls)
            for k, v in scoring.score_choice(lls, it.choices, it.gold).items():
                per.setdefault(k, []).append(v)
            per.setdefault("logliks", []).append(lls)
            progress.advance(bar)
    elif task.kind == "generate":
        params = GenParams(max_new_tokens=task.max_new_tokens, stop=list(task.stop))
        outs = generate(loaded, [it.context for it in items], params, batch_size=batch_size, cache=cache,
                        template=None if task.template == "model" else "plain", on_result=lambda i, c: progress.advance(bar))
        per["exact_match"] = [scoring.exact_match(o.text, it.target, task.regex) for o, it in zip(outs, items)]
        per["outputs"] = [o.text for o in outs]
    else:
        nll, ntok = [], []
        for it in items:
            ex = getattr(it, "example", None)
            key = Cache.key("nll", fp, json.dumps(asdict(ex), ensure_ascii=False) if ex else it.context, it.response)
            got = cache.get_raw(key) if cache else None
            if got is None:
                # an empty prompt means plain text (no template), else the response after the templated prompt
                got = list(scoring.response_nll(loaded, ex or it.context, it.response) if (ex or it.context)
                           else scoring.text_nll(loaded, it.response))
                if cache:
                    cache.put_raw(key, "nll", got)
            nll.append(got[0])
            ntok.append(got[1])
            progress.advance(bar)
        per["nll"], per["tokens"] = nll, ntok
    return per


def summarize(task, per: dict, seed: int) -> dict:
    if task.kind == "perplexity":
        loss, lo, hi = bootstrap_ratio_ci(per["nll"], per["tokens"], seed=seed)
        import math

        return {"loss": [loss, lo, hi], "perplexity": [math.exp(loss), math.exp(lo), math.exp(hi)]}
    metrics = ["acc", "acc_norm"] if task.kind == "multiple_choice" else ["exact_match"]
    return {m: list(bootstrap_ci(per[m], seed=seed)) for m in metrics}


def cmd_eval(args) -> int:
    from ..models import load_for_inference

    tasks = resolve_tasks(args.tasks)  # unknown names and malformed files fail before any model loads
    if args.limit is not None and args.limit <= 0:
        raise TaskError(f"--limit must be > 0, got {args.limit}")
    prepared = []
    for t in tasks:
        items = t.with_fewshot(args.fewshot, args.seed) if t.kind != "perplexity" else t.items
        prepared.append((t, items[: args.limit] if args.limit else items))
    cache = None if args.no_cache else Cache()
    results: dict = {"tasks": {t.name: {"kind": t.kind, "items": len(items), "fewshot": args.fewshot}
                               for t, items in prepared}, "models": {}, "diffs": {}}
    t0 = time.perf_counter()
    for spec in args.models:
        loaded = load_for_inference(spec)
        results["models"][spec] = {}
        with Progress(TextColumn(f"[bold]{Path(spec).name or spec}[/bold] {{task.description}}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                      transient=True, label=f"eval {Path(spec).name or spec}", unit="items") as progress:
            for t, items in prepared:
                per = score_task(loaded, t, items, cache, args.batch_size, progress)
                results["models"][spec][t.name] = {"metrics": summarize(t, per, args.seed), "per_item": per}
        del loaded
    ref = args.models[0]
    for spec in args.models[1:]:
        for t, _ in prepared:
            m = PRIMARY[t.kind]
            a = results["models"][ref][t.name]["per_item"]
            b = results["models"][spec][t.name]["per_item"]
            if t.kind == "perplexity":
                va = [n / k for n, k in zip(a["nll"], a["tokens"])]
                vb = [n / k for n, k in zip(b["nll"], b["tokens"])]
            else:
                va, vb = a[m], b[m]
            results["diffs"].setdefault(spec, {})[t.name] = {"metric": m, "diff": list(paired_diff_ci(va, vb, seed=args.seed))}
    results["seconds"] = round(time.perf_counter() - t0, 2)
    print_table(results, args.models)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
        console.print(f"results in {out / 'results.json'}")
    return 0


def fmt_ci(v: list[float], pct: bool = True) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(v[0])} [{f(v[1])}, {f(v[2])}]"


def print_table(results: dict, models: list[str]) -> None:
    table = Table(title="tunelab eval (95% bootstrap CI; Δ = paired difference to the first model)")
    table.add_column("task")
    table.add_column("metric")
    for m in models:
        table.add_column(Path(m).name or m)
    for task, info in results["tasks"].items():
        first = results["models"][models[0]][task]["metrics"]
        for metric in first:
            pct = metric != "loss" and metric != "perplexity"
            row = [f"{task} (n={info['items']}, {info['fewshot']}-shot)", metric]
            for m in models:
                cell = fmt_ci(results["models"][m][task]["metrics"][metric], pct)
                d = results["diffs"].get(m, {}).get(task)
                if d and d["metric"] == (metric if metric != "perplexity" else "loss") and metric != "perplexity":
                    sign = "+" if d["diff"][0] >= 0 else ""
                    cell += f"\nΔ {sign}{fmt_ci(d['diff'], pct)}"
                row.append(cell)
            table.add_row(*row)
    show(table)
