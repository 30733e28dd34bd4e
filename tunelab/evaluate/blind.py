"""`tunelab blind DIR`: rate a compare folder's answers without knowing which model wrote which.

Ratings go to DIR/blind.jsonl, one line per verdict, flushed at once, so a session resumes where it
stopped; the models are revealed (and DIR/blind.json written) when every prompt is rated.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from rich.panel import Panel

from ..data.sources import jsonl_lines
from ..fsutil import atomic_write_text
from ..ui import console
from .compare import CompareError, load_pairs
from .stats import win_rate


def add_parser(sub) -> None:
    p = sub.add_parser("blind", help="interactive blind A/B rating of a compare folder (resumable)")
    p.add_argument("folder", help="a folder written by `tunelab compare`")
    p.add_argument("--seed", type=int, default=0, help="seed of the left/right shuffle")


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
    lines = list(jsonl_lines(log.read_text(encoding="utf-8")))
    done = {}
    for i, (n, line) in enumerate(lines):
        try:
            r = json.loads(line)
            done[int(r["index"])] = r
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if i < len(lines) - 1:
                raise CompareError(f"{log}:{n}: malformed rating line; fix or delete it to continue") from None
            atomic_write_text(log, "".join(line + "\n" for _, line in lines[:-1]))  # drop the torn last line
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
