"""`tunelab serve MODEL_OR_RUN --port P`: an OpenAI-compatible HTTP server.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream: true` as server-sent events). Concurrent requests are batched: a single worker
thread owns the model, collects the requests that arrive within a short window and decodes them as
one left-padded batch with `decode.decode`, the decoding core `tunelab generate` uses (each row with
its own sampling settings and seed, stop strings and max_tokens), streaming text to each client as
it becomes final and answering each one as soon as its row ends.
/v1/completions takes the prompt as is; /v1/chat/completions renders the whole conversation
(system message and every earlier turn) with `templates.render_prompt`, the function training
and `tunelab generate` use: a chat_template run (and a bare model whose tokenizer has a chat
template, unless --template says otherwise) gets the tokenizer's template, with the run's
data.system_prompt first when the request has no system message. The alpaca and plain templates
have no turns and no system part: they take exactly one user message as the instruction, and a
request with a system message or several turns gets a 400 that says so (joining turns into one
instruction would send a prompt the model never trained on).

With vLLM installed and a CUDA GPU, `tunelab serve` hands over to vLLM's own OpenAI server
(the adapter served as a LoRA module); everywhere else it is this transformers path. The HTTP
layer is the standard library's ThreadingHTTPServer: small, no extra dependency, and every bad
request gets an OpenAI-shaped JSON error instead of a dropped connection.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from . import decode as core
from .data.templates import Example, TemplateError, encode_prompt, render_prompt
from .generate import GenParams
from .ui import console


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    ids: list[int]
    params: GenParams  # what `tunelab generate` would be given for the same request
    out: queue.Queue = field(default_factory=queue.Queue)  # ("token", text) ... ("done", finish_reason, n)


class Engine:
    """Owns the model; batches jobs that arrive within `window` seconds and decodes them together."""

    def __init__(self, loaded, max_batch: int = 16, window: float = 0.02):
        self.loaded, self.max_batch, self.window = loaded, max_batch, window
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.batches = 0
        self.stopped = False
        # One forward pass on the calling (main) thread before the worker thread starts: measured here,
        # a model whose first parallel op ran on a secondary thread decoded ~5x slower for the whole
        # process lifetime (CPU thread pools are set up by the first thread that uses them).
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([[loaded.tokenizer.eos_token_id] * 4], device=loaded.device))
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _loop(self):
        while not self.stopped:
            try:
                first = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
            try:
                self._run(batch)
            except Exception as e:  # a failure is reported to every waiting client, the server stays up
                for j in batch:
                    j.out.put(("error", f"{type(e).__name__}: {e}"))

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1
        core.decode(self.loaded, [core.Row(j.ids, j.params, on_text=lambda text, j=j: j.out.put(("token", text)),
                                           on_done=lambda d, j=j: j.out.put(("done", d.finish_reason, len(d.ids))))
                                  for j in batch])


class Server:
    def __init__(self, loaded, name: str, max_tokens_limit: int, max_prompt_tokens: int, api_key: str | None,
                 max_batch: int, window: float):
        self.loaded, self.name = loaded, name
        self.max_tokens_limit, self.max_prompt_tokens, self.api_key = max_tokens_limit, max_prompt_tokens, api_key
        self.context = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
        self.engine = Engine(loaded, max_batch=max_batch, window=window)

    # ---- request parsing ------------------------------------------------------------------
    def job_from(self, body: dict, prompt_ids: list[int]) -> Job:
        def num(key, default, lo=None, hi=None, kind=float):
            v = body.get(key, default)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
                raise ApiError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}", key)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
            return kind(v)

        unsupported(body)
        if len(prompt_ids) > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}", "messages" if "messages" in body else "prompt",
                           "context_length_exceeded")
        # chat without max_tokens: up to the context left (as OpenAI/vLLM), within --max-tokens-limit;
        # /v1/completions keeps the legacy API's default of 16
        left = (self.context or (len(prompt_ids) + self.max_tokens_limit)) - len(prompt_ids)
        if left <= 0:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens, the model's whole context is "
                                f"{self.context}", "messages" if "messages" in body else "prompt",
                           "context_length_exceeded")
        default = min(left, self.max_tokens_limit if "messages" in body else 16)
        field_ = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = num(field_, default, 1, self.max_tokens_limit, int)
        if max_tokens > left:  # as `tunelab generate` refuses it (generate.check_fits), and as vLLM does
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; with {field_} {max_tokens} that is "
                                f"{len(prompt_ids) + max_tokens} > the model's context of {self.context} tokens",
                           field_, "context_length_exceeded")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        temperature, top_p = num("temperature", 1.0, 0, 2), num("top_p", 1.0, 0, 1)
        seed = num("seed", None, kind=int) if body.get("seed") is not None else int(time.time_ns() % 2**31)
        sample = temperature > 0 and top_p > 0  # temperature 0 (or top_p 0: only the top token) is greedy
        return Job(prompt_ids, GenParams(max_new_tokens=max_tokens, do_sample=sample,
                                         temperature=temperature if sample else None,
                                         top_p=top_p if sample and top_p < 1 else None, seed=seed, stop=stop))

    def check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.name:
            raise ApiError(404, f"The model '{m}' does not exist; this server serves '{self.name}'", "model",
                           "model_not_found")

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = len(self.loaded.tokenizer)  # OpenAI's prompt as token ids: sent exactly as given
            if not all(0 <= t < vocab for t in p):
                raise ApiError(400, f"'prompt' token ids must be in [0, {vocab})", "prompt")
            return list(p)
        if not isinstance(p, str):
            raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
        return encode_prompt(self.loaded.tokenizer, p)

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        L = self.loaded
        example = Example(messages=[{"role": m["role"], "content": message_text(m.get("content"))} for m in msgs])
        try:
            text = render_prompt(L.template, example, L.tokenizer, L.system_prompt)
        except TemplateError as e:
            raise ApiError(400, f"this server renders prompts with the {L.template} template: {e}",
                           "messages") from None
        return encode_prompt(L.tokenizer, text)


# OpenAI request fields this server does not implement: a request that uses them gets a 400 naming the
# field instead of an answer that silently ignores it. (field, value that is the same as leaving it out)
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": False, "top_logprobs": 0, "echo": False, "suffix": "",
               "tools": [], "tool_choice": "none", "functions": [], "function_call": "none",
               "response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0,
               "frequency_penalty": 0}


def unsupported(body: dict) -> None:
    for key, neutral in UNSUPPORTED.items():
        v = body.get(key)
        if v is None or (v is neutral if isinstance(neutral, bool) else v == neutral):
            continue  # (logprobs: false is "none"; the legacy API's logprobs: 0 asks for them)
        raise ApiError(400, f"'{key}' is not supported by this server (got {json.dumps(v)[:60]}); "
                            f"leave it out (see the README's OpenAI compatibility table)", key, "unsupported_parameter")


def message_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = [p.get("type") for p in content]
        if any(k != "text" or not isinstance(p.get("text"), str) for k, p in zip(kinds, content)):
            bad = next(k for k, p in zip(kinds, content) if k != "text" or not isinstance(p.get("text"), str))
            raise ApiError(400, f"message content part of type {bad!r} is not supported (text parts only)",
                           "messages")
        return "\n".join(p["text"] for p in content)  # parts joined by a newline, as vLLM joins them
    raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")


def serve_template(spec: str, requested: str | None, tokenizer) -> str | None:
    """The template to serve with: --template, else the run's own (None: keep what loading chose),
    else for a bare model the tokenizer's chat template when it has one (an instruct model's chat
    endpoint must speak its chat format, as vLLM's does)."""
    from pathlib import Path

    from .models import find_run

    if requested:
        return requested
    path = Path(spec).expanduser()
    run = find_run(path)[0] if path.is_dir() else None
    if run is None and getattr(tokenizer, "chat_template", None):
        return "chat_template"
    return None


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet; no request bodies (or keys) in logs
            pass

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _auth(self) -> None:
            if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                raise ApiError(401, "invalid or missing API key", code="invalid_api_key", type_="authentication_error")

        def do_GET(self):
            try:
                if self.path == "/health":
                    return self._json(200, {"status": "ok", "model": server.name, "batches": server.engine.batches})
                self._auth()
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [
                        {"id": server.name, "object": "model", "created": 0, "owned_by": "tunelab"}]})
                raise ApiError(404, f"unknown path {self.path}", code="not_found")
            except ApiError as e:
                self._json(e.status, e.body())

        def do_POST(self):
            try:
                self._auth()
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    raise ApiError(404, f"unknown path {self.path}", code="not_found")
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    raise ApiError(400, "bad Content-Length") from None
                if length > 8 << 20:
                    raise ApiError(413, "request body too large")
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ApiError(400, f"malformed JSON body ({e})") from None
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                server.check_model(body)
                chat = self.path == "/v1/chat/completions"
                ids = server.chat_prompt(body) if chat else server.completion_prompt(body)
                job = server.engine.submit(server.job_from(body, ids))
                if body.get("stream"):
                    return self._stream(job, chat, len(ids))
                return self._complete(job, chat, len(ids))
            except ApiError as e:
                self._json(e.status, e.body())
            except Exception as e:  # never a dropped connection
                self._json(500, ApiError(500, f"internal error: {type(e).__name__}", type_="server_error").body())

        def _events(self, job: Job):
            while True:
                ev = job.out.get()
                if ev[0] == "error":
                    raise ApiError(500, ev[1], type_="server_error")
                yield ev
                if ev[0] == "done":
                    return

        def _complete(self, job: Job, chat: bool, n_prompt: int):
            text, finish, n = "", "length", 0
            for ev in self._events(job):
                if ev[0] == "token":
                    text += ev[1]
                else:
                    finish, n = ev[1], ev[2]
            cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
            self._json(200, {"id": cid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": server.name, "choices": [choice],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                       "total_tokens": n_prompt + n}})

        def _stream(self, job: Job, chat: bool, n_prompt: int):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            obj = "chat.completion.chunk" if chat else "text_completion"

            def send(choice):
                chunk = {"id": cid, "object": obj, "created": int(time.time()), "model": server.name,
                         "choices": [choice]}
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()

            try:
                if chat:
                    send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                for ev in self._events(job):
                    if ev[0] == "token":
                        send({"index": 0, "delta": {"content": ev[1]}, "finish_reason": None} if chat
                             else {"index": 0, "text": ev[1], "logprobs": None, "finish_reason": None})
                    else:
                        send({"index": 0, "delta": {}, "finish_reason": ev[1]} if chat
                             else {"index": 0, "text": "", "logprobs": None, "finish_reason": ev[1]})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; the engine finishes the row and drops it
            except ApiError as e:
                self.wfile.write(f"data: {json.dumps(e.body())}\n\n".encode())

    return Handler


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a model, run folder or checkpoint")
    p.add_argument("model", help="model spec, run folder or checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="model id clients send (default: the folder or spec name)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-window-ms", type=float, default=20.0, help="how long to gather requests into a batch")
    p.add_argument("--api-key-env", help="require this environment variable's value as the Bearer key")
    p.add_argument("--backend", choices=["auto", "transformers", "vllm"], default="auto")
    p.add_argument("--template", choices=["alpaca", "chat_template", "plain"],
                   help="chat prompt template (default: the run's; a bare model's chat template if it has one)")


def vllm_command(args, spec: str, template_dir) -> list[str]:
    """vLLM's OpenAI server command line for what `tunelab serve` was asked: the same host, port,
    served model name and limits, the adapter as a LoRA module, and the run's training template as its
    chat template (written into `template_dir`). Never the API key: a command line is readable by every
    user of the machine (`ps`, /proc/PID/cmdline) and lands in shell history; `vllm_env` passes it."""
    import sys
    from pathlib import Path

    from .models import find_run, model_config, resolve_model
    from .rundir import run_config
    from .shiptemplate import jinja_template

    run, weights = find_run(Path(spec).expanduser()) if Path(spec).expanduser().is_dir() else (None, None)
    rc = run_config(run) if run is not None else None
    name = args.name or (run.name if run is not None else Path(spec.rstrip("/")).name or spec)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", args.host, "--port", str(args.port)]
    if weights is not None and (weights / "adapter_config.json").is_file():
        from .models import check_adapter_base

        base = resolve_model(rc.model.name, rc.model.revision)
        check_adapter_base(weights, base)  # vLLM would load the LoRA module onto any base of the same shapes
        rank = json.loads((weights / "adapter_config.json").read_text()).get("r", 16)
        cmd += ["--model", str(base), "--served-model-name", f"{name}-base", "--enable-lora",
                "--lora-modules", f"{name}={weights}",
                "--max-lora-rank", str(max(8, 1 << (int(rank) - 1).bit_length()))]
        tok_folder = weights if (weights / "tokenizer_config.json").is_file() else base
        cmd += ["--tokenizer", str(tok_folder)]
    else:
        base = weights or resolve_model(spec)
        tok_folder = base
        cmd += ["--model", str(base), "--served-model-name", name]
    ctx = getattr(model_config(base), "max_position_embeddings", None)
    total = args.max_prompt_tokens + args.max_tokens_limit
    cmd += ["--max-model-len", str(min(total, ctx) if ctx else total), "--max-num-seqs", str(args.max_batch)]
    template = args.template or (rc.data.template if rc is not None else None)
    if template:  # the prompt training rendered, not whatever the base's tokenizer ships
        from .models import load_tokenizer

        tok = load_tokenizer(tok_folder)[0] if template == "chat_template" else None
        path = Path(template_dir) / "chat_template.jinja"
        path.write_text(jinja_template(template, tok, rc.data.system_prompt if rc is not None else None))
        cmd += ["--chat-template", str(path)]
    return cmd


def vllm_env(api_key: str | None, environ=None) -> dict[str, str]:
    """The environment vLLM's server starts with: ours, plus the API key as VLLM_API_KEY, which vLLM's
    OpenAI server reads as its key when `--api-key` is not given (vllm.envs.VLLM_API_KEY). The
    environment of a process is private to its user, unlike its command line."""
    env = dict(os.environ if environ is None else environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def _vllm_exec(args, spec: str, api_key: str | None) -> None:
    """Replace this process with vLLM's OpenAI server (GPU + vllm installed); the key travels in its
    environment only (not its arguments, not the printed command, not a file)."""
    import shlex
    import sys
    import tempfile

    cmd = vllm_command(args, spec, tempfile.mkdtemp(prefix="tunelab-vllm-"))
    auth = "API key from --api-key-env (as VLLM_API_KEY)" if api_key else "no API key"
    console.print(f"vLLM backend ({auth}): {shlex.join(cmd)}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, vllm_env(api_key))


def cmd_serve(args) -> int:
    from .config import ConfigError

    for flag in ("max_tokens_limit", "max_prompt_tokens", "max_batch"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    if args.backend in ("auto", "vllm"):
        import importlib.util

        has_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
        if has_vllm:
            _vllm_exec(args, args.model, key)
        elif args.backend == "vllm":
            raise ConfigError("--backend vllm needs the vllm package and a CUDA GPU")
    httpd, srv = open_server(args.model, host=args.host, port=args.port, name=args.name, template=args.template,
                             max_tokens_limit=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                             api_key=key, max_batch=args.max_batch, window=args.batch_window_ms / 1000)
    console.print(f"serving '{srv.name}' (template {srv.loaded.template}) on "
                  f"http://{args.host}:{httpd.server_address[1]}/v1 "
                  f"(transformers backend, batches of up to {args.max_batch})")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.engine.stopped = True
        httpd.server_close()
    return 0


def open_server(model: str, *, host: str = "127.0.0.1", port: int = 0, name: str | None = None,
                template: str | None = None, max_tokens_limit: int = 1024, max_prompt_tokens: int = 4096,
                api_key: str | None = None, max_batch: int = 16, window: float = 0.02):
    """(listening ThreadingHTTPServer, Server): what `tunelab serve` runs, ready for serve_forever();
    `export`'s parity report serves the export through it too. The port is taken before the model
    loads (seconds to minutes): a busy port fails at once, requests sent meanwhile wait in the backlog."""
    from pathlib import Path

    from .config import ConfigError
    from .models import load_for_inference

    try:
        httpd = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    try:
        loaded = load_for_inference(model, template=template)
        loaded.template = serve_template(model, template, loaded.tokenizer) or loaded.template
        if loaded.template == "chat_template" and not getattr(loaded.tokenizer, "chat_template", None):
            raise ConfigError(f"--template chat_template: the tokenizer of {model} has no chat template")
        name = name or Path(model.rstrip("/")).name or model
        srv = Server(loaded, name, max_tokens_limit, max_prompt_tokens, api_key, max_batch, window)
    except BaseException:
        httpd.server_close()
        raise
    httpd.RequestHandlerClass = make_handler(srv)
    httpd.daemon_threads = True
    return httpd, srv
