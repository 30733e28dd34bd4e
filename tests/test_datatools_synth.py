"""`tunelab data synth`: against a locally started `tunelab serve` (tiny model; the embedded model in a slow
test), and against a scripted OpenAI-compatible stub for retries, bad answers, the key and a dying teacher."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_datatools_dedup import run_cli
from tunelab.datatools.synth import parse_answer

SEEDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
         for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


@pytest.fixture
def seeds(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in SEEDS))
    return p


def serve(loaded, name):
    from tunelab.serve import Server, make_handler

    srv = Server(loaded, name, max_tokens_limit=128, max_prompt_tokens=1024, api_key=None, max_batch=8, window=0.05)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(srv))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return srv, httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    from tunelab.models import load_for_inference

    srv, httpd, url = serve(load_for_inference(str(tiny_model)), "tiny")
    yield url
    srv.engine.stopped = True
    httpd.shutdown()
    httpd.server_close()


def test_parse_answer():
    assert parse_answer('Sure! {"instruction": "Name a fruit.", "input": "", "output": "Apple."} done', "chat") == (
        {"instruction": "Name a fruit.", "input": "", "output": "Apple."}, None)
    assert parse_answer('Name a fruit.", "output": "Apple."}', "completions")[0]["output"] == "Apple."
    assert parse_answer("no json here", "chat") == (None, "invalid JSON (no object in the answer)")
    assert parse_answer('{"instruction": "x", "output": ', "chat") == (None, "invalid JSON")
    assert parse_answer('{"instruction": "x"}', "chat") == (None, "JSON without text instruction and output")


def test_synth_against_tunelab_serve_drops_invalid_json_and_resumes_from_cache(tmp_path, seeds, tiny_server):
    out = tmp_path / "synth.jsonl"
    args = ["synth", seeds, "--out", out, "--teacher", tiny_server, "--api", "completions", "-n", "5",
            "--max-tokens", "12", "--concurrency", "2"]
    r = run_cli(*args, "--max-requests", "4")
    assert r.returncode == 0, r.stderr
    prov = json.loads((tmp_path / "synth.jsonl.provenance.json").read_text())
    # the random tiny model never writes a JSON object: each answer is counted and dropped, no crash
    assert prov["requests"] == 4 and prov["answers_from_teacher"] >= 4 and prov["rows_out"] == 0
    assert sum(prov["dropped"].values()) == 4 and set(prov["dropped"]) <= {"invalid JSON", "invalid JSON (no object in the answer)"}
    assert "only 0 of 5 rows" in " ".join(r.stderr.split())
    again = run_cli(*args, "--max-requests", "6")
    assert again.returncode == 2 and "already exists" in again.stderr
    r = run_cli(*args, "--max-requests", "6", "--overwrite")  # resume: the first 4 answers are not asked again
    prov = json.loads((tmp_path / "synth.jsonl.provenance.json").read_text())
    assert r.returncode == 0 and prov["requests"] == 6 and prov["answers_from_cache"] >= 4
    assert prov["answers_from_teacher"] == 6 - prov["answers_from_cache"]


class Stub(BaseHTTPRequestHandler):
    """A scripted OpenAI-compatible teacher: 503 once, then valid rows, a non-JSON answer every 4th request,
    a duplicate of a seed now and then; after `die_after` answers it stops answering (500s)."""

    calls = 0
    die_after = 10 ** 9
    seen_auth: list = []
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with Stub.lock:
            Stub.calls += 1
            n = Stub.calls
        Stub.seen_auth.append(self.headers.get("Authorization"))
        if n == 1 or n > Stub.die_after:
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "overloaded"}}')
            return
        seed = body["seed"]
        if seed % 4 == 3:
            content = "I cannot answer in JSON, sorry."
        elif seed % 4 == 2:
            content = json.dumps(SEEDS[0])  # a seed again: dropped as similar
        else:
            content = json.dumps({"instruction": f"Write a short poem about the number {seed} and the sea.",
                                  "input": "", "output": f"The sea counts {seed} waves tonight."})
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub():
    Stub.calls, Stub.die_after, Stub.seen_auth = 0, 10 ** 9, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_synth_retries_filters_and_keeps_the_key_secret(tmp_path, seeds, stub, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-secret-123")
    out = tmp_path / "synth.jsonl"
    r = run_cli("synth", seeds, "--out", out, "--teacher", stub, "--api-key-env", "TEACHER_KEY", "-n", "4",
                "--backoff", "0.01", "--concurrency", "3", "--out-format", "chat")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["messages"][1]["role"] == "assistant" for r in rows)
    # request order, not arrival order: seeds 0, 1, 4, 5 are the kept ones (2 = a seed copy, 3 = not JSON)
    assert [r["messages"][0]["content"] for r in rows] == [
        f"Write a short poem about the number {s} and the sea." for s in (0, 1, 4, 5)]
    prov = json.loads((tmp_path / "synth.jsonl.provenance.json").read_text())
    assert prov["dropped"] == {"invalid JSON (no object in the answer)": 1, "instruction similar to a seed (>= 0.7)": 1}
    assert set(Stub.seen_auth) == {"Bearer sk-secret-123"}  # sent; and the 503 was retried
    for f in tmp_path.iterdir():
        assert "sk-secret-123" not in f.read_text()


def test_unreachable_teacher_saves_what_was_kept(tmp_path, seeds, stub):
    Stub.die_after = 4
    out = tmp_path / "synth.jsonl"
    r = run_cli("synth", seeds, "--out", out, "--teacher", stub, "-n", "10", "--retries", "2", "--backoff", "0.01",
                "--concurrency", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "unreachable after 2 retries (HTTP 503: overloaded)" in r.stderr and "2 rows kept so far saved" in r.stderr
    assert len(out.read_text().splitlines()) == 2
    assert json.loads((tmp_path / "synth.jsonl.provenance.json").read_text())["complete"] is False
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("synth", seeds, "--out", tmp_path / "o2.jsonl", "--teacher", f"http://127.0.0.1:{port}/v1",
                "--retries", "1", "--backoff", "0.01")
    assert r.returncode == 2 and "unreachable after 1 retries" in r.stderr and "nothing kept yet" in r.stderr


@pytest.mark.parametrize("args,msg", [(["--similarity", "1.5"], "--similarity must be in (0, 1]"),
                                      (["--teacher", "ftp://x"], "give an http(s):// base URL"),
                                      (["--api-key-env", "NO_SUCH_VAR_XYZ"], "empty or unset"),
                                      (["-n", "0"], "--num-rows must be >= 1")])
def test_bad_flags(tmp_path, seeds, args, msg):
    base = ["synth", seeds, "--out", tmp_path / "o.jsonl", "--teacher", "http://127.0.0.1:9/v1"]
    r = run_cli(*base, *args)
    assert r.returncode == 2 and msg in r.stderr


@pytest.mark.slow
def test_synth_with_the_embedded_model_served_locally_writes_valid_rows(tmp_path, seeds):
    """End to end: `tunelab serve` of the embedded SmolLM2 as the teacher; its rows are weak but valid."""
    from tunelab.datatools.common import load_dataset
    from tunelab.models import load_for_inference

    srv, httpd, url = serve(load_for_inference("smollm2-135m"), "smollm2-135m")
    try:
        out = tmp_path / "synth.jsonl"
        r = run_cli("synth", seeds, "--out", out, "--teacher", url, "--api", "completions", "-n", "2",
                    "--max-requests", "16", "--max-tokens", "80", "--concurrency", "4")
        assert r.returncode == 0, r.stderr
        ds = load_dataset(str(out))  # read back the way train reads it
        assert len(ds.usable) == 2
    finally:
        srv.engine.stopped = True
        httpd.shutdown()
        httpd.server_close()


def test_enough_rows_kept_while_requests_wait_in_the_queue(tmp_path, seeds, tiny_model, monkeypatch):
    """Requests still queued when the last row needed is kept are cancelled; the loop then skips them instead of
    asking a cancelled future for its result (that raised CancelledError: a traceback, no output; seen in the
    served-model test when answers came back fast). A local teacher runs one request at a time, so with
    --concurrency 4 three wait in the queue when the first answer completes the set."""
    from tunelab.datatools import synth

    def complete(self, prompt, api, max_tokens, temperature, seed):
        return json.dumps({"instruction": f"Describe a calm blue lake number {seed} in two sentences.", "input": "",
                           "output": "The lake lies still under a pale sky. Reeds lean over its quiet edge."})

    monkeypatch.setattr(synth.LocalTeacher, "complete", complete)
    out = tmp_path / "synth.jsonl"
    r = run_cli("synth", seeds, "--out", out, "--teacher", f"local:{tiny_model}", "-n", "1", "--max-requests", "8",
                "--concurrency", "4", "--api", "chat")
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 1
    prov = json.loads((tmp_path / "synth.jsonl.provenance.json").read_text())
    assert prov["complete"] is True and prov["requests"] == 1  # the first answer kept; the queued ones never asked


def test_local_teacher(tmp_path, seeds, tiny_model):
    """`--teacher local:MODEL`: tunelab's own loading, no server; the tiny model's answers are dropped, counted."""
    out = tmp_path / "synth.jsonl"
    r = run_cli("synth", seeds, "--out", out, "--teacher", f"local:{tiny_model}", "-n", "2", "--max-requests", "3",
                "--max-tokens", "8", "--api", "chat")
    assert r.returncode == 0, r.stderr
    prov = json.loads((tmp_path / "synth.jsonl.provenance.json").read_text())
    assert prov["requests"] == 3 and prov["answers_from_teacher"] == 3 and sum(prov["dropped"].values()) == 3
    assert prov["settings"]["teacher"] == f"local:{tiny_model}"
