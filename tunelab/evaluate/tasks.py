"""Benchmark tasks: built-in loaders for the formats under ../shared/data/bench, and YAML task files.

A task is a list of items. Multiple-choice items score each choice by the summed log-likelihood
of `target_delimiter + choice` after `context` (lm-evaluation-harness's convention, so numbers are
comparable); generative items compare an extracted answer with `target`; perplexity items are
(prompt, response) pairs scored with the run's template.
Prompt formats follow lm-evaluation-harness's tasks of the same name where one exists.
"""

from __future__ import annotations

import csv
import os
import random
import re
import string
from dataclasses import dataclass, field, replace
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
    response: str = ""  # perplexity: the scored text; generate: a solved example's worked answer
    description: str | None = None  # this item's description (MMLU over all subjects: its subject's)
    pool: list[Item] | None = field(default=None, repr=False)  # this item's few-shot pool (MMLU: its dev split)
    text_pair: str | None = None  # classify: an optional second text, encoded as a pair (as classify.text_pair_field)
    row: dict | None = field(default=None, repr=False)  # preference: the data row, read with the reward run's data.*


@dataclass
class Task:
    name: str
    kind: str  # multiple_choice | generate | perplexity | classify | preference (the last two: methods/classify.py)
    items: list[Item]
    fewshot_pool: list[Item] = field(default_factory=list)
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    regex: str = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: ["Question:", "\n\n"])
    template: str = "plain"  # "plain" sends the context as is; "model" wraps it in the run's prompt template
    sampler: str = "random"  # few-shot: "first_n" (lm-eval's first_n sampler) or a seeded draw per item
    shots_from_items: bool = True  # no separate few-shot split: draw shots from the scored items (never the item)
    no_shots_reason: str = ""  # why k-shot is refused when there is no pool
    num_fewshot: int = 0  # the task's default k (lm-eval's num_fewshot), used when --fewshot is not given
    metrics: list[str] = field(default_factory=list)
    about: str = ""  # one line for --list-tasks and results.json: data, split, which lm-eval task it reproduces
    lm_eval: dict | None = None  # set by lmeval.py for lm-eval task YAMLs: filters and exact_match options

    def __post_init__(self):
        if not self.metrics:
            self.metrics = {"multiple_choice": ["acc", "acc_norm"], "generate": ["exact_match"],
                            "perplexity": ["loss", "perplexity"], "classify": ["acc", "f1"],
                            "preference": ["acc"]}.get(self.kind, [])

    def with_fewshot(self, k: int | None, seed: int = 1234) -> list[Item]:
        """Items with k solved examples prepended (lm-eval's layout: description, shots joined by the few-shot
        delimiter, then the item). Shots come from the item's own pool, else the task's few-shot split, else
        (where allowed) the scored items; never the item itself. `first_n` takes the first k, as lm-eval's
        first_n sampler; otherwise a fixed seeded draw per item."""
        k = self.num_fewshot if k is None else k
        out = []
        for i, it in enumerate(self.items):
            desc = self.description if it.description is None else it.description
            if k <= 0:
                out.append(replace(it, context=desc + it.context))
                continue
            pool = it.pool if it.pool is not None else (self.fewshot_pool or (self.items if self.shots_from_items
                                                                              else []))
            if not pool:
                raise TaskError(f"task {self.name}: no few-shot examples"
                                + (f" ({self.no_shots_reason})" if self.no_shots_reason else ""))
            cands = [p for p in pool if p is not it]
            if len(cands) < k:
                raise TaskError(f"task {self.name}: {k}-shot needs {k} examples, the pool has {len(cands)}")
            shots = cands[:k] if self.sampler == "first_n" else random.Random(seed + i).sample(cands, k)
            text = self.fewshot_delimiter.join(s.context + self.target_delimiter + self._answer(s) for s in shots)
            out.append(replace(it, context=desc + text + self.fewshot_delimiter + it.context))
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
    return Task(f"arc_{split}", "multiple_choice", items,
                about=f"ARC-{split.capitalize()} test (llm-foundry copy); reproduces lm-eval arc_{split}; "
                      "few-shot examples come from the test items (no train split here), never the item itself")


MMLU_LETTERS = ["A", "B", "C", "D"]


def _mmlu_rows(path: Path) -> list[tuple[str, list[str], int]]:
    out = []
    with _need(path).open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in MMLU_LETTERS:
                raise TaskError(f"{path}:{n}: expected question,A,B,C,D,answer-letter")
            q, *opts, ans = row
            out.append((q, opts, MMLU_LETTERS.index(ans.strip())))
    return out


def _mmlu_item(q: str, opts: list[str], gold: int, cloze: bool) -> Item:
    """lm-eval's mmlu doc_to_text ("{{question.strip()}}\nA. {{choices[0]}}...\nAnswer:", choices A-D) or
    mmlu_continuation's ("Question: {{question.strip()}}\nAnswer:", the answer texts as choices)."""
    if cloze:
        return Item(f"Question: {q.strip()}\nAnswer:", list(opts), gold)
    return Item(q.strip() + "".join(f"\n{letter}. {o}" for letter, o in zip(MMLU_LETTERS, opts)) + "\nAnswer:",
                list(MMLU_LETTERS), gold)


def mmlu(subject: str | None = None, cloze: bool = False, split: str = "test") -> Task:
    """lm-eval's `mmlu` (letter) or `mmlu_continuation` (cloze): the test split, k shots = the first k of each
    subject's dev split (fewshot_config sampler first_n), the subject's description before them."""
    root = bench_dir() / "mmlu"
    suffix = "_continuation" if cloze else ""
    name = (f"mmlu_{subject}" if subject else "mmlu") + suffix + (":val" if split == "val" else "")
    if not (root / split).is_dir():
        raise TaskError(f"task {name}: MMLU {split} split not found: {root / split} (lm-eval's mmlu scores the test "
                        f"split: add test/<subject>_test.csv from hendrycks/test, or score the validation split "
                        f"with '{name}:val', whose numbers are not lm-eval's)")
    subjects = sorted(p.name[: -len(f"_{split}.csv")] for p in (root / split).glob(f"*_{split}.csv"))
    if subject is not None:
        if subject not in subjects:
            raise TaskError(f"unknown MMLU subject '{subject}' (known: {', '.join(subjects)})")
        subjects = [subject]
    items = []
    for s in subjects:
        about = "questions" if cloze else "multiple choice questions"
        desc = f"The following are {about} (with answers) about {s.replace('_', ' ')}.\n\n"
        dev = root / "dev" / f"{s}_dev.csv"
        pool = [_mmlu_item(*r, cloze) for r in _mmlu_rows(dev)] if dev.is_file() else []
        for r in _mmlu_rows(root / split / f"{s}_{split}.csv"):
            it = _mmlu_item(*r, cloze)
            it.description, it.pool = desc, pool
            items.append(it)
    lm = (f"mmlu_{subject}" if subject else "mmlu") + suffix
    return Task(name, "multiple_choice", items, sampler="first_n",
                about=f"MMLU {split} ({len(subjects)} subject{'s' if len(subjects) > 1 else ''}, "
                      f"{'cloze: answer texts' if cloze else 'letters A-D'}); shots: first k of the subject's dev; "
                      + (f"reproduces lm-eval {lm}" if split == "test" else f"lm-eval {lm}'s format on val "
                                                                             "(lm-eval scores test)"))


KOBEST_DIRS = {"boolq": "BoolQ", "copa": "COPA", "hellaswag": "HellaSwag", "sentineg": "SentiNeg", "wic": "WiC"}


def _kobest_item(name: str, r: dict) -> Item:
    """lm-eval's kobest prompts (lm_eval/tasks/kobest/*.yaml and utils.py), over KoBEST_datarepo's TSV columns."""
    if name == "boolq":  # doc_to_text "{{paragraph}} 질문: {{question}} 답변: "
        return Item(f"{r['Text']} 질문: {r['Question']} 답변: ", ["아니오", "예"], _bool(r["Answer"]))
    if name == "copa":  # f"{premise} {connector}", connector " 왜냐하면" / " 그래서" (so two spaces)
        connector = {"원인": " 왜냐하면", "결과": " 그래서"}[r["question"].strip()]
        return Item(f"{r['sentence']} {connector}", [r["1"], r["2"]], int(r["Answer"]) - 1)
    if name == "hellaswag":  # query "문장: {context}", choices ending_1..4
        return Item(f"문장: {r['context']}", [r[f"choice{i}"] for i in range(1, 5)], int(r["label"]))
    if name == "sentineg":
        return Item(f"문장: {r['Text']} 긍부정:", ["부정", "긍정"], int(r["Label"]))
    return Item(f"문장1: {r['SENTENCE1']} 문장2: {r['SENTENCE2']} 두 문장에서 {r['Target']}가 같은 뜻으로 쓰였나?",
                ["아니오", "예"], _bool(r["ANSWER"]))


def _bool(v: str) -> int:
    return int(v.strip().lower() == "true")


def kobest(name: str) -> Task:
    folder = bench_dir() / "kobest" / KOBEST_DIRS[name]
    split = "test" if (folder / "test.tsv").is_file() else "dev"
    items = [_kobest_item(name, r) for r in _read_tsv(folder / f"{split}.tsv")]
    return Task(f"kobest_{name}", "multiple_choice", items, metrics=["acc", "acc_norm", "f1"],
                about=f"KoBEST {KOBEST_DIRS[name]} {split}.tsv; lm-eval kobest_{name}'s prompts, macro-F1 (KoBEST's "
                      f"metric) beside acc" + ("" if split == "test" else "; lm-eval scores test, this folder has "
                                                                         "only dev"))


def gsm8k() -> Task:
    """lm-eval's gsm8k: "Question: ...\nAnswer:", 5 shots from the train split with their worked answers. Shots never
    come from the scored test set: without gsm8k/train.jsonl the task is 0-shot and k-shot is refused."""
    root = bench_dir() / "gsm8k"

    def items_of(path: Path) -> list[Item]:
        return [Item(f"Question: {r['question']}\nAnswer:",
                     target=r["answer"].split("####")[-1].strip().replace(",", ""), response=r["answer"])
                for r in _read_jsonl(path)]

    train = root / "train.jsonl"
    pool = items_of(train) if train.is_file() else []
    return Task("gsm8k", "generate", items_of(root / "test.jsonl"), pool, shots_from_items=False,
                num_fewshot=5 if pool else 0, no_shots_reason=f"lm-eval's gsm8k takes them from the train split; "
                f"{train} not found, and shots from the test set would leak into the scored set",
                about="GSM8K test; prompt and 5-shot default of lm-eval gsm8k (shots from train.jsonl when present, "
                      "else 0-shot); flexible numeric extraction of the last number")


BUILTIN = {
    "arc_easy": lambda: arc("easy"),
    "arc_challenge": lambda: arc("challenge"),
    "mmlu": lambda: mmlu(),
    "mmlu_continuation": lambda: mmlu(cloze=True),
    "gsm8k": gsm8k,
    **{f"kobest_{n}": (lambda n=n: kobest(n)) for n in KOBEST_DIRS},
}
TASK_FILE_KEYS = {"name", "kind", "path", "context", "choices", "gold", "target", "response", "target_delimiter",
                  "description", "regex", "max_new_tokens", "stop", "fewshot_path", "template", "text", "label",
                  "text_pair"}


def fill_template(template, row: dict, where: str):
    if isinstance(template, list):
        return [fill_template(t, row, where) for t in template]
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


TEMPLATE_FIELDS = ("context", "choices", "gold", "target", "response", "text", "label", "text_pair")


def _check_template(value, where: str, key: str) -> None:
    """Refuse what str.format would render silently wrong: a YAML mapping (an unquoted `{query}`), a Python
    expression (`{query.strip()}` renders '<built-in method strip...>'), `{{query}}` (renders a literal
    '{query}'), a conversion or format spec. tunelab's own format takes {field} and nothing else."""
    if isinstance(value, list):
        for v in value:
            _check_template(v, where, key)
        return
    if isinstance(value, dict):
        raise TaskError(f"{where}: field '{key}' is a YAML mapping ({value}); quote the template: "
                        f'{key}: "{{{next(iter(value), "field")}}}"')
    if not isinstance(value, str):
        if isinstance(value, (int, float, bool)) and key in ("gold", "target", "label"):
            return
        raise TaskError(f"{where}: field '{key}' must be a template string, got {type(value).__name__}")
    if "{{" in value or "}}" in value:
        raise TaskError(f"{where}: field '{key}' has {{{{...}}}} (Jinja2/lm-eval syntax, which this format would "
                        f"render as a literal '{{...}}'); write {{field}}, or use lm-eval's doc_to_text keys")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as e:
        raise TaskError(f"{where}: field '{key}': malformed template {value!r} ({e})") from None
    for _, name, spec, conv in parts:
        if name is not None and (not re.fullmatch(r"\w+", name) or spec or conv):
            raise TaskError(f"{where}: field '{key}': "
                            f"'{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}' "
                            f"is not a field name; this format takes {{field}} only (for expressions such as "
                            f".strip() write the task in lm-eval's format: doc_to_text is Jinja2)")


LM_EVAL_MARKERS = {"task", "dataset_path", "doc_to_text", "output_type", "doc_to_choice", "doc_to_target"}


def key_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key (the first occurrence), for file:line errors."""
    out: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"""["']?([A-Za-z_][\w-]*)["']?\s*:""", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = n
    return out


def load_task_file(path: Path, data: Path | None = None) -> Task:
    """A YAML task: kind, path (jsonl/json/csv relative to the file), and format strings over row fields.
    `data` replaces the task's own rows with another file's, built by the same templates (`tunelab data pairs`)."""
    from ..data.sources import DataError, read_rows

    text = _need(path).read_text(encoding="utf-8")
    try:
        from .lmeval import yaml_loader

        spec = yaml.load(text, Loader=yaml_loader())  # safe_load, plus lm-eval's !function tag (refused later)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise TaskError(f"{path}:{mark.line + 1 if mark else 1}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task file must be a mapping")
    lines = key_lines(text)
    if LM_EVAL_MARKERS & set(spec):
        if data is not None:
            raise TaskError(f"{path}: an lm-evaluation-harness task reads its own dataset; other rows work with "
                            "tunelab's task format (kind/path/context/target)")
        from .lmeval import load_lm_eval_task

        return load_lm_eval_task(path, spec, lines)
    for k in spec:
        if k not in TASK_FILE_KEYS:
            raise TaskError(f"{path}:{lines.get(k, 1)}: unknown key '{k}' (known: {', '.join(sorted(TASK_FILE_KEYS))})")
    kind = spec.get("kind", "multiple_choice")
    if kind not in ("multiple_choice", "generate", "perplexity", "classify", "preference"):
        raise TaskError(f"{path}:{lines.get('kind', 1)}: kind must be multiple_choice, generate, perplexity, classify "
                        f"or preference")
    # classify: text/label rows for a train.method=classify run; preference: a file of pairs in the reward
    # run's training format (its data.format/fields/template), scored chosen-above-rejected
    for k in {"multiple_choice": ("path", "context", "choices", "gold"), "generate": ("path", "context", "target"),
              "perplexity": ("path", "context", "response"), "classify": ("path", "text", "label"),
              "preference": ("path",)}[kind]:
        if k not in spec:
            raise TaskError(f"{path}: missing key '{k}' for a {kind} task")
    for k in TEMPLATE_FIELDS:
        if k in spec:
            _check_template(spec[k], f"{path}:{lines.get(k, 1)}", k)
    if kind == "perplexity" and "template" in spec:
        raise TaskError(f"{path}:{lines.get('template', 1)}: a perplexity task always scores the response after the "
                        "run's prompt template; remove 'template'")
    data = data if data is not None else path.parent / spec["path"]

    def items_of(data_path: Path) -> list[Item]:
        try:
            rows = read_rows(str(data_path))
        except DataError as e:
            raise TaskError(str(e)) from None
        out = []
        for row in rows:
            where = f"{data_path}:{row.get('__line__', '?')}"
            if kind == "preference":
                out.append(Item(where, row=row))
                continue
            if kind == "classify":
                pair = fill_template(spec["text_pair"], row, where) if "text_pair" in spec else None
                out.append(Item(str(fill_template(spec["text"], row, where)),
                                target=str(fill_template(spec["label"], row, where)).strip(),
                                text_pair=None if pair is None else str(pair)))
                continue
            ctx = fill_template(spec["context"], row, where)
            if kind == "multiple_choice":
                choices = fill_template(spec["choices"], row, where)
                gold = fill_template(spec["gold"], row, where)
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
                out.append(Item(str(ctx), target=str(fill_template(spec["target"], row, where)).strip()))
            else:
                out.append(Item(str(ctx), response=str(fill_template(spec["response"], row, where))))
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
    """A built-in name (`arc_easy`, `mmlu`, `mmlu_continuation`, `mmlu_<subject>[_continuation]`, with `:val` for
    MMLU's validation split, `kobest_copa`, `gsm8k`, ...) or a task YAML file (tunelab's or lm-eval's format)."""
    if name.endswith((".yaml", ".yml")):
        return load_task_file(Path(name))
    if name in BUILTIN:
        return BUILTIN[name]()
    base, _, split = name.partition(":")
    if base == "mmlu" or base.startswith("mmlu_"):
        if split not in ("", "val"):
            raise TaskError(f"task {name}: MMLU splits are test (the default) and val ('{base}:val')")
        cloze = base.endswith("_continuation")
        subject = base[len("mmlu_"):len(base) - len("_continuation") * cloze] if base != "mmlu" else None
        if subject == "":
            subject = None
        return mmlu(subject, cloze, split or "test")
    raise TaskError(f"unknown task '{name}' (known: {', '.join(sorted(BUILTIN))}, mmlu_<subject>, "
                    f"mmlu_<subject>_continuation, or a task .yaml file; `tunelab eval --list-tasks` lists them)")
