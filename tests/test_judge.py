"""compare, blind A/B and the LLM judge (HTTP path against a local fake endpoint; local judge on the tiny model)."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunelab.cli import main
from tunelab.evaluate.judge import length_controlled

SECRET = "sk-tunelabPLANTED-judge-key"


class FakeJudge(BaseHTTPRequestHandler):
    """Prefers the longer answer, whatever its position; 'garbage'/'nonjson' modes for error paths."""

    mode = "longer"
    calls = []
    models = ["fake"]

    def log_message(self, *a):
        pass

    def _send(self, code, out: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        FakeJudge.calls.append({"get": self.path})
        if self.path.endswith("/v1/models"):
            self._send(200, json.dumps({"object": "list", "data": [{"id": m, "object": "model"}
                                                                    for m in FakeJudge.models]}).encode())
        else:
            self._send(404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.calls.append({"auth": self.headers.get("Authorization"), "body": body})
        user = body["messages"][-1]["content"]
        if FakeJudge.mode == "httperror":
            return self._send(400, json.dumps({"error": {"message": "max_tokens is too large:\n 99999 > 4096",
                                                         "type": "invalid_request_error"}}).encode())
        if FakeJudge.mode == "nonjson":
            out = b"<html>bad gateway</html>"
        else:
            if FakeJudge.mode == "garbage":
                text = "I cannot decide."
            elif "Reference answer" in user or "[The Start of Reference Answer]" in user:
                text = ref_verdict(user)
            elif "<|The Start of Assistant A's Conversation" in user:
                a, b = last_answer(user, "Assistant A"), last_answer(user, "Assistant B")
                text = "[[A]]" if len(a) > len(b) else ("[[B]]" if len(b) > len(a) else "[[C]]")
            elif "[The Start of Assistant's Answer]" in user:
                ans = user.split("[The Start of Assistant's Answer]\n")[1].split("\n[The End")[0]
                text = f"Rating: [[{min(10, 1 + len(ans) // 10)}]]"
            else:
                a = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
                b = user.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
                text = "Reasoning... [[A]]" if len(a) > len(b) else ("[[B]]" if len(b) > len(a) else "[[C]]")
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def last_answer(user: str, who: str) -> str:
    block = user.split(f"<|The Start of {who}'s Conversation with User|>")[1].split("<|The End of")[0]
    return block.split(f"### {who}:\n")[-1].strip()


def ref_verdict(user: str) -> str:
    """With a reference, prefer the answer that states it (a judge that checks correctness, not length)."""
    if "Assistant's Answer]" in user or "<|The Start of Assistant's Conversation" in user:  # single grade
        ref = (user.split("### Reference answer:\n")[-1].split("\n\n")[0] if "### Reference answer:" in user
               else user.split("[The Start of Reference Answer]\n")[1].split("\n[The End")[0])
        ans = (user.split("### Assistant:\n")[-1] if "### Assistant:" in user
               else user.split("[The Start of Assistant's Answer]\n")[1].split("\n[The End")[0])
        return "Rating: [[10]]" if ref.strip() in ans else "Rating: [[2]]"
    if "<|The Start of Reference Answer|>" in user:
        ref = user.split("<|The Start of Reference Answer|>")[1].split("<|The End of")[0].split("### Reference answer:\n")[-1]
        a, b = last_answer(user, "Assistant A"), last_answer(user, "Assistant B")
    else:
        ref = user.split("[The Start of Reference Answer]\n")[1].split("\n[The End")[0]
        a = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
        b = user.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
    ref = ref.strip()
    return "[[A]]" if ref in a and ref not in b else ("[[B]]" if ref in b and ref not in a else "[[C]]")


@pytest.fixture
def endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    FakeJudge.mode, FakeJudge.calls, FakeJudge.models = "longer", [], ["fake"]
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.fixture
def compare_dir(tmp_path):
    d = tmp_path / "cmp"
    d.mkdir()
    rows = [{"index": i, "prompt": f"q{i}", "a": "short" if i % 4 else "a much longer answer here",
             "b": "a somewhat longer answer" if i % 4 else "tiny"} for i in range(12)]
    (d / "compare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "meta.json").write_text(json.dumps({"a": "base", "b": "tuned"}))
    return d


def test_pairwise_both_orders_win_rate_and_length_control(endpoint, compare_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    assert main(["judge", str(compare_dir), "--judge-url", endpoint, "--judge-model", "fake",
                 "--api-key-env", "JUDGE_KEY"]) == 0
    r = json.loads((compare_dir / "judge_pairwise.json").read_text())
    assert (r["b_wins"], r["a_wins"], r["ties"], r["errors"]) == (9, 3, 0, 0)
    assert len(FakeJudge.calls) == 24  # both orders
    assert all(c["auth"] == f"Bearer {SECRET}" for c in FakeJudge.calls)
    assert r["consistency_rate"] == 1.0  # the length judge never flips with the order
    wr = r["b_win_rate"]
    assert wr[0] == 0.75 and wr[1] < 0.75 < wr[2]
    # the fake judge only rewards length, so length control must pull the win rate towards 50%
    assert abs(r["lc_win_rate"][0] - 0.5) < abs(wr[0] - 0.5) and r["length_coef"] > 0
    assert SECRET not in (compare_dir / "judge_pairwise.json").read_text()
    # rerun: all from the cache, no new calls
    n = len(FakeJudge.calls)
    assert main(["judge", str(compare_dir), "--judge-url", endpoint, "--api-key-env", "JUDGE_KEY",
                 "--judge-model", "fake"]) == 0
    assert len(FakeJudge.calls) == n


def test_order_flip_counts_as_tie(endpoint, compare_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    rows = [{"index": 0, "prompt": "q", "a": "same", "b": "same"}]
    (compare_dir / "compare.jsonl").write_text(json.dumps(rows[0]) + "\n")

    # a judge that always says [[A]] (position bias) must yield a tie, not a win
    from tunelab.evaluate import judge as J

    class Biased:
        identity = "biased"

        def __call__(self, system, user, attempt):
            return "[[A]]"

    r = J.judge_pairwise(Biased(), rows, J.Cache(tmp_path / "c.sqlite"), retries=0)
    assert r["items"][0]["winner"] == "tie" and r["ties"] == 1 and not r["items"][0]["consistent"]


def test_unparsable_is_retried_then_an_error_never_a_guess(endpoint, compare_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    FakeJudge.mode = "garbage"
    args = ["judge", str(compare_dir), "--judge-url", endpoint, "--judge-model", "fake", "--retries", "2", "--limit", "2"]
    assert main(args) == 1  # a run that judged nothing fails
    r = json.loads((compare_dir / "judge_pairwise.json").read_text())
    assert r["errors"] == 2 and r["judged"] == 0 and "b_win_rate" not in r
    assert len(FakeJudge.calls) == 2 * 2 * 3  # 2 items x 2 orders x (1 + 2 retries)
    assert main(args[:-4] + ["--mode", "single", "--retries", "0", "--limit", "1"]) == 1


def test_single_grades(endpoint, compare_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    assert main(["judge", str(compare_dir), "--judge-url", endpoint, "--mode", "single"]) == 0
    r = json.loads((compare_dir / "judge_single.json").read_text())
    assert r["judged"] == 12 and 1 <= r["score_a"][0] <= 10 and r["diff_b_minus_a"][0] > 0


def test_endpoint_errors_are_one_line(endpoint, compare_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    FakeJudge.mode = "nonjson"
    assert main(["judge", str(compare_dir), "--judge-url", endpoint]) == 2
    assert "did not return OpenAI chat JSON" in capsys.readouterr().err
    assert main(["judge", str(compare_dir), "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(["judge", str(compare_dir), "--judge-url", endpoint, "--api-key-env", "NOPE_UNSET_VAR"]) == 2


def test_length_control_moves_the_win_rate_only_when_lengths_differ():
    """B wins 16 of 20. With B always 50 characters longer, the win rate at equal length can't be credited to
    B in full, so the controlled rate must move towards 50%; with equal lengths it must stay at the raw 80%."""
    wins = [1] * 16 + [0] * 4
    longer = length_controlled(wins, [50] * 20)["lc_win_rate"][0]
    equal = length_controlled(wins, [0] * 20)["lc_win_rate"][0]
    assert abs(equal - 0.8) < 0.01
    assert 0.5 < longer < 0.75


def test_compare_blind_and_local_judge(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Add 1 and 2.\nAdd 3 and 4.\nAdd 5 and 6.\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_model), str(other), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "6"]) == 0
    rows = [json.loads(l) for l in (out / "compare.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and (out / "compare.md").read_text().startswith("# A vs B")
    # blind: rate two, quit, resume, rate the last; the result appears only at the end
    env = dict(__import__("os").environ, TUNELAB_CACHE=str(tmp_path / "cache"))
    r1 = subprocess.run([sys.executable, "-m", "tunelab", "blind", str(out)], input="1\nt\nq\n", text=True,
                        capture_output=True, env=env)
    assert r1.returncode == 0 and "2/3 rated" in r1.stderr and "win rate" not in r1.stderr
    assert str(tiny_model) not in r1.stderr and str(other) not in r1.stderr  # names hidden while rating
    r2 = subprocess.run([sys.executable, "-m", "tunelab", "blind", str(out)], input="2\n", text=True,
                        capture_output=True, env=env)
    assert r2.returncode == 0 and "revealed" in r2.stderr
    s = json.loads((out / "blind.json").read_text())
    assert s["n"] == 3 and s["ties"] == 1 and s["a_wins"] + s["b_wins"] == 2
    # local judge: what it records is what the judge model writes for the judge prompt, and each verdict is
    # what that text says (the tiny model babbles: an unparsable answer is an error, never a guess)
    rc = main(["judge", str(out), "--judge", str(tiny_model), "--retries", "0"])
    j = json.loads((out / "judge_pairwise.json").read_text())
    assert rc == (0 if j["judged"] else 1)  # judging nothing is a failure
    from tunelab.evaluate.judge import PAIR_RE, SYSTEM_PAIR, USER_PAIR, LocalJudge

    lj = LocalJudge(str(tiny_model))
    r0 = rows[0]
    assert j["items"][0]["raw"][0] == [lj(SYSTEM_PAIR, USER_PAIR.format(question=r0["prompt"], a=r0["a"], b=r0["b"]), 0)]
    assert j["items"][0]["raw"][1] == [lj(SYSTEM_PAIR, USER_PAIR.format(question=r0["prompt"], a=r0["b"], b=r0["a"]), 0)]
    for it in j["items"]:
        found = [PAIR_RE.findall(raw[-1]) for raw in it["raw"]]
        assert (it["winner"] == "error") == (not found[0] or not found[1])
    assert j["errors"] == sum(it["winner"] == "error" for it in j["items"])

    # a second comparison into the same folder must not inherit the first one's verdicts
    again = ["compare", str(tiny_model), str(tiny_model), "--prompts", str(prompts), "--out", str(out),
             "--max-new-tokens", "6"]
    assert main(again) == 2
    assert (out / "blind.jsonl").is_file() and (out / "judge_pairwise.json").is_file()  # refused: nothing touched
    assert main(again + ["--overwrite"]) == 0
    assert not any((out / f).exists() for f in ("blind.jsonl", "blind.json", "judge_pairwise.json"))
    assert json.loads((out / "meta.json").read_text())["b"] == str(tiny_model)
    r3 = subprocess.run([sys.executable, "-m", "tunelab", "blind", str(out)], input="q\n", text=True,
                        capture_output=True, env=env)
    assert r3.returncode == 0 and "0 already rated" in r3.stderr


def test_blind_log_torn_last_line_is_dropped_other_bad_lines_named(tmp_path):
    from tunelab.evaluate.blind import read_ratings
    from tunelab.evaluate.compare import CompareError

    log = tmp_path / "blind.jsonl"
    log.write_text('{"index": 0, "winner": "a"}\n{"index": 1, "winner": "tie"}\n{"index": 2, "win')
    assert sorted(read_ratings(log)) == [0, 1]
    assert log.read_text().endswith('"tie"}\n')  # the next verdict is appended on a clean line
    log.write_text('{"index": 0, "winner": "a"}\n{oops\n{"index": 2, "winner": "b"}\n')
    with pytest.raises(CompareError, match=r"blind.jsonl:2: malformed"):
        read_ratings(log)


def test_judge_model_defaults_to_the_served_one_and_http_errors_quote_the_server(
        endpoint, compare_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    FakeJudge.models = ["served-judge-7b"]
    assert main(["judge", str(compare_dir), "--judge-url", endpoint, "--limit", "1", "--max-tokens", "77"]) == 0
    posts = [c["body"] for c in FakeJudge.calls if "body" in c]
    assert FakeJudge.calls[0] == {"get": "/v1/models"}
    assert posts and all(b["model"] == "served-judge-7b" and b["max_tokens"] == 77 for b in posts)
    assert "served-judge-7b" in json.loads((compare_dir / "judge_pairwise.json").read_text())["judge"]
    capsys.readouterr()
    # several models: one line naming them, nothing judged
    FakeJudge.models, FakeJudge.calls = ["m-one", "m-two"], []
    assert main(["judge", str(compare_dir), "--judge-url", endpoint]) == 2
    err = capsys.readouterr().err.strip()
    assert "m-one, m-two" in err and "--judge-model" in err and len(err.splitlines()) == 1
    assert not any("body" in c for c in FakeJudge.calls)
    # the server's own error message, on one line
    FakeJudge.mode = "httperror"
    assert main(["judge", str(compare_dir), "--judge-url", endpoint, "--judge-model", "x", "--max-tokens", "99999"]) == 2
    err = capsys.readouterr().err.strip()
    assert "HTTP 400: max_tokens is too large: 99999 > 4096" in err and len(err.splitlines()) == 1


def mt_bench_rows(n: int, wrong: str):
    """Two-turn MT-Bench questions with references (the shared data, read in place): model A answers with
    the reference, model B with a longer wrong answer."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "judge" / "mt_bench" / "question.jsonl"
    if not src.is_file():
        src = Path("/work/shared/data/judge/mt_bench/question.jsonl")
    if not src.is_file():
        pytest.skip("shared MT-Bench data not present")
    qs = [json.loads(l) for l in src.read_text().splitlines() if l.strip()]
    qs = [q for q in qs if q.get("reference") and len(q["turns"]) == 2][:n]
    return [{"index": i, "prompt": q["turns"][0], "turns": q["turns"], "reference": q["reference"],
             "a": list(q["reference"]), "b": [wrong * 3 + r[::-1] for r in q["reference"]]} for i, q in enumerate(qs)]


def test_mt_bench_two_turns_with_reference_answers(endpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "mt"
    d.mkdir()
    rows = mt_bench_rows(3, "a long confident but wrong answer. ")
    (d / "compare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "meta.json").write_text(json.dumps({"a": "ref-model", "b": "long-model"}))
    assert main(["judge", str(d), "--judge-url", endpoint]) == 0
    r = json.loads((d / "judge_pairwise.json").read_text())
    # the length-loving fake would pick B; with the reference in the prompt it checks correctness and picks A
    assert (r["n"], r["a_wins"], r["b_wins"]) == (6, 6, 0) and r["consistency_rate"] == 1.0
    assert {(it["index"], it["turn"]) for it in r["items"]} == {(i, t) for i in range(3) for t in (1, 2)}
    assert all(it["reference"] for it in r["items"]) and set(r["by_turn"]) == {"1", "2"}
    users = [c["body"]["messages"][-1]["content"] for c in FakeJudge.calls if "body" in c]
    q0 = rows[0]
    turn2 = [u for u in users if q0["turns"][1] in u]
    assert len(turn2) == 2  # both orders
    for u in turn2:  # the second turn is judged with the first turn's question and answers before it
        assert u.index(q0["turns"][0]) < u.index(q0["turns"][1])
        assert q0["a"][0] in u and q0["b"][0] in u and q0["reference"][1] in u
    assert any("[The Start of Reference Answer]" in u and q0["reference"][0] in u for u in users)
    out = capsys.readouterr().err
    assert "position consistency 100.0%" in out and "turn 2:" in out
    # single grades over both turns too
    assert main(["judge", str(d), "--judge-url", endpoint, "--mode", "single"]) == 0
    s = json.loads((d / "judge_single.json").read_text())
    assert s["n"] == 6 and all(it["reference"] for it in s["items"]) and s["diff_b_minus_a"][0] < 0
    # a malformed multi-turn row is one line naming the row, before any judging
    (d / "compare.jsonl").write_text(json.dumps({**rows[0], "b": ["only one"]}) + "\n")
    FakeJudge.calls = []
    assert main(["judge", str(d), "--judge-url", endpoint, "--judge-model", "fake"]) == 2
    assert "compare row 0" in capsys.readouterr().err and FakeJudge.calls == []


def test_position_consistency_rate(tmp_path):
    from tunelab.evaluate import judge as J

    class HalfBiased:
        """Says [[A]] for every even question whatever the order (position bias); judges odd ones on content."""
        identity = "half-biased"

        def __call__(self, system, user, attempt):
            q = int(user.split("[User Question]\nq")[1].split("\n")[0])
            if q % 2 == 0:
                return "[[A]]"
            a = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
            return "[[A]]" if a == "good" else "[[B]]"

    rows = [{"index": i, "prompt": f"q{i}", "a": "bad", "b": "good"} for i in range(8)]
    r = J.judge_pairwise(HalfBiased(), rows, J.Cache(tmp_path / "c.sqlite"), retries=0)
    assert r["consistency_rate"] == 0.5 and r["b_wins"] == 4 and r["ties"] == 4


def small_compare(tmp_path, n=3):
    d = tmp_path / "blindcmp"
    d.mkdir()
    rows = [{"index": i, "prompt": f"question {i}", "a": f"answer a{i}", "b": f"answer b{i}"} for i in range(n)]
    (d / "compare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "meta.json").write_text(json.dumps({"a": "model-A-name", "b": "model-B-name"}))
    return d


def run_blind(d, keys):
    return subprocess.run([sys.executable, "-m", "tunelab", "blind", str(d)], input=keys, text=True,
                          capture_output=True, timeout=180)


def test_blind_skip_undo_and_count_left_via_pipe(tmp_path):
    d = small_compare(tmp_path)
    log = d / "blind.jsonl"
    # skip 0, rate 1, undo (1 is asked again), rate 1 differently, tie 2, then input ends
    r = run_blind(d, "s\n1\nu\n2\nt\n")
    assert r.returncode == 0, r.stderr
    assert "3 left" in r.stderr and "undone: prompt 1" in r.stderr and "1 skipped this time" in r.stderr
    recs = [json.loads(l) for l in log.read_text().splitlines()]
    assert [(x["index"], x["choice"]) for x in recs] == [(1, "2"), (2, "t")]
    # an undo in a later session takes back the last verdict on file; with nothing left to undo it says so
    r = run_blind(d, "u\nu\nu\nq\n")
    assert "undone: prompt 2" in r.stderr and "undone: prompt 1" in r.stderr and "nothing to undo" in r.stderr
    assert log.read_text() == ""
    r = run_blind(d, "1\n2\nt\n")
    assert "revealed" in r.stderr and json.loads((d / "blind.json").read_text())["n"] == 3


def _pty_blind(d, keys, until: str):
    """Drive `tunelab blind` on a pseudo-terminal: each key is written alone (no Enter) once the prompt shows."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child: the real command on the pty
        # a shell's background job (`make test &`, nohup) inherits SIGINT ignored, and Python then leaves it
        # ignored: Ctrl-C would do nothing and this test would wait for its deadline. A terminal user's shell
        # hands the command SIGINT at its default, as here.
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "tunelab", "blind", str(d)])
    out, deadline = b"", time.monotonic() + 150

    def read_until(marker: bytes, count: int):
        nonlocal out
        while out.count(marker) < count and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return
                if not chunk:
                    return
                out += chunk

    attrs_after = None
    try:
        for i, k in enumerate(keys):
            read_until(b"which is better?", i + 1)
            os.write(fd, k)
        read_until(until.encode(), 1)
        import termios

        attrs_after = termios.tcgetattr(fd)
    finally:
        for _ in range(100):  # bounded: a child still waiting for a key after the deadline is stopped
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    return out.decode("utf-8", "replace"), os.waitstatus_to_exitcode(status), attrs_after


def test_blind_one_keypress_per_rating_on_a_terminal(tmp_path):
    import termios

    d = small_compare(tmp_path)
    # three single keys, no Enter: the terminal is in cbreak mode, so each key is a rating at once
    out, rc, attrs = _pty_blind(d, [b"1", b"t", b"2"], "revealed")
    assert rc == 0 and "revealed" in out and "3 left" in out and "1 left" in out
    assert [json.loads(l)["choice"] for l in (d / "blind.jsonl").read_text().splitlines()] == ["1", "t", "2"]
    assert attrs[3] & termios.ICANON and attrs[3] & termios.ECHO  # the terminal's line mode is back


def test_blind_ctrl_c_on_a_terminal_keeps_verdicts_and_restores_the_terminal(tmp_path):
    import termios

    d = small_compare(tmp_path)
    out, rc, attrs = _pty_blind(d, [b"u", b"1", b"\x03"], "1/3 rated")
    assert rc == 0 and "1/3 rated" in out and "nothing to undo" in out
    assert len((d / "blind.jsonl").read_text().splitlines()) == 1
    assert attrs[3] & termios.ICANON and attrs[3] & termios.ECHO
