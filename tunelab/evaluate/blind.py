"""`tunelab blind DIR`: rate a compare folder's answers without knowing which model wrote which.

Ratings go to DIR/blind.jsonl, one line per verdict, flushed at once, so a session resumes where it
stopped; the models are revealed (and DIR/blind.json written) when every prompt is rated.
On a terminal each rating is one keypress (no Enter); from a pipe, one line per key. s skips a prompt
for this session, u takes back the last verdict (rewritten atomically) and asks that prompt again.
"""

from __future__ import annotations

import contextlib
import json
import os
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


@contextlib.contextmanager
def key_mode():
    """On a terminal, cbreak mode for the whole session (keys arrive one at a time, unechoed, and a key typed
    ahead is kept); the terminal's own mode is restored on the way out, Ctrl-C and errors included.
    cbreak, not raw: Ctrl-C still raises KeyboardInterrupt and output keeps its newline handling."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)  # TCSANOW: TCSAFLUSH would drop a key already typed
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_key(prompt: str) -> str:
    """One key: a single keypress without Enter when stdin is a terminal (inside key_mode), else one line
    (pipes, tests). End of input reads as q."""
    console.print(prompt, end="")
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.strip().lower() if line else "q"
    ch = os.read(sys.stdin.fileno(), 1).decode("utf-8", "replace")
    if ch in ("", "\x04"):  # Ctrl-D
        ch = "q"
    if ch == "\x03":
        raise KeyboardInterrupt
    console.print(ch if ch.isprintable() else "")
    return ch.lower()


def undo_last(log: Path) -> int | None:
    """Remove the last verdict from the log (atomic rewrite); its prompt index, or None when there is none."""
    if not log.is_file():
        return None
    lines = [line for _, line in jsonl_lines(log.read_text(encoding="utf-8"))]
    if not lines:
        return None
    atomic_write_text(log, "".join(line + "\n" for line in lines[:-1]))
    return int(json.loads(lines[-1])["index"])


def cmd_blind(args) -> int:
    folder = Path(args.folder)
    meta, rows = load_pairs(folder)
    by_index = {r["index"]: r for r in rows}
    log = folder / "blind.jsonl"
    done = read_ratings(log)
    queue = [r for r in rows if r["index"] not in done]
    skipped: list[dict] = []
    console.print(f"blind A/B: {len(rows)} prompts, {len(done)} already rated. Keys: 1 = first answer better, "
                  f"2 = second better, t = tie, s = skip, u = undo the last rating, q = stop (resume later).")
    try:
        with key_mode():
            while queue:
                r = queue[0]
                a_first = blind_order(args.seed, r["index"])
                first, second = (r["a"], r["b"]) if a_first else (r["b"], r["a"])
                left = len(rows) - len(done)
                console.rule(f"{len(done) + 1} / {len(rows)}  ({left} left"
                             + (f", {len(skipped)} skipped)" if skipped else ")"))
                console.print(Panel(r["prompt"], title="prompt"))
                console.print(Panel(first or "(empty)", title="answer 1"))
                console.print(Panel(second or "(empty)", title="answer 2"))
                while True:
                    choice = read_key("which is better? [1/2/t/s/u/q] ")
                    if choice in ("1", "2", "t", "s", "u", "q"):
                        break
                if choice == "q":
                    break
                if choice == "s":
                    skipped.append(queue.pop(0))
                    continue
                if choice == "u":
                    idx = undo_last(log)
                    if idx is None:
                        console.print("nothing to undo")
                        continue
                    done.pop(idx, None)
                    queue = [by_index[idx]] + [q for q in queue if q["index"] != idx]
                    skipped = [q for q in skipped if q["index"] != idx]
                    console.print(f"undone: prompt {idx} is asked again")
                    continue
                winner = "tie" if choice == "t" else ("a" if (choice == "1") == a_first else "b")
                rec = {"index": r["index"], "a_first": a_first, "choice": choice, "winner": winner}
                with log.open("a", encoding="utf-8") as f:  # opened per verdict: an undo replaces the file
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                done[r["index"]] = rec
                queue.pop(0)
    except KeyboardInterrupt:  # Ctrl-C stops like q: every verdict given is already on disk
        console.print("")
    if len(done) < len(rows):
        console.print(f"{len(done)}/{len(rows)} rated ({len(rows) - len(done)} left"
                      + (f", {len(skipped)} skipped this time" if skipped else "")
                      + f"); run `tunelab blind {folder}` again to continue. "
                        "The result is revealed when all are rated.")
        return 0
    s = blind_summary(list(done.values()))
    atomic_write_text(folder / "blind.json", json.dumps(s, indent=2))
    rate, lo, hi = s["b_win_rate"]
    console.print(f"[bold]revealed[/bold]: A = {meta.get('a', 'A')}, B = {meta.get('b', 'B')}\n"
                  f"B better {s['b_wins']}, A better {s['a_wins']}, ties {s['ties']}: "
                  f"B's win rate {100 * rate:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
    return 0
