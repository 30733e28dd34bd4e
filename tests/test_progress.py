"""Issue 18.5: long commands print progress lines (done/total, rate, ETA) when stderr is not a terminal;
result tables go to stdout, logs to stderr, and log lines are not wrapped at 80 columns."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, *args: str) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNELAB_PROGRESS_EVERY="0", TUNELAB_CACHE=str(tmp_path / "cache"))
    with (tmp_path / "err.log").open("w") as err, (tmp_path / "out.txt").open("w") as out:
        rc = subprocess.run([sys.executable, "-m", "tunelab", *args], stdout=out, stderr=err, env=env,
                            timeout=300).returncode
    e, o = (tmp_path / "err.log").read_text(), (tmp_path / "out.txt").read_text()
    assert rc == 0, e
    return o, e


def test_generate_and_eval_print_progress_lines_into_a_log(tmp_path, tiny_model, alpaca_file):
    out, err = _run(tmp_path, "generate", str(tiny_model), "-p", "Hi", "-p", "Add 1 and 2.", "-p", "x",
                    "--batch-size", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "g.jsonl"))
    lines = [l for l in err.splitlines() if l.startswith("generate: ")]
    assert re.fullmatch(r"generate: 1/3 \(33%\), [\d.]+ prompts/s, elapsed 0:00:\d\d, eta \d+:\d\d:\d\d", lines[0])
    assert lines[-1].startswith("generate: 3/3 (100%)") and lines[-1].endswith("done")
    out, err = _run(tmp_path, "eval", str(tiny_model), "--tasks", f"ppl:{alpaca_file}")
    assert re.search(r"^eval model ppl:\S*: \d+/40 \(\d+%\), [\d.]+ items/s, elapsed .*, eta ", err, re.M)
    assert "40/40 (100%)" in err
    assert "perplexity" in out and "perplexity" not in err  # the results table is stdout's


def test_train_progress_lines_and_unwrapped_logs(tmp_path, tiny_config):
    out, err = _run(tmp_path, "train", str(tiny_config), "--output", str(tmp_path / "run"),
                    "--set", f"data.system_prompt={'a long system prompt ' * 8}")
    assert re.search(r"^train: 2/4 \(50%\), [\d.]+ steps/s, elapsed .*, eta ", err, re.M)
    assert re.search(r"^train: 4/4 \(100%\), .*done$", err, re.M)
    warning = [l for l in err.splitlines() if "system_prompt" in l]
    assert warning and max(len(l) for l in warning) > 100  # one line, not cut at 80 columns
