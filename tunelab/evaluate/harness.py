"""`tunelab eval`: benchmark tasks over one or more models, one table with 95% bootstrap CIs
and, for every model after the first, the paired difference to the first on the same items.

Every scored item is cached (see cache.py): Ctrl-C keeps what is done and a rerun continues.
"""

from __future__ import annotations

import json
import math
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
from .stats import (
    bootstrap_ci,
    bootstrap_ratio_ci,
    bootstrap_stat,
    paired_diff_ci,
    paired_ratio_diff_ci,
)
from .tasks import Item, TaskError, load_task

PRIMARY = {"multiple_choice": "acc", "generate": "exact_match", "perplexity": "loss", "loglikelihood": "acc",
           "classify": "acc", "preference": "acc"}
HEAD_KINDS = {"classify": "classify", "reward": "preference"}  # run method with a classification head -> task kind


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="benchmark one or more models / checkpoints on tasks")
    p.add_argument("models", nargs="*", help="model specs, run folders or checkpoints (the first is the reference)")
    p.add_argument("--tasks", "-t",
                   help="comma-separated: arc_easy, arc_challenge, mmlu, mmlu_continuation, mmlu_<subject>, "
                        "kobest_{boolq,copa,hellaswag,sentineg,wic}, gsm8k, ppl:<instruction data file or .txt text>, "
                        "or task .yaml files (tunelab's or lm-evaluation-harness's format)")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks (n, metrics, lm-eval task)")
    p.add_argument("--limit", type=float,
                   help="first N items of each task, or a fraction of each when < 1 (as lm-eval's --limit)")
    p.add_argument("--fewshot", "--num_fewshot", "-k", type=int, default=None,
                   help="solved examples before each item (default: the task's own, as lm-eval's --num_fewshot)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per forward pass (multiple-choice scoring and generation)")
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
    bar = progress.add_task(f"{task.name}", total=len(items))
    if task.kind in ("classify", "preference"):  # a classify/reward run's head (tunelab/methods/classify.py)
        from ..methods.classify import score_classify, score_preference

        score = score_classify if task.kind == "classify" else score_preference
        return score(loaded, task, items, batch_size, lambda n: progress.advance(bar, n))
    fp = model_fingerprint(loaded)
    per: dict[str, list] = {}
    if task.kind == "multiple_choice":
        ctxs = [wrap_context(loaded, task, it.context) for it in items]
        keys = [Cache.key("ll", fp, c, it.choices, task.target_delimiter) for c, it in zip(ctxs, items)]
        found = [cache.get_raw(k) if cache else None for k in keys]
        todo = [i for i, v in enumerate(found) if v is None]
        progress.advance(bar, len(items) - len(todo))
        for start in range(0, len(todo), batch_size):  # batch_size items per call, cached as each batch ends
            chunk = todo[start:start + batch_size]
            got = scoring.batch_choice_logliks(
                loaded, [(ctxs[i], items[i].choices, task.target_delimiter) for i in chunk], batch_size)
            for i, lls in zip(chunk, got):
                found[i] = lls
                if cache:
                    cache.put_raw(keys[i], "ll", lls)
            progress.advance(bar, len(chunk))
        for it, lls in zip(items, found):
            for k, v in scoring.score_choice(lls, it.choices, it.gold).items():
                per.setdefault(k, []).append(v)
            per.setdefault("logliks", []).append(lls)
            per.setdefault("pred", []).append(max(range(len(lls)), key=lls.__getitem__))
            per.setdefault("gold", []).append(it.gold)
    elif task.kind == "generate":
        lm = task.lm_eval or {}
        params = GenParams(max_new_tokens=task.max_new_tokens, stop=list(task.stop), **lm.get("sampling", {}))
        outs = generate(loaded, [it.context for it in items], params, batch_size=batch_size, cache=cache,
                        template=None if task.template == "model" else "plain",
                        on_result=lambda i, c: progress.advance(bar))
        if task.lm_eval is None:
            per["exact_match"] = [scoring.exact_match(o.text, it.target, task.regex) for o, it in zip(outs, items)]
        else:  # lm-eval task file: each filter pipeline, then HF evaluate's exact_match with the task's options
            from .lmeval import apply_filter, exact_match

            per["by_filter"] = {name: [exact_match(apply_filter(o.text, steps), it.target, **lm["em"])
                                       for o, it in zip(outs, items)]
                               for name, steps in lm["filters"] or [("none", [])]}
            per["exact_match"] = next(iter(per["by_filter"].values()))
        per["outputs"] = [o.text for o in outs]
    elif task.kind == "loglikelihood":
        for it in items:
            ctx = wrap_context(loaded, task, it.context)
            key = Cache.key("llg", fp, ctx, task.target_delimiter + it.target)
            got = cache.get_raw(key) if cache else None
            if got is None:
                got = list(scoring.loglik_greedy(loaded, ctx, task.target_delimiter + it.target))
                if cache:
                    cache.put_raw(key, "llg", got)
            per.setdefault("loglik", []).append(got[0])
            per.setdefault("acc", []).append(float(got[1]))
            progress.advance(bar)
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


def wrap_context(loaded, task, context: str) -> str:
    """`template: model`: the whole context (description and shots included) as one user turn of the run's
    prompt template (a chat template for instruct models, as lighteval does); plain: the context as is."""
    if task.template != "model":
        return context
    from ..generate import build_prompt

    return build_prompt(loaded, context, None)


def summarize(task, per: dict, seed: int) -> dict:
    if task.kind == "perplexity":
        loss, lo, hi = bootstrap_ratio_ci(per["nll"], per["tokens"], seed=seed)
        return {"loss": [loss, lo, hi], "perplexity": [math.exp(loss), math.exp(lo), math.exp(hi)]}
    out = {}
    for m in task.metrics:
        if m == "perplexity":  # lm-eval's loglikelihood perplexity: exp(-mean log-likelihood)
            out[m] = list(bootstrap_stat(lambda ll: math.exp(-sum(ll) / len(ll)), per["loglik"], seed=seed))
        elif m == "f1":  # corpus-level macro-F1 (KoBEST's metric); CI by resampling items
            out[m] = list(bootstrap_stat(scoring.macro_f1, per["gold"], per["pred"], seed=seed))
        else:
            out[m] = list(bootstrap_ci(per[m], seed=seed))
    return out


def lm_eval_metrics(task, per: dict, items) -> dict:
    """The task's metrics as lm-eval prints them in its results JSON ("acc,none", "acc_stderr,none"): the mean and
    its standard error (sample standard deviation / sqrt(n), lm-eval's mean_stderr); N/A where lm-eval has none."""
    import statistics

    out: dict = {"alias": task.name}
    filt = "none"
    if task.kind == "perplexity":  # lm-eval's loglikelihood_rolling metrics (weighted by words / bytes)
        nll = sum(per["nll"])
        words = sum(len(re.split(r"\s+", it.response)) for it in items)
        nbytes = sum(len(it.response.encode("utf-8")) for it in items)
        out.update({"word_perplexity,none": math.exp(nll / words), "word_perplexity_stderr,none": "N/A",
                    "byte_perplexity,none": math.exp(nll / nbytes), "byte_perplexity_stderr,none": "N/A",
                    "bits_per_byte,none": nll / nbytes / math.log(2), "bits_per_byte_stderr,none": "N/A",
                    "token_perplexity,none": math.exp(nll / max(1, sum(per["tokens"]))),
                    "token_perplexity_stderr,none": "N/A"})
        return out
    if "by_filter" in per:
        for name, v in per["by_filter"].items():
            out[f"exact_match,{name}"] = sum(v) / len(v)
            out[f"exact_match_stderr,{name}"] = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else "N/A"
        return out
    for m in task.metrics:
        if m == "perplexity":
            out["perplexity,none"] = math.exp(-sum(per["loglik"]) / len(per["loglik"]))
            out["perplexity_stderr,none"] = "N/A"
            continue
        if m == "f1":
            out[f"f1,{filt}"] = scoring.macro_f1(per["gold"], per["pred"])
            out[f"f1_stderr,{filt}"] = "N/A"
            continue
        v = per[m]
        out[f"{m},{filt}"] = sum(v) / len(v)
        out[f"{m}_stderr,{filt}"] = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else "N/A"
    return out


def list_tasks() -> int:
    from .tasks import BUILTIN, bench_dir

    table = Table(title=f"built-in tasks (data: {bench_dir()}; also mmlu_<subject>[_continuation], ':val' for MMLU's "
                        f"validation split, ppl:FILE, task .yaml files)")
    for c in ("task", "n", "k", "metrics", "what it is"):
        table.add_column(c)
    for name in sorted(BUILTIN):
        try:
            t = BUILTIN[name]()
            table.add_row(name, str(len(t.items)), str(t.num_fewshot), ", ".join(t.metrics), t.about)
        except TaskError as e:
            table.add_row(name, "-", "-", "-", f"unavailable: {e}")
    console.print(table)
    return 0


def cmd_eval(args) -> int:
    from ..models import load_for_inference

    if args.list_tasks:
        return list_tasks()
    if not args.tasks or not args.models:
        raise TaskError("give one or more models and --tasks (or --list-tasks)")
    tasks = resolve_tasks(args.tasks)  # unknown names and malformed files fail before any model loads
    if args.limit is not None and (args.limit <= 0 or (args.limit > 1 and args.limit != int(args.limit))):
        raise TaskError(f"--limit must be a whole number of items or a fraction in (0, 1], got {args.limit}")
    heads = _check_heads(args.models, tasks)  # a causal LM on a classify task (or the reverse): before any load
    prepared = []
    for t in tasks:
        items = t.with_fewshot(args.fewshot, args.seed) if t.kind not in ("perplexity", "classify", "preference") \
            else t.items
        if args.limit is not None:  # lm-eval: a limit < 1.0 is a fraction of the items, rounded up
            items = items[: int(math.ceil(len(items) * args.limit)) if args.limit < 1.0 else int(args.limit)]
        prepared.append((t, items))
    cache = None if args.no_cache else Cache()
    results: dict = {"tasks": {t.name: {"kind": t.kind, "items": len(items),
                                        "fewshot": t.num_fewshot if args.fewshot is None else args.fewshot,
                                        "about": t.about, "template": t.template}
                               for t, items in prepared}, "models": {}, "diffs": {}, "lm_eval": {}}
    t0 = time.perf_counter()
    for spec in args.models:
        if heads[spec]:
            from ..methods.classify import load_head

            loaded = load_head(spec)
        else:
            loaded = load_for_inference(spec)
        results["models"][spec] = {}
        with Progress(TextColumn(f"[bold]{Path(spec).name or spec}[/bold] {{task.description}}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                      transient=True, label=f"eval {Path(spec).name or spec}", unit="items") as progress:
            for t, items in prepared:
                per = score_task(loaded, t, items, cache, args.batch_size, progress)
                results["models"][spec][t.name] = {"metrics": summarize(t, per, args.seed), "per_item": per}
                results["lm_eval"].setdefault(spec, {})[t.name] = lm_eval_metrics(t, per, items)
        del loaded
    ref = args.models[0]
    for spec in args.models[1:]:
        for t, _ in prepared:
            m = PRIMARY[t.kind]
            a = results["models"][ref][t.name]["per_item"]
            b = results["models"][spec][t.name]["per_item"]
            if t.kind == "perplexity":  # the cell's own quantity: token-weighted loss, B's minus A's
                diff = paired_ratio_diff_ci(a["nll"], a["tokens"], b["nll"], b["tokens"], seed=args.seed)
            else:
                diff = paired_diff_ci(a[m], b[m], seed=args.seed)
            results["diffs"].setdefault(spec, {})[t.name] = {"metric": m, "diff": list(diff)}
    results["seconds"] = round(time.perf_counter() - t0, 2)
    print_table(results, args.models)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
        console.print(f"results in {out / 'results.json'}")
    return 0


def _check_heads(models: list[str], tasks) -> dict:
    """{spec: 'classify' | 'reward' | None}. A classify run is scored on `kind: classify` tasks only, a reward run
    on `kind: preference` only, and those tasks need such a run: any other pairing is one line, exit 2."""
    from ..methods.classify import head_method

    heads = {spec: head_method(spec) for spec in models}
    for spec, method in heads.items():
        for t in tasks:
            need = next((m for m, k in HEAD_KINDS.items() if k == t.kind), None)
            if method is None and need is not None:
                raise TaskError(f"task {t.name} (kind: {t.kind}) scores a train.method={need} run, and {spec} is a "
                                f"causal language model; give it a {need} run folder")
            if method is not None and t.kind != HEAD_KINDS[method]:
                raise TaskError(f"{spec} is a train.method={method} run (a classification head, no text generation); "
                                f"it can be evaluated on `kind: {HEAD_KINDS[method]}` tasks only, not {t.name} "
                                f"(kind: {t.kind})")
    return heads


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
