"""Generate the demo's own instruction data: short questions with exact answers, by rule.

`make demo` fine-tunes the embedded SmolLM2-135M-Instruct on train.jsonl and scores the base and the
tuned model on test.jsonl (held out: no test question appears in the training set) with exact match,
so the effect of training is a number, not an impression. Every answer is computed here by rule, and
each question says the answer format it wants, so the base model has a fair chance too.

    python examples/demo_task/make_data.py            # rewrites train.jsonl / test.jsonl / prompts.txt
    python examples/demo_task/make_data.py --check    # exit 1 if the committed files differ from the rule

Deterministic (seeded); tests/test_demo_task.py checks the committed files against this script.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261128
N_TRAIN, N_TEST, N_PROMPTS = 2000, 200, 8

WORDS = ("apple river stone cloud green window silver garden music paper orange candle bridge forest "
         "yellow pocket rabbit summer winter valley doctor tiger planet castle butter rocket marble "
         "island jacket pencil dragon carpet basket copper meadow violet harbor lemon falcon").split()


def add(r: random.Random):
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}? Reply with the number only.", str(a + b)


def parity(r: random.Random):
    n = r.randint(100, 999)
    return f"Is {n} even or odd? Reply with one word.", "even" if n % 2 == 0 else "odd"


def larger(r: random.Random):
    a, b = r.sample(range(10, 1000), 2)
    return f"Which number is larger, {a} or {b}? Reply with the number only.", str(max(a, b))


def sequence(r: random.Random):
    a, d = r.randint(1, 99), r.randint(2, 12)
    seq = ", ".join(str(a + i * d) for i in range(4))
    return f"What number comes next: {seq}? Reply with the number only.", str(a + 4 * d)


def reverse(r: random.Random):
    ws = r.sample(WORDS, 3)
    return f"Write these three words in reverse order: {' '.join(ws)}. Reply with the words only.", " ".join(ws[::-1])


def last_word(r: random.Random):
    ws = r.sample(WORDS, 4)
    return f"What is the last word of this list: {', '.join(ws)}? Reply with the word only.", ws[-1]


SKILLS = (add, parity, larger, sequence, reverse, last_word)


def build() -> dict[str, str]:
    """File name -> content. Test questions are drawn first and never repeated in training."""
    r = random.Random(SEED)
    seen: set[str] = set()

    def draw(n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            q, a = SKILLS[len(rows) % len(SKILLS)](r)
            if q not in seen:
                seen.add(q)
                rows.append({"instruction": q, "input": "", "output": a})
        return rows

    test, train = draw(N_TEST), draw(N_TRAIN)
    r.shuffle(train)
    jsonl = lambda rows: "".join(json.dumps(x) + "\n" for x in rows)  # noqa: E731
    prompts = "".join(x["instruction"] + "\n" for x in test[:N_PROMPTS])
    return {"train.jsonl": jsonl(train), "test.jsonl": jsonl(test), "prompts.txt": prompts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    a = ap.parse_args()
    files = build()
    if a.check:
        bad = [n for n, text in files.items() if not (HERE / n).is_file() or (HERE / n).read_text() != text]
        if bad:
            print(f"{HERE}: {', '.join(bad)} differ from make_data.py; rerun it", file=sys.stderr)
            return 1
        return 0
    for name, text in files.items():
        (HERE / name).write_text(text)
    print(f"wrote {', '.join(files)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
