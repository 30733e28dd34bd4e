"""Benchmark tasks: built-in loaders for the formats under ../shared/data/bench, and YAML task files.

A task is a list of items. Multiple-choice items score each choice by the summed log-likelihood
of `target_delimiter + choice` after `context` (lm-evaluation-harness's convention, so numbers are
comparable); generative items compare an extracted answer with `target`; perplexity items are
(prompt, response) pairs scored with the run's template.
Prompt formats follow lm-evaluation-harness's tasks of the same name where one exists.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError

BENCH_DIR_ENV = "TUNELAB_BENCH_DIR"


class TaskError(ConfigError):
    """A task that can't be found or read (one line, exit 2)."""


@dataclass
class Item:
    context: str = ""
    choices: list[str] = field(default_factory=list)
    gold: int = 0
    target: str = ""
    response: str = ""  # perplexity: the scored text


@dataclass
class Task:
    name: str
    kind: str  # multiple_choice | generate | perplexity
    items: list[Item]
    fewshot_pool: list[Item] = field(default_factory=list)
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    regex: str = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: ["Question:", "\n\n"])
    allow_fewshot: bool = True
    template: str = "plain"  # generate: "plain" sends the context as is; "model" wraps it in the run's template

    def with_fewshot(self, k: int, seed: int = 1234) -> list[Item]:
        """Items with k solved examples prepended, drawn with a fixed seed per item (never the item itself)."""
        if k > 0 and not self.allow_fewshot:
            raise TaskError(f"task {self.name} has no few-shot examples of its own; use its per-subject tasks")
        if k <= 0:
            return [Item(self.description + it.context, it.choices, it.gold, it.target, it.response) for it in self.items]
        out = []
        for i, it in enumerate(self.items):
            rng = random.Random(seed + i)
            pool = [p for p in (self.fewshot_pool or self.items) if p is not it]
            if len(pool) < k:
                raise TaskError(f"task {self.name}: {k}-shot needs {k} examples, the pool has {len(pool)}")
            shots = rng.sample(pool, k)
            text = self.fewshot_delimiter.join(s.context + self.target_delimiter + self._answer(s) for s in shots)
            out.append(Item(self.description + text + self.fewshot_delimiter + it.context, it.choices, it.gold,
                            it.target, it.response))
        return out

    def _answer(self, it: Item) -> str:
        """A solved example's answer: the gold choice, or for generation the full worked answer when the
        data has one (GSM8K's reasoning ending in '#### N', as lm-eval's gsm8k shows), else the target."""
        return it.choices[it.gold] if self.kind == "multiple_choice" else (it.response or it.target)


DEFAULT_BENCH_DIR = "../shared/data/bench"


def bench_dir() -> Path:
    """$TUNELAB_BENCH_DIR (relative to the current folder, as a path typed in the shell), else the default
    `../shared/data/bench` looked up beside the current folder, then beside the tunelab checkout, so
    `tunelab eval` finds it from any folder as the shipped configs find their data."""
    if os.environ.get(BENCH_DIR_ENV):
        return Path(os.environ[BENCH_DIR_ENV])
    here = Path(DEFAULT_BENCH_DIR)
    checkout = Path(__file__).resolve().parents[2] / DEFAULT_BENCH_DIR
    return here if here.exists() or not checkout.exists() else Path(os.path.normpath(checkout))


def _need(path: Path) -> Path:
    if not path.exists():
        raise TaskError(f"benchmark data not found: {path} (set {BENCH_DIR_ENV} to the folder holding arc/, mmlu/, "
                        f"kobest/, gsm8k/)")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    from ..data.sources import read_jsonl

    return read_jsonl(_need(path), TaskError)


def _read_tsv(path: Path) -> list[dict]:
    with _need(path).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def arc(split: str) -> Task:
    rows = _read_jsonl(bench_dir() / "arc" / f"arc_{split}.jsonl")
    # lm-eval arc_easy: "Question: {q}\nAnswer:" + " " + choice; the stored query already starts with "Question: ".
    items = [Item(r["query"] + "\nAnswer:", list(r["choices"]), int(r["gold"])) for r in rows]
    return Task(f"arc_{split}", "multiple_choice", items)


MMLU_LETTERS = ["A", "B", "C", "D"]


def _mmlu_rows(path: Path) -> list[Item]:
    items = []
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in MMLU_LETTERS:
                raise TaskError(f"{path}:{n}: expected question,A,B,C,D,answer-letter")
            q, *opts, ans = row
            text = q.strip() + "".join(f"\n{l}. {o}" for l, o in zip(MMLU_LETTERS, opts)) + "\nAnswer:"
            items.append(Item(text, list(MMLU_LETTERS), MMLU_LETTERS.index(ans.strip())))
    return items


def mmlu(subject: str | None = None) -> Task:
    """All subjects (0-shot) or one subject (k-shot from its dev split), as lm-eval's `mmlu` tasks."""
    root = bench_dir() / "mmlu"
    subjects = sorted(p.name[: -len("_val.csv")] for p in _need(root / "val").glob("*_val.csv"))

    def desc(s):
        return f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n"

    if subject is not None:
        if subject not in subjects:
            raise TaskError(f"unknown MMLU subject '{subject}' (known: {', '.join(subjects)})")
        return Task(f"mmlu_{subject}", "multiple_choice", _mmlu_rows(root / "val" / f"{subject}_val.csv"),
                    _mmlu_rows(root / "dev" / f"{subject}_dev.csv"), description=desc(subject))
    items = []
    for s in subjects:
        for it in _mmlu_rows(root / "val" / f"{s}_val.csv"):
            it.context = desc(s) + it.context
            items.append(it)
    return Task("mmlu", "multiple_choice", items, allow_fewshot=False)


def kobest(name: str) -> Task:
    rows = _read_tsv(bench_dir() / "kobest" / {"boolq": "BoolQ", "copa": "COPA", "hellaswag": "HellaSwag",
                                               "sentineg": "SentiNeg", "wic": "WiC"}[name] / "dev.tsv")
    items = []
    for r in rows:
        if name == "boolq":
            items.append(Item(f"{r['Text']} 질문: {r['Question']} 답변:", ["아니오", "예"],
                              int(r["Answer"].strip().lower() == "true")))
        elif name == "copa":
            connector = {"원인": " 왜냐하면", "결과": " 그래서"}[r["question"].strip()]
            items.append(Item(r["sentence"].strip().rstrip(".") + connector, [r["1"], r["2"]], int(r["Answer"]) - 1))
        elif name == "hellaswag":
            items.append(Item(r["context"], [r[f"choice{i}"] for i in range(1, 5)], int(r["label"])))
        elif name == "sentineg":
            items.append(Item(f"문장: {r['Text']} 긍부정:", ["부정", "긍정"], int(r["Label"])))
        elif name == "wic":
            items.append(Item(f"문장1: {r['SENTENCE1']} 문장2: {r['SENTENCE2']} 두 문장에서 {r['Target']}가 같은 뜻으로 "
                              f"쓰였나?", ["아니오", "예"], int(r["ANSWER"].strip().lower() == "true")))
    return Task(f"kobest_{name}", "multiple_choice", items)


def gsm8k() -> Task:
    rows = _read_jsonl(bench_dir() / "gsm8k" / "test.jsonl")
    items = [Item(f"Question: {r['question']}\nAnswer:", target=r["answer"].split("####")[-1].strip().replace(",", ""),
                  response=r["answer"]) for r in rows]
    t = Task("gsm8k", "generate", items)
    return t


BUILTIN = {
    "arc_easy": lambda: arc("easy"),
    "arc_challenge": lambda: arc("challenge"),
    "mmlu": lambda: mmlu(),
    "gsm8k": gsm8k,
    **{f"kobest_{n}": (lambda n=n: kobest(n)) for n in ("boolq", "copa", "hellaswag", "sentineg", "wic")},
}
TASK_FILE_KEYS = {"name", "kind", "path", "context", "choices", "gold", "target", "response", "target_delimiter",
                  "description", "regex", "max_new_tokens", "stop", "fewshot_path", "template"}


def _fmt(template, row: dict, where: str):
    if isinstance(template, list):
        return [_fmt(t, row, where) for t in template]
    if not isinstance(template, str):
        return template
    m = re.fullmatch(r"\{(\w+)\}", template)
    if m:  # a bare field reference keeps the field's type (a list of choices, an int gold)
        if m.group(1) not in row:
            raise TaskError(f"{where}: no field '{m.group(1)}' (has: {', '.join(row)})")
        return row[m.group(1)]
    try:
        return template.format(**row)
    except KeyError as e:
        raise TaskError(f"{where}: no field {e} (has: {', '.join(row)})") from None


def load_task_file(path: Path) -> Task:
    """A YAML task: kind, path (jsonl/json/csv relative to the file), and format strings over row fields."""
    from ..data.sources import DataError, read_rows

    text = _need(path).read_text(encoding="utf-8")
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise TaskError(f"{path}:{mark.line + 1 if mark else 1}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task file must be a mapping")
    lines = {k: n + 1 for n, line in enumerate(text.splitlines()) for k in [line.split(":")[0].strip()] if k}
    for k in spec:
        if k not in TASK_FILE_KEYS:
            raise TaskError(f"{path}:{lines.get(k, 1)}: unknown key '{k}' (known: {', '.join(sorted(TASK_FILE_KEYS))})")
    kind = spec.get("kind", "multiple_choice")
    if kind not in ("multiple_choice", "generate", "perplexity"):
        raise TaskError(f"{path}:{lines.get('kind', 1)}: kind must be multiple_choice, generate or perplexity")
    for k in {"multiple_choice": ("path", "context", "choices", "gold"), "generate": ("path", "context", "target"),
              "perplexity": ("path", "context", "response")}[kind]:
        if k not in spec:
            raise TaskError(f"{path}: missing key '{k}' for a {kind} task")
    data = path.parent / spec["path"]

    def items_of(data_path: Path) -> list[Item]:
        try:
            rows = read_rows(str(data_path))
        except DataError as e:
            raise TaskError(str(e)) from None
        out = []
        for row in rows:
            where = f"{data_path}:{row.get('__line__', '?')}"
            ctx = _fmt(spec["context"], row, where)
            if kind == "multiple_choice":
                choices = _fmt(spec["choices"], row, where)
                gold = _fmt(spec["gold"], row, where)
                if not isinstance(choices, list) or not choices:
                    raise TaskError(f"{where}: choices must be a non-empty list")
                choices = [str(c) for c in choices]
                if isinstance(gold, str) and not gold.strip().lstrip("-").isdigit():
                    if gold not in choices:
                        raise TaskError(f"{where}: gold '{gold}' is not one of the choices")
                    gold = choices.index(gold)
                gold = int(gold)
                if not 0 <= gold < len(choices):
                    raise TaskError(f"{where}: gold index {gold} out of range for {len(choices)} choices")
                out.append(Item(str(ctx), choices, gold))
            elif kind == "generate":
                out.append(Item(str(ctx), target=str(_fmt(spec["target"], row, where)).strip()))
            else:
                out.append(Item(str(ctx), response=str(_fmt(spec["response"], row, where))))
        return out

    t = Task(str(spec.get("name", path.stem)), kind, items_of(data),
             items_of(path.parent / spec["fewshot_path"]) if spec.get("fewshot_path") else [])
    if spec.get("template", "plain") not in ("plain", "model"):
        raise TaskError(f"{path}:{lines.get('template', 1)}: template must be plain (the context as is) or model "
                        "(the run's prompt template, as in `tunelab generate`)")
    for k in ("target_delimiter", "description", "regex", "max_new_tokens", "stop", "template"):
        if k in spec:
            setattr(t, k, spec[k])
    return t


def load_task(name: str) -> Task:
    """A built-in name (`arc_easy`, `mmlu`, `mmlu_<subject>`, `kobest_copa`, `gsm8k`, ...) or a YAML file."""
    if name.endswith((".yaml", ".yml")):
        return load_task_file(Path(name))
    if name in BUILTIN:
        return BUILTIN[name]()
    if name.startswith("mmlu_"):
        return mmlu(name[len("mmlu_"):])
    raise TaskError(f"unknown task '{name}' (known: {', '.join(sorted(BUILTIN))}, mmlu_<subject>, or a task .yaml file)")
