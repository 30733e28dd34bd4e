"""`tunelab data decontaminate`: which training rows hold benchmark items, by long n-gram overlap.

The method of the GPT-3 paper (appendix C) and lm-evaluation-harness's decontamination: text is
lower-cased and split into words (punctuation dropped; each Han/Kana character is a word), and a
training row is contaminated by a benchmark item when they share an n-gram of `--ngram` words
(13 by default). An item shorter than that is matched whole, as one n-gram of its own length, when
it has at least `--min-ngram` words (GPT-3 used a shorter n for short items too); shorter items are
not checked and are counted as such. N-grams shared by more than BOILERPLATE_ITEMS items of the
benchmarks are template text (answer formats, instructions), not any one item's content, and are
ignored.

Benchmark items are read with tunelab.evaluate.tasks (the same items `tunelab eval` scores): the
question plus the gold answer (the gold choice, or GSM8K's worked answer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..data.sources import READERS
from .common import (
    Provenance,
    add_input_args,
    add_output_args,
    check_inputs_not_outputs,
    example_text,
    guard_outputs,
    load_from_args,
    progress,
    sidecar,
    words,
    write_json,
    write_rows_with_provenance,
)

BOILERPLATE_ITEMS = 10
GROUPS = {
    "arc": ["arc_easy", "arc_challenge"],
    "kobest": [f"kobest_{n}" for n in ("boolq", "copa", "hellaswag", "sentineg", "wic")],
}
_MMLU_DESC = re.compile(r"^The following are multiple choice questions \(with answers\) about [^\n]*\.\n\n")


@dataclass
class BenchItem:
    task: str
    index: int
    """0-based position in the task (the order `tunelab eval` scores it in)."""
    text: str


def _item_text(task, item) -> str:
    ctx = _MMLU_DESC.sub("", item.context)
    ctx = re.sub(r"^Question:\s*", "", ctx)
    ctx = re.sub(r"\n?Answer:\s*$", "", ctx)
    if task.kind == "multiple_choice":
        gold = item.choices[item.gold] if 0 <= item.gold < len(item.choices) else ""
        # MMLU's choices are the letters A-D, its options already in the context
        return ctx if len(gold) <= 1 else f"{ctx}\n{gold}"
    if task.kind == "generate":
        return f"{ctx}\n{item.response or item.target}"
    return f"{ctx}\n{item.response}"


def load_bench_items(spec: str | list[str]) -> tuple[list[BenchItem], list[str]]:
    """Items of every task named: built-in names (arc, arc_easy, mmlu, mmlu_<subject>, gsm8k, kobest,
    kobest_copa, ...), task YAML files, or data files (every text field of each row is the item)."""
    from ..evaluate.tasks import TaskError, load_task

    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ConfigError("--against is empty (name tasks such as arc,mmlu,gsm8k, task .yaml files or data files)")
    items: list[BenchItem] = []
    sources: list[str] = []
    for name in names:
        for sub in GROUPS.get(name, [name]):
            p = Path(sub)
            if p.suffix.lower() in READERS or (p.is_dir() and p.suffix.lower() not in (".yaml", ".yml")):
                from ..data.sources import read_rows

                rows = read_rows(sub)
                sources.append(sub)
                for i, row in enumerate(rows):
                    parts = [v for k, v in row.items() if k != "__line__" and isinstance(v, str)]
                    parts += [x for v in row.values() if isinstance(v, list) for x in v if isinstance(x, str)]
                    items.append(BenchItem(p.name, i, "\n".join(parts)))
                continue
            try:
                task = load_task(sub)
            except TaskError:
                raise
            except (OSError, ValueError) as e:
                raise ConfigError(f"--against {sub}: {e}") from None
            if p.suffix.lower() in (".yaml", ".yml"):
                sources.append(sub)
            items.extend(BenchItem(task.name, i, _item_text(task, it)) for i, it in enumerate(task.items))
    return items, sources


@dataclass
class Match:
    item: int
    """Index into the index's items."""
    shared: int
    """Distinct n-grams the row and the item share."""
    ngram: str
    """The first shared n-gram, as text."""


@dataclass
class NgramIndex:
    items: list[BenchItem]
    n: int = 13
    min_n: int = 8
    grams: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    """n-gram length -> n-gram text -> item indices."""
    item_grams: list[int] = field(default_factory=list)
    too_short: list[int] = field(default_factory=list)
    ignored_boilerplate: int = 0

    def __post_init__(self):
        for idx, it in enumerate(self.items):
            w = words(it.text)
            if len(w) >= self.n:
                size, gs = self.n, {" ".join(w[i:i + self.n]) for i in range(len(w) - self.n + 1)}
            elif len(w) >= self.min_n:
                size, gs = len(w), {" ".join(w)}
            else:
                self.too_short.append(idx)
                self.item_grams.append(0)
                continue
            self.item_grams.append(len(gs))
            table = self.grams.setdefault(size, {})
            for g in gs:
                table.setdefault(g, []).append(idx)
        for table in self.grams.values():
            for g in [g for g, ids in table.items() if len(ids) > BOILERPLATE_ITEMS]:
                del table[g]
                self.ignored_boilerplate += 1

    def matches(self, text: str) -> list[Match]:
        w = words(text)
        found: dict[int, Match] = {}
        for size, table in self.grams.items():
            seen = set()
            for i in range(len(w) - size + 1):
                g = " ".join(w[i:i + size])
                if g in seen:
                    continue
                seen.add(g)
                for idx in table.get(g, ()):
                    m = found.get(idx)
                    if m is None:
                        found[idx] = Match(idx, 1, g)
                    else:
                        m.shared += 1
        return sorted(found.values(), key=lambda m: (-m.shared, m.item))


def find_contamination(texts: list[str | None], index: NgramIndex, on_row=None) -> dict[int, list[Match]]:
    """Row index -> its matches, for the rows that share an n-gram with an item."""
    out = {}
    for i, t in enumerate(texts):
        if on_row:
            on_row()
        if t:
            m = index.matches(t)
            if m:
                out[i] = m
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("decontaminate", help="find training rows that contain benchmark items (13-gram overlap)")
    add_input_args(p)
    p.add_argument("--against", "-a", required=True, action="append",
                   help="tasks: arc, arc_easy, arc_challenge, mmlu, mmlu_<subject>, gsm8k, kobest, kobest_<task>, "
                        "a task .yaml file or a data file; comma-separated or repeated")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length in words (default 13, as GPT-3/lm-eval)")
    p.add_argument("--min-ngram", type=int, default=8,
                   help="items shorter than --ngram are matched whole if they have at least this many words")
    add_output_args(p, required=False)
    p.add_argument("--report", help="write the report (every contaminated row with its items) to this JSON file "
                                    "(default with --out: OUT.contamination.json)")
    p.add_argument("--show", type=int, default=20, help="contaminated rows to print")


def cmd_decontaminate(args) -> int:
    from rich.table import Table

    from ..ui import console

    if args.ngram < 1 or not 1 <= args.min_ngram <= args.ngram:
        raise ConfigError(f"need 1 <= --min-ngram <= --ngram, got --ngram {args.ngram} --min-ngram {args.min_ngram}")
    out = Path(args.out) if args.out else None
    report_path = Path(args.report) if args.report else (sidecar(out, "contamination") if out else None)
    outputs = ([out, sidecar(out, "provenance")] if out else []) + ([report_path] if report_path else [])
    guard_outputs(outputs, args.overwrite)
    if out:
        check_inputs_not_outputs([args.input], out)
    items, task_files = load_bench_items([n for a in args.against for n in a.split(",")])
    ds = load_from_args(args)
    index = NgramIndex(items, args.ngram, args.min_ngram)
    texts = [example_text(r.example) if r.example else None for r in ds.rows]
    with progress() as bar:
        task = bar.add_task("decontaminate", total=len(texts))
        found = find_contamination(texts, index, on_row=lambda: bar.advance(task))

    per_task: dict[str, int] = {}
    rows_report = []
    for i, ms in found.items():
        tasks = sorted({items[m.item].task for m in ms})
        for t in tasks:
            per_task[t] = per_task.get(t, 0) + 1
        rows_report.append({"where": ds.rows[i].where, "text": texts[i][:300], "matches": [
            {"task": items[m.item].task, "item": items[m.item].index, "shared_ngrams": m.shared,
             "item_ngrams": index.item_grams[m.item], "ngram": m.ngram, "item_text": items[m.item].text[:300]}
            for m in ms[:5]]})
    summary = {"rows": len(ds.rows), "contaminated_rows": len(found), "per_task": per_task,
               "items": len(items), "items_too_short": len(index.too_short),
               "boilerplate_ngrams_ignored": index.ignored_boilerplate, "ngram": args.ngram,
               "min_ngram": args.min_ngram, "against": args.against}
    if report_path:
        write_json(report_path, {**summary, "input": args.input, "contaminated": rows_report})
    if out:
        prov = Provenance("decontaminate", [args.input] + task_files, rows_in=len(ds.rows),
                          settings={"format": ds.format, "fields": ds.fields, "against": args.against,
                                    "ngram": args.ngram, "min_ngram": args.min_ngram})
        if found:
            prov.drop(f"shares a {args.ngram}-gram with a benchmark item", len(found))
        prov.extra["per_task"] = per_task
        write_rows_with_provenance(out, [r.raw for i, r in enumerate(ds.rows) if i not in found], prov)

    if found:
        t = Table(title=f"contaminated rows of {args.input} (first {min(args.show, len(found))})", title_justify="left")
        for col in ("row", "task:item", "shared", "matching n-gram"):
            t.add_column(col, overflow="fold")
        for r in rows_report[: args.show]:
            m = r["matches"][0]
            t.add_row(r["where"], f"{m['task']}:{m['item']}", f"{m['shared_ngrams']}/{m['item_ngrams']}", m["ngram"])
        console.print(t)
    by_task = ", ".join(f"{k} {v}" for k, v in sorted(per_task.items())) or "none"
    console.print(f"decontaminate {args.input}: {len(found)} of {len(ds.rows)} rows share a {args.ngram}-gram with "
                  f"{len(items)} benchmark items ({by_task}); {len(index.too_short)} items under "
                  f"{args.min_ngram} words not checked")
    if report_path:
        console.print(f"  report: {report_path}")
    if out:
        console.print(f"  clean data: {out} ({len(ds.rows) - len(found)} rows)")
    return 0


def overlap_warning(cfg, base: Path | None) -> str | None:
    """For `tunelab check`: a one-line warning when the run's training data overlaps its eval.tasks."""
    tasks = list(getattr(cfg.eval, "tasks", None) or [])
    if not tasks:
        return None
    from .common import load_dataset
    from .mix import source_config

    items, _ = load_bench_items(tasks)
    rows = []
    for d in [source_config(cfg.data, s) for s in cfg.data.sources] or [cfg.data]:
        rows += load_dataset(d.path, d.format, d.fields, d.split, base).rows
    found = find_contamination([example_text(r.example) if r.example else None for r in rows], NgramIndex(items))
    if not found:
        return None
    i, ms = next(iter(found.items()))
    per = {}
    for ms_ in found.values():
        for t in {items[m.item].task for m in ms_}:
            per[t] = per.get(t, 0) + 1
    it = items[ms[0].item]
    return (f"training data overlaps eval.tasks: {len(found)} rows share a 13-gram with benchmark items "
            f"({', '.join(f'{k} {v}' for k, v in sorted(per.items()))}), e.g. {rows[i].where} ~ {it.task} item "
            f"{it.index}; scores on those tasks may be inflated. See: tunelab data decontaminate "
            f"{cfg.data.path or 'FILE'} --against {','.join(tasks)}")
