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

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.calls.append({"auth": self.headers.get("Authorization"), "body": body})
        user = body["messages"][-1]["content"]
        if FakeJudge.mode == "nonjson":
            out = b"<html>bad gateway</html>"
        else:
            if FakeJudge.mode == "garbage":
                text = "I cannot decide."
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


@pytest.fixture
def endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    FakeJudge.mode, FakeJudge.calls = "longer", []
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
    assert main(["judge", str(compare_dir), "--judge-url", endpoint, "--retries", "2", "--limit", "2"]) == 0
    r = json.loads((compare_dir / "judge_pairwise.json").read_text())
    assert r["errors"] == 2 and r["judged"] == 0 and "b_win_rate" not in r
    assert len(FakeJudge.calls) == 2 * 2 * 3  # 2 items x 2 orders x (1 + 2 retries)


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
    assert main(["judge", str(out), "--judge", str(tiny_model), "--retries", "0"]) == 0
    j = json.loads((out / "judge_pairwise.json").read_text())
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
