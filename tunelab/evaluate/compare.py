"""`tunelab compare A B --prompts FILE`: both models answer the same prompts, side by side,
and `tunelab blind DIR`: rate those answers without knowing which model wrote which.

A compare folder holds compare.jsonl ({index, prompt, a, b}) and meta.json; blind ratings go to
blind.jsonl (one line per verdict, flushed at once, so a session resumes where it stopped).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from rich.panel import Panel
from rich.table import Table

from ..config import ConfigError
from ..fsutil import atomic_write_text
from ..generate import GenParams, generate, read_prompts
from ..ui import console, show
from .stats import win_rate

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

    p = sub.add_parser("blind", help="interactive blind A/B rating of a compare folder (resumable)")
    p.add_argument("folder", help="a folder written by `tunelab compare`")
    p.add_argument("--seed", type=int, default=0, help="seed of the left/right shuffle")


def load_pairs(folder: Path) -> tuple[dict, list[dict]]:
    f = folder / "compare.jsonl"
    if not f.is_file():
        raise CompareError(f"{folder}: no compare.jsonl (write one with `tunelab compare A B --out {folder}`)")
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    rows = []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CompareError(f"{f}:{n}: malformed JSON ({e.msg})") from None
    return meta, rows


def cmd_compare(args) -> int:
    from ..cache import Cache
    from ..models import load_for_inference

    prompts = read_prompts([], args.prompts or str(DEFAULT_PROMPTS))[: args.limit or None]
    out = Path(args.out)
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


def blind_order(seed: int, index: int) -> bool:
    """True when A is shown first for this item (a fixed coin per item, so resuming shows the same layout)."""
    return random.Random(f"{seed}:{index}").random() < 0.5


def blind_summary(ratings: list[dict]) -> dict:
    """B's win rate over A: 1 = B better, 0 = A better, 0.5 = tie."""
    outcomes = [{"b": 1.0, "a": 0.0, "tie": 0.5}[r["winner"]] for r in ratings]
    rate, lo, hi = win_rate(outcomes) if outcomes else (float("nan"),) * 3
    return {"n": len(outcomes), "b_wins": sum(o == 1.0 for o in outcomes), "a_wins": sum(o == 0.0 for o in outcomes),
            "ties": sum(o == 0.5 for o in outcomes), "b_win_rate": [rate, lo, hi]}


def read_ratings(log: Path) -> dict[int, dict]:
    """The verdicts so far. A last line cut short by a crash is dropped (that prompt is asked again);
    a malformed line elsewhere is an error naming file:line."""
    if not log.is_file():
        return {}
    lines = log.read_text(encoding="utf-8").splitlines()
    done = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            done[int(r["index"])] = r
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if n < len(lines):
                raise CompareError(f"{log}:{n}: malformed rating line; fix or delete it to continue") from None
            atomic_write_text(log, "".join(l + "\n" for l in lines[:-1]))  # drop the torn last line
    return done


def cmd_blind(args) -> int:
    folder = Path(args.folder)
    meta, rows = load_pairs(folder)
    log = folder / "blind.jsonl"
    done = read_ratings(log)
    todo = [r for r in rows if r["index"] not in done]
    console.print(f"blind A/B: {len(rows)} prompts, {len(done)} already rated. Keys: 1 = first answer better, "
                  f"2 = second better, t = tie, q = stop (resume later).")
    with log.open("a", encoding="utf-8") as f:
        for r in todo:
            a_first = blind_order(args.seed, r["index"])
            first, second = (r["a"], r["b"]) if a_first else (r["b"], r["a"])
            console.rule(f"{len(done) + 1} / {len(rows)}")
            console.print(Panel(r["prompt"], title="prompt"))
            console.print(Panel(first or "(empty)", title="answer 1"))
            console.print(Panel(second or "(empty)", title="answer 2"))
            while True:
                console.print("which is better? [1/2/t/q] ", end="")
                line = sys.stdin.readline()
                if not line:  # end of input: stop like q
                    line = "q"
                choice = line.strip().lower()
                if choice in ("1", "2", "t", "q"):
                    break
            if choice == "q":
                break
            winner = "tie" if choice == "t" else ("a" if (choice == "1") == a_first else "b")
            rec = {"index": r["index"], "a_first": a_first, "choice": choice, "winner": winner}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[r["index"]] = rec
    if len(done) < len(rows):
        console.print(f"{len(done)}/{len(rows)} rated; run `tunelab blind {folder}` again to continue. "
                      f"The result is revealed when all are rated.")
        return 0
    s = blind_summary(list(done.values()))
    atomic_write_text(folder / "blind.json", json.dumps(s, indent=2))
    rate, lo, hi = s["b_win_rate"]
    console.print(f"[bold]revealed[/bold]: A = {meta.get('a', 'A')}, B = {meta.get('b', 'B')}\n"
                  f"B better {s['b_wins']}, A better {s['a_wins']}, ties {s['ties']}: "
                  f"B's win rate {100 * rate:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
    return 0
