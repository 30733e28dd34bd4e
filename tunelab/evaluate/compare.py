"""`tunelab compare A B --prompts FILE`: both models answer the same prompts, side by side.

A compare folder holds compare.jsonl ({index, prompt, a, b}) and meta.json; `tunelab blind` (blind.py)
and `tunelab judge` (judge.py) add their verdicts beside them. One folder holds one comparison: writing
into a folder that already has one is refused, or with --overwrite the old verdicts are deleted first.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ..config import ConfigError
from ..data.sources import read_jsonl
from ..fsutil import atomic_write_text
from ..generate import GenParams, generate, read_prompts
from ..ui import console, show

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "examples" / "prompts_recipe.txt"


class CompareError(ConfigError):
    pass


def add_parsers(sub) -> None:
    p = sub.add_parser("compare", help="answer the same prompts with two models, side by side")
    p.add_argument("a", help="model A (e.g. the base): model spec, run folder or checkpoint")
    p.add_argument("b", help="model B (e.g. the tuned run)")
    p.add_argument("--prompts", help=f"txt/jsonl prompts (default: {DEFAULT_PROMPTS.name}, mixed Korean/English)")
    p.add_argument("--out", required=True, help="compare folder to write (compare.jsonl, compare.md)")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier comparison in --out (its blind ratings and judge results are deleted)")

    from .blind import add_parser as add_blind_parser

    add_blind_parser(sub)


def load_pairs(folder: Path) -> tuple[dict, list[dict]]:
    f = folder / "compare.jsonl"
    if not f.is_file():
        raise CompareError(f"{folder}: no compare.jsonl (write one with `tunelab compare A B --out {folder}`)")
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    rows = read_jsonl(f, CompareError)
    for r in rows:
        r.pop("__line__")
    return meta, rows


COMPARISON_FILES = ("compare.jsonl", "compare.md", "meta.json", "blind.jsonl", "blind.json")


def previous_comparison(folder: Path) -> list[str]:
    """The files of an earlier comparison in `folder` (its answers, blind ratings and judge results)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name in COMPARISON_FILES or (p.name.startswith("judge_") and p.suffix == ".json"))


def cmd_compare(args) -> int:
    from ..cache import Cache
    from ..models import load_for_inference

    prompts = read_prompts([], args.prompts or str(DEFAULT_PROMPTS))[: args.limit or None]
    out = Path(args.out)
    earlier = previous_comparison(out)
    if earlier and not args.overwrite:
        raise CompareError(f"--out {out} already holds a comparison ({', '.join(earlier)}); pick a new folder, or pass "
                           f"--overwrite to replace it (its blind ratings and judge results are deleted)")
    params = GenParams(max_new_tokens=args.max_new_tokens)
    answers = {}
    for side, spec in (("a", args.a), ("b", args.b)):
        loaded = load_for_inference(spec)
        console.print(f"[bold]{side.upper()}[/bold] = {spec} (template {loaded.template})")
        answers[side] = generate(loaded, prompts, params, batch_size=args.batch_size, cache=Cache(), progress=True)
        del loaded
    rows = [{"index": i, "prompt": p.display(), "a": answers["a"][i].text, "b": answers["b"][i].text}
            for i, p in enumerate(prompts)]  # p: the whole example; each model rendered it with its own template
    out.mkdir(parents=True, exist_ok=True)
    for name in previous_comparison(out):  # verdicts about the old answers must never meet the new ones
        (out / name).unlink()
    atomic_write_text(out / "meta.json", json.dumps({"a": args.a, "b": args.b, "params": params.key()}, indent=2))
    atomic_write_text(out / "compare.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(out / "compare.md", markdown_side_by_side(args.a, args.b, rows))
    table = Table(title=f"A = {args.a}   B = {args.b}", show_lines=True)
    for col in ("prompt", "A", "B"):
        table.add_column(col, ratio=1)
    for r in rows:
        table.add_row(r["prompt"], r["a"], r["b"])
    show(table)
    console.print(f"written {out / 'compare.jsonl'} and {out / 'compare.md'}")
    return 0


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown_side_by_side(a: str, b: str, rows: list[dict]) -> str:
    lines = [f"# A vs B\n\nA = `{a}`  \nB = `{b}`\n", "| # | prompt | A | B |", "|---|---|---|---|"]
    lines += [f"| {r['index']} | {_md_cell(r['prompt'])} | {_md_cell(r['a'])} | {_md_cell(r['b'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def cmd_blind(args) -> int:  # `tunelab blind` lives in blind.py; kept importable here for cli.py
    from .blind import cmd_blind as run

    return run(args)
