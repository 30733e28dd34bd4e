"""The demo's own data (examples/demo_task): reproducible from make_data.py, correct by rule, held out."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.evaluate.tasks import load_task_file

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_task"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / name).read_text().splitlines()]


def _solve(q: str) -> str:
    """An independent solver for the six question kinds (not make_data.py's code)."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\? Reply with the number only\.", q):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Is (\d+) even or odd\? Reply with one word\.", q):
        return ("even", "odd")[int(m[1]) % 2]
    if m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\? Reply with the number only\.", q):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"What number comes next: ([\d, ]+)\? Reply with the number only\.", q):
        xs = [int(x) for x in m[1].split(", ")]
        assert len({b - a for a, b in zip(xs, xs[1:])}) == 1, q
        return str(xs[-1] + xs[1] - xs[0])
    if m := re.fullmatch(r"Write these three words in reverse order: (\w+) (\w+) (\w+)\. Reply with the words only\.", q):
        return f"{m[3]} {m[2]} {m[1]}"
    if m := re.fullmatch(r"What is the last word of this list: ([\w, ]+)\? Reply with the word only\.", q):
        return m[1].split(", ")[-1]
    raise AssertionError(f"unknown question kind: {q}")


def test_committed_files_match_the_generator():
    r = subprocess.run([sys.executable, str(DEMO / "make_data.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_answers_are_right_and_test_is_held_out():
    train, test = _rows("train.jsonl"), _rows("test.jsonl")
    assert (len(train), len(test)) == (2000, 200)
    for row in train + test:
        assert row["input"] == "" and _solve(row["instruction"]) == row["output"], row
    assert not {r["instruction"] for r in test} & {r["instruction"] for r in train}
    assert len({r["instruction"] for r in train}) == len(train)
    prompts = (DEMO / "prompts.txt").read_text().splitlines()
    assert prompts == [r["instruction"] for r in test[:8]]


def test_task_file_scores_the_test_set_with_the_models_template():
    t = load_task_file(DEMO / "task.yaml")
    assert t.kind == "generate" and t.template == "model" and len(t.items) == 200
    assert [i.target for i in t.items] == [r["output"] for r in _rows("test.jsonl")]


@pytest.mark.slow
def test_demo_config_passes_preflight(capsys):
    assert main(["check", str(REPO / "configs" / "smollm2-demo.yaml")]) == 0
    err = capsys.readouterr().err
    assert "preflight passed" in err and "read 2000, kept 2000" in err
