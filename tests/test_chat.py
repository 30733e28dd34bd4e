"""`tunelab chat`: driven through stdin in a subprocess, as a user (or a script) would."""

import os
import subprocess
import sys
from pathlib import Path

from tunelab.data.templates import Example
from tunelab.generate import GenParams, generate_batch
from tunelab.models import load_for_inference

REPO = Path(__file__).resolve().parents[1]


def _chat(model, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tunelab", "chat", str(model), "--max-new-tokens", "5",
                           "--stop", "\\n", *flags], input=stdin, capture_output=True, text=True, env=env,
                          timeout=300)


def test_chat_keeps_history_streams_and_resets(tiny_model):
    r = _chat(tiny_model, "Hi\nAdd 1 and 2.\n/reset\nHi\n", "--template", "chat_template")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split("\n")[:-1]  # --stop '\n': one reply per line
    assert len(replies) == 3 and "with history" in r.stderr
    assert replies[2] == replies[0]  # /reset: the same first message gives the same greedy reply
    loaded = load_for_inference(str(tiny_model), template="chat_template")
    params = GenParams(max_new_tokens=5, stop=["\n"])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": replies[0]},
               {"role": "user", "content": "Add 1 and 2."}]
    assert replies[0] == generate_batch(loaded, [Example(messages=history[:1])], params)[0].text
    assert replies[1] == generate_batch(loaded, [Example(messages=history)], params)[0].text  # the history was sent


def test_alpaca_chat_is_single_shot_and_says_so(tiny_model):
    r = _chat(tiny_model, "Add 1 and 2.\nHi\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    assert "answered on its own (no history" in r.stderr
    replies = r.stdout.split("\n")[:-1]
    loaded = load_for_inference(str(tiny_model))
    params = GenParams(max_new_tokens=5, stop=["\n"])
    assert replies == [generate_batch(loaded, [p], params)[0].text for p in ("Add 1 and 2.", "Hi")]


def test_a_message_longer_than_the_window_is_an_error_line_and_the_chat_goes_on(tiny_model):
    long = " ".join(["the capital city of the country"] * 120)
    r = _chat(tiny_model, f"{long}\nHi\n", "--template", "chat_template")
    assert r.returncode == 0 and "context window of 512 tokens" in r.stderr
    assert len(r.stdout.split("\n")[:-1]) == 2  # an empty line for the refused message, then the reply to Hi
