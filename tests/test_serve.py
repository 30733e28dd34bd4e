"""The OpenAI-compatible server, driven by the official openai client on 127.0.0.1."""

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer

import pytest

from tunelab.generate import GenParams, generate_batch
from tunelab.models import load_for_inference
from tunelab.serve import Server, make_handler


@pytest.fixture(scope="module")
def server(tiny_model):
    loaded = load_for_inference(str(tiny_model))
    srv = Server(loaded, "tiny", max_tokens_limit=64, max_prompt_tokens=200, api_key=None, max_batch=8, window=0.05)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(srv))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{httpd.server_address[1]}", loaded
    srv.engine.stopped = True
    httpd.shutdown()
    httpd.server_close()


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_and_completion_matches_generate(server):
    srv, url, loaded = server
    c = _client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    r = c.completions.create(model="tiny", prompt="Question: Add 1 and 2.\nAnswer:", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 8
    # greedy server output == tunelab generate's on the same raw prompt
    ref = generate_batch(loaded, ["Question: Add 1 and 2.\nAnswer:"], GenParams(max_new_tokens=8), template="plain")[0]
    assert r.choices[0].text == ref.text


def test_chat_uses_the_run_template_and_streams(server):
    srv, url, loaded = server
    c = _client(url)
    full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Add 2 and 2."}],
                                     max_tokens=6, temperature=0)
    ref = generate_batch(loaded, ["Add 2 and 2."], GenParams(max_new_tokens=6))[0]  # alpaca template
    assert full.choices[0].message.content == ref.text
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Add 2 and 2."}],
                                            max_tokens=6, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == ref.text and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_are_batched_and_correct(server):
    srv, url, loaded = server
    c = _client(url)
    prompts = [f"Question: Add {i} and {i}.\nAnswer:" for i in range(8)]
    before = srv.engine.batches
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0)
                             .choices[0].text, prompts))
    refs = [generate_batch(loaded, [p], GenParams(max_new_tokens=6), template="plain")[0].text for p in prompts]
    assert outs == refs
    assert srv.engine.batches - before < 8  # at least two requests shared a batch


def _post(url, path, body: bytes):
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path,body,status,text", [
    ("/v1/completions", b"{not json", 400, "malformed JSON"),
    ("/v1/completions", b'{"model": "gpt-9", "prompt": "hi"}', 404, "does not exist"),
    ("/v1/completions", json.dumps({"prompt": "word " * 400}).encode(), 400, "at most 200"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -5}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 100000}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    ("/v1/nothing", b"{}", 404, "unknown path"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, text):
    _, url, _ = server
    code, obj = _post(url, path, body)
    assert code == status and text in obj["error"]["message"] and obj["error"]["type"]


def test_openai_client_raises_on_unknown_model(server):
    import openai

    _, url, _ = server
    with pytest.raises(openai.NotFoundError):
        _client(url).completions.create(model="nope", prompt="hi", max_tokens=2)


# ---- issue 11.13: the chat endpoint renders the whole conversation with the one template ----------


@pytest.fixture(scope="module")
def chat_server(tiny_model):
    loaded = load_for_inference(str(tiny_model), template="chat_template")
    srv = Server(loaded, "tiny-chat", max_tokens_limit=64, max_prompt_tokens=400, api_key=None, max_batch=8,
                 window=0.02)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(srv))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{httpd.server_address[1]}", loaded
    srv.engine.stopped = True
    httpd.shutdown()
    httpd.server_close()


def test_chat_template_server_renders_system_and_every_turn(chat_server):
    from tunelab.data.templates import encode_prompt

    _, url, loaded = chat_server
    c = _client(url)
    user = [{"role": "user", "content": "Add 2 and 2."}]
    system = [{"role": "system", "content": "You are a careful calculator."}]
    turns = [{"role": "user", "content": "Add 1 and 1."}, {"role": "assistant", "content": "The answer is 2."}]
    usage = {}
    for name, msgs in (("user", user), ("system", system + user), ("turns", system + turns + user)):
        r = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=2, temperature=0)
        want = encode_prompt(loaded.tokenizer, loaded.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True))
        assert r.usage.prompt_tokens == len(want), name
        usage[name] = r.usage.prompt_tokens
    assert usage["user"] < usage["system"] < usage["turns"]


def test_chat_adds_the_run_system_prompt_unless_the_request_has_one(chat_server):
    from types import SimpleNamespace

    _, _, loaded = chat_server
    tok = loaded.tokenizer
    run = SimpleNamespace(loaded=SimpleNamespace(tokenizer=tok, template="chat_template", system_prompt="Be brief."))
    user = [{"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "Be long."}] + user
    assert "Be brief." in tok.decode(Server.chat_prompt(run, {"messages": user}))
    text = tok.decode(Server.chat_prompt(run, {"messages": own}))
    assert "Be long." in text and "Be brief." not in text


@pytest.mark.parametrize("messages,text", [
    ([{"role": "system", "content": "Judge fairly."}, {"role": "user", "content": "hi"}],
     "no place for a system message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "not a conversation of 3 turns"),
])
def test_alpaca_server_refuses_what_its_template_cannot_show(server, messages, text):
    _, url, _ = server
    code, obj = _post(url, "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 2}).encode())
    assert code == 400 and text in obj["error"]["message"] and "alpaca template" in obj["error"]["message"]


def test_a_bare_model_with_a_chat_template_is_served_with_it(tiny_model, tmp_path):
    from types import SimpleNamespace

    from tunelab.serve import serve_template

    chat, none = SimpleNamespace(chat_template="{{x}}"), SimpleNamespace(chat_template=None)
    assert serve_template(str(tiny_model), None, chat) == "chat_template"
    assert serve_template(str(tiny_model), None, none) is None  # loading's default (alpaca) stays
    assert serve_template(str(tiny_model), "alpaca", chat) == "alpaca"
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {template: alpaca}\n")
    (run / "final" / "adapter_config.json").write_text("{}")
    assert serve_template(str(run), None, chat) is None  # a run keeps the template it trained with


def test_decoding_does_not_read_the_deprecated_past_key_values(server, monkeypatch):
    from transformers.utils.generic import ModelOutput

    def deprecated(self):
        raise AssertionError("past_key_values read")

    monkeypatch.setattr(ModelOutput, "past_key_values", property(deprecated))
    _, url, _ = server
    code, obj = _post(url, "/v1/completions", json.dumps({"prompt": "Add 1 and 2.", "max_tokens": 3}).encode())
    assert code == 200 and obj["usage"]["completion_tokens"] >= 1


# ---- issue 17.6: stop strings as generate, honest OpenAI compatibility, the vLLM hand-off ---------------


def test_stop_strings_behave_as_generate(server):
    _, url, loaded = server
    c = _client(url)
    prompt = "Question: Add 3 and 4.\nAnswer:"
    text = generate_batch(loaded, [prompt], GenParams(max_new_tokens=24), template="plain")[0].text
    assert len(text) > 14
    for stop in (text[1:7], text[2:5], text[3:13], [text[5:9], text[1:12]]):
        stops = stop if isinstance(stop, list) else [stop]
        ref = generate_batch(loaded, [prompt], GenParams(max_new_tokens=24, stop=stops), template="plain")[0]
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.text, ref.finish_reason), stop
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                           stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == ref.text, stop


@pytest.mark.parametrize("field,value", [("logprobs", True), ("top_logprobs", 2), ("n", 2), ("response_format",
                         {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("tool_choice", "required"), ("presence_penalty", 0.5), ("logit_bias", {"5": 10})])
def test_unsupported_openai_fields_get_a_400_naming_them(server, field, value):
    _, url, _ = server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    code, obj = _post(url, "/v1/chat/completions", json.dumps(body).encode())
    assert code == 400 and obj["error"]["param"] == field and f"'{field}' is not supported" in obj["error"]["message"]
    neutral = {"logprobs": False, "n": 1, "response_format": {"type": "text"}}
    if field in neutral:  # the value that means "not used" is accepted
        code, _ = _post(url, "/v1/chat/completions", json.dumps({**body, field: neutral[field]}).encode())
        assert code == 200
    code, obj = _post(url, "/v1/completions", json.dumps({"prompt": "hi", "logprobs": 0}).encode())
    assert code == 400 and obj["error"]["param"] == "logprobs"


def test_content_parts_and_the_chat_default_length(server):
    _, url, loaded = server
    c = _client(url)
    parts = c.chat.completions.create(model="tiny", max_tokens=5, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Add 2"}, {"type": "text", "text": "and 2."}]}])
    plain = c.chat.completions.create(model="tiny", max_tokens=5, temperature=0,
                                      messages=[{"role": "user", "content": "Add 2\nand 2."}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    code, obj = _post(url, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}).encode())
    assert code == 400 and "'image_url'" in obj["error"]["message"]
    # no max_tokens: up to the context left (here within --max-tokens-limit 64), not the legacy 16
    r = c.chat.completions.create(model="tiny", temperature=0, messages=[{"role": "user", "content": "Add 2 and 2."}])
    ref = generate_batch(loaded, ["Add 2 and 2."], GenParams(max_new_tokens=64))[0]
    assert r.choices[0].message.content == ref.text and r.usage.completion_tokens == ref.tokens
    assert r.usage.completion_tokens > 16 or r.choices[0].finish_reason == "stop"


def test_vllm_command_passes_name_limits_and_the_training_template_and_the_key_by_env(tiny_model, tmp_path):
    from types import SimpleNamespace

    from tunelab.serve import vllm_command, vllm_env

    run = tmp_path / "myrun"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {{name: {tiny_model}}}\ndata: {{template: alpaca}}\n")
    (run / "final" / "adapter_config.json").write_text('{"r": 24}')
    args = SimpleNamespace(host="0.0.0.0", port=9000, name=None, template=None, max_prompt_tokens=300,
                           max_tokens_limit=100, max_batch=8)
    cmd = vllm_command(args, str(run), tmp_path)
    opt = {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--api-key" not in cmd and opt["--host"] == "0.0.0.0" and opt["--port"] == "9000"
    env = vllm_env("s3cret", {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "VLLM_API_KEY": "s3cret"} and vllm_env(None, {"PATH": "/bin"}) == {"PATH": "/bin"}
    assert opt["--model"] == str(tiny_model) and opt["--lora-modules"] == f"myrun={run / 'final'}"
    assert "--enable-lora" in cmd and opt["--max-lora-rank"] == "32"
    assert opt["--max-model-len"] == "400" and opt["--max-num-seqs"] == "8"
    assert "### Instruction:" in (tmp_path / "chat_template.jinja").read_text()
    assert opt["--chat-template"] == str(tmp_path / "chat_template.jinja")
    # a plain model: served under --name, no key -> no --api-key
    args.name, args.max_prompt_tokens = "m", 4000
    cmd = vllm_command(args, str(tiny_model), tmp_path)
    opt = {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}
    assert opt["--served-model-name"] == "m" and "--api-key" not in cmd and opt["--max-model-len"] == "512"


def test_the_vllm_hand_off_gives_the_key_to_vllm_by_environment_only(tiny_model, tmp_path):
    """`tunelab serve --backend vllm --api-key-env K` really execs vLLM's server (here a stand-in module
    named vllm.entrypoints.openai.api_server that records what it was started with): the key is in its
    environment as VLLM_API_KEY, nowhere in its command line (/proc/self/cmdline, what `ps` shows), nor
    in what tunelab printed."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "fake"
    pkg = fake / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (fake / "vllm", fake / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    seen = tmp_path / "seen.json"
    (pkg / "api_server.py").write_text(
        "import json, os, sys\n"
        f"open({str(seen)!r}, 'w').write(json.dumps({{'argv': sys.argv, "
        "'cmdline': open('/proc/self/cmdline', 'rb').read().decode(errors='replace'), "
        "'key': os.environ.get('VLLM_API_KEY')}))\n")
    # vLLM needs CUDA and the vllm package: here both are stand-ins. The fake package is put on the path
    # of the exec'd server only (transformers, imported first, would take it for a real vLLM).
    code = ("import importlib.util, os, sys, torch\n"
            "import tunelab.models, tunelab.serve, tunelab.shiptemplate\n"  # imported with the real CUDA check
            "from tunelab.cli import main\n"
            "torch.cuda.is_available = lambda: True\n"
            "find = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: True if name == 'vllm' else find(name, *a)\n"
            f"os.environ['PYTHONPATH'] = {str(fake)!r} + os.pathsep + os.environ.get('PYTHONPATH', '')\n"
            f"sys.exit(main(['serve', {str(tiny_model)!r}, '--backend', 'vllm', '--api-key-env', 'MY_KEY', "
            "'--name', 'tiny', '--port', '0']))")
    secret = "sk-very-secret-4711"
    env = {**os.environ, "MY_KEY": secret, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("VLLM_API_KEY", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(seen.read_text())
    assert got["key"] == secret
    assert secret not in got["cmdline"] and secret not in " ".join(got["argv"])
    assert secret not in r.stdout + r.stderr and "VLLM_API_KEY" in r.stdout + r.stderr
    assert "--served-model-name" in got["argv"] and "tiny" in got["argv"]


# ---- issue 17.6: one decoding core; `tunelab serve` (its own process) answers as `tunelab generate` does ---------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """`tunelab serve` started as its own process on a copy of the tiny model whose generation_config
    biases a completion prompt that ends in '~' into 'rererere...' (sequence_bias: transformers applies it
    inside model.generate, so generate and serve see it alike). Yields (url, the same model loaded here)."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_model, folder)
    loaded = load_for_inference(str(folder))
    tilde, re_ = (loaded.tokenizer.encode(t, add_special_tokens=False) for t in ("~", "re"))
    assert len(tilde) == len(re_) == 1
    gc = json.loads((folder / "generation_config.json").read_text())
    gc["sequence_bias"] = [[tilde + re_, 100.0], [re_ + re_, 200.0]]
    (folder / "generation_config.json").write_text(json.dumps(gc))
    loaded = load_for_inference(str(folder))
    port = _free_port()
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(folder), "--port", str(port), "--name",
                             "tiny", "--backend", "transformers", "--max-tokens-limit", "64"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "tunelab serve did not come up"
            time.sleep(0.5)
        yield url, loaded
    finally:
        proc.terminate()
        proc.wait(timeout=30)


PARITY_PROMPTS = ["Question: Add 3 and 4.\nAnswer:", "Hi", "Write a response about the number 7 and the city.",
                  "the capital city of the country is"]


def _concurrently(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:  # requests that arrive together share a batch
        return list(pool.map(fn, items))


def test_served_greedy_text_equals_generate(served):
    url, loaded = served
    c = _client(url)
    got = _concurrently(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
                        .choices[0].text, PARITY_PROMPTS)
    assert got == [generate_batch(loaded, [p], GenParams(max_new_tokens=12), template="plain")[0].text
                   for p in PARITY_PROMPTS]
    chat = _concurrently(lambda p: c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0).choices[0].message.content,
        PARITY_PROMPTS)
    assert chat == [generate_batch(loaded, [p], GenParams(max_new_tokens=12))[0].text for p in PARITY_PROMPTS]


def test_served_seeded_sampling_equals_generate(served):
    """A request with a seed samples exactly what `tunelab generate --do-sample --seed` samples, whatever
    other requests share its batch (each row draws from its own seeded generator)."""
    url, loaded = served
    c = _client(url)
    cases = [(p, seed) for p in PARITY_PROMPTS[:2] for seed in (1, 2, 3)]
    got = _concurrently(lambda ps: c.completions.create(model="tiny", prompt=ps[0], max_tokens=16, temperature=0.9,
                                                        top_p=0.95, seed=ps[1]).choices[0].text, cases)
    want = [generate_batch(loaded, [p], GenParams(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95,
                                                  seed=seed), template="plain")[0].text for p, seed in cases]
    assert got == want
    assert len(set(want[:3])) > 1  # really sampled: other seeds, other texts
    streamed = c.completions.create(model="tiny", prompt=cases[0][0], max_tokens=16, temperature=0.9, top_p=0.95,
                                    seed=cases[0][1], stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want[0]


def test_served_stop_strings_cut_as_generate_including_a_multi_token_stop(served):
    url, loaded = served
    c = _client(url)
    free = generate_batch(loaded, ["Spell it~"], GenParams(max_new_tokens=12), template="plain")[0].text
    assert free.startswith("rererere")  # the biased continuation
    text = generate_batch(loaded, [PARITY_PROMPTS[2]], GenParams(max_new_tokens=24), template="plain")[0].text
    cases = [("Spell it~", "ererer"), ("Spell it~", ["xyz", "rere"]), (PARITY_PROMPTS[2], text[2:8]),
             (PARITY_PROMPTS[2], [text[6:9], text[1:12]])]
    for prompt, stop in cases:
        stops = stop if isinstance(stop, list) else [stop]
        ref = generate_batch(loaded, [prompt], GenParams(max_new_tokens=24, stop=stops), template="plain")[0]
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.text, ref.finish_reason), stop
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                           stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == ref.text, stop
    assert generate_batch(loaded, ["Spell it~"], GenParams(max_new_tokens=24, stop=["ererer"]),
                          template="plain")[0].text == "r"  # the case: 'r', not 'rerere'


def test_generate_and_serve_call_the_one_decoding_core(server, monkeypatch):
    from tunelab import decode as core

    calls = []
    real = core.decode
    monkeypatch.setattr(core, "decode", lambda loaded, rows: calls.append(len(rows)) or real(loaded, rows))
    _, url, loaded = server
    generate_batch(loaded, ["Hi"], GenParams(max_new_tokens=2))
    code, _ = _post(url, "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}).encode())
    assert code == 200 and calls == [1, 1]


def test_completion_prompt_as_token_ids(server):
    """OpenAI's `prompt` as a list of token ids is sent exactly as given (export's parity report uses it)."""
    _, url, loaded = server
    prompt = "Question: Add 3 and 4.\nAnswer:"
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
    as_text = _post(url, "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 6, "temperature": 0}).encode())
    as_ids = _post(url, "/v1/completions", json.dumps({"prompt": ids, "max_tokens": 6, "temperature": 0}).encode())
    assert as_ids[0] == 200 and as_ids[1]["choices"][0]["text"] == as_text[1]["choices"][0]["text"]
    assert as_ids[1]["usage"]["prompt_tokens"] == len(ids)
    code, obj = _post(url, "/v1/completions", json.dumps({"prompt": [5, 10 ** 6]}).encode())
    assert code == 400 and "token ids must be in" in obj["error"]["message"]


def test_max_tokens_beyond_the_context_is_a_400_naming_the_field():
    from types import SimpleNamespace

    from tunelab.serve import ApiError, Server

    srv = SimpleNamespace(max_prompt_tokens=1000, max_tokens_limit=200, context=512)
    ids = list(range(400))
    job = Server.job_from(srv, {"messages": [], "temperature": 0}, ids)  # chat default: the context left
    assert job.params.max_new_tokens == 112 and not job.params.do_sample
    assert Server.job_from(srv, {"prompt": "x"}, list(range(500))).params.max_new_tokens == 12  # legacy 16, fitted
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(ApiError, match=f"with {field} 150 that is 550 > the model's context of 512") as e:
            Server.job_from(srv, {"prompt": "x", field: 150}, ids)
        assert e.value.param == field and e.value.code == "context_length_exceeded"


def test_the_vllm_hand_off_refuses_an_adapter_on_another_base(tiny_model, tmp_path):
    import shutil
    from types import SimpleNamespace

    from tunelab.models import ModelError
    from tunelab.serve import vllm_command

    other = tmp_path / "mistral"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    run = tmp_path / "myrun"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {{name: {other}}}\ndata: {{template: alpaca}}\n")
    (run / "final" / "adapter_config.json").write_text('{"r": 8}')
    (run / "final" / "tunelab_base.json").write_text(json.dumps({"base": str(tiny_model), "fingerprint": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama"}}))
    args = SimpleNamespace(host="127.0.0.1", port=9000, name=None, template=None, max_prompt_tokens=300,
                           max_tokens_limit=100, max_batch=8)
    with pytest.raises(ModelError, match="trained on a different base"):
        vllm_command(args, str(run), tmp_path)
