"""`tunelab data synth`: grow a data set from a teacher model, the self-instruct way.

Seed examples (a data file) -> for each request, a few seeds as demonstrations and the teacher asked
for one new task with its answer as JSON -> filters (valid JSON with instruction/output, lengths,
instruction of 3-150 words, not a near duplicate of a seed or of a row already kept: MinHash/Jaccard
on the instruction, as self-instruct does with ROUGE-L, threshold 0.7) -> an Alpaca or chat file.

The teacher is any OpenAI-compatible endpoint (`--teacher http://host:port/v1`; the API key is read
from the environment variable named by --api-key-env and never written anywhere), or a local model
through tunelab's own loading (`--teacher local:smollm2-135m`, a run folder, ...).
`--api chat` sends a chat request; `--api completions` sends a completion-style prompt that ends
inside the JSON object, as the original self-instruct did with base models (small models manage it).

Requests run `--concurrency` at a time, are retried with exponential backoff, and stop at
`--max-requests`. Every answer is appended to a cache file as it arrives; rerunning the same command
reuses it (request i of a run always sends the same prompt), so an interrupted run resumes without
paying twice. Results are processed in request order, so the output does not depend on timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from ..config import ConfigError
from ..data.templates import Example
from .common import (
    Provenance,
    add_input_args,
    fraction,
    guard_outputs,
    load_from_args,
    progress,
    sidecar,
    write_rows_with_provenance,
)
from .dedup import NearDupIndex
from .filters import repeats_instruction


class TeacherError(ConfigError):
    """The teacher can't be used (unreachable after retries, refused the key, unknown model): one line, exit 2."""


class RequestRejected(Exception):
    """The teacher refused this one request (HTTP 400/413/422): counted, the run goes on."""


# ---- teachers ---------------------------------------------------------------------------------

class HttpTeacher:
    """An OpenAI-compatible /v1 endpoint, over the standard library's HTTP client (no extra dependency)."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None, timeout: float, retries: int,
                 backoff: float):
        self.base = base_url.rstrip("/")
        self.model, self._key, self.timeout, self.retries, self.backoff = model, api_key, timeout, retries, backoff
        self.label = self.base

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.base + path, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                msg = _error_message(e)
                if e.code in (429, 500, 502, 503, 504):
                    last = f"HTTP {e.code}: {msg}"
                    continue
                if e.code in (400, 413, 422):
                    raise RequestRejected(f"HTTP {e.code}: {msg}") from None
                raise TeacherError(f"teacher {self.label}: HTTP {e.code}: {msg}") from None
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                last = str(reason) or type(e).__name__
            except json.JSONDecodeError:
                last = "the response is not JSON"
        raise TeacherError(f"teacher {self.label} unreachable after {self.retries} retries ({last})")

    def complete(self, prompt: str, api: str, max_tokens: int, temperature: float, seed: int) -> str:
        body = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        if self.model:
            body["model"] = self.model
        if api == "chat":
            r = self._post("/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]})
            return r["choices"][0]["message"]["content"] or ""
        r = self._post("/completions", {**body, "prompt": prompt, "stop": ["\n"]})
        return r["choices"][0]["text"] or ""


class LocalTeacher:
    """A model loaded in this process with tunelab's own loading (model spec, run folder or checkpoint)."""

    def __init__(self, spec: str):
        from ..models import load_for_inference

        self.loaded = load_for_inference(spec)
        self.lock = threading.Lock()
        self.label = f"local:{spec}"
        self.model = spec

    def complete(self, prompt: str, api: str, max_tokens: int, temperature: float, seed: int) -> str:
        from ..generate import GenParams, generate_batch

        params = GenParams(max_new_tokens=max_tokens, do_sample=temperature > 0,
                           temperature=temperature if temperature > 0 else None, seed=seed,
                           stop=["\n"] if api == "completions" else [])
        with self.lock:
            return generate_batch(self.loaded, [prompt], params,
                                  template="plain" if api == "completions" else None)[0].text


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        return str(body.get("error", {}).get("message", body))[:200]
    except Exception:
        return e.reason if isinstance(e.reason, str) else "error"


# ---- prompts and parsing ------------------------------------------------------------------------

def _demo(ex) -> str:
    return json.dumps({"instruction": ex.instruction, "input": ex.input, "output": ex.response}, ensure_ascii=False)


JSON_START = '{"instruction": "'


def build_prompt(seeds: list, i: int, seed: int, k: int, api: str) -> str:
    """Request i's prompt: k seed demonstrations drawn with Random(seed, i), so a rerun asks the same."""
    rng = random.Random(f"{seed}:{i}")
    demos = "\n".join(_demo(ex) for ex in rng.sample(seeds, min(k, len(seeds))))
    if api == "completions":
        return f"Tasks with their answers, one JSON object a line:\n{demos}\n{JSON_START}"
    return ("You write new tasks for training an instruction-following assistant. Examples, one JSON object a "
            f"line:\n{demos}\n\nWrite one new task, different from the examples, with its answer. Reply with a "
            'single JSON object with the keys "instruction", "input" (may be empty) and "output", and nothing else.')


def parse_answer(text: str, api: str) -> tuple[dict | None, str | None]:
    """(row, None) or (None, drop reason)."""
    if api == "completions":
        text = JSON_START + text
    start = text.find("{")
    if start < 0:
        return None, "invalid JSON (no object in the answer)"
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None, "invalid JSON"
    if (not isinstance(obj, dict) or not isinstance(obj.get("instruction"), str)
            or not isinstance(obj.get("output"), str)):
        return None, "JSON without text instruction and output"
    inp = obj.get("input", "")
    if not isinstance(inp, str):
        inp = json.dumps(inp, ensure_ascii=False) if inp else ""
    return {"instruction": obj["instruction"].strip(), "input": inp.strip(), "output": obj["output"].strip()}, None


class Cache:
    """Append-only JSONL of {key, text}: answers survive an interrupted run."""

    def __init__(self, path: Path):
        self.path, self.lock, self.data = path, threading.Lock(), {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                    self.data[e["key"]] = e["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that request is simply asked again
        self.f = None

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, text: str) -> None:
        with self.lock:
            self.data[key] = text
            if self.f is None:
                self.f = self.path.open("a", encoding="utf-8")
            self.f.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


# ---- the command --------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="grow a data set from a teacher model (self-instruct)")
    add_input_args(p)
    p.add_argument("--out", "-o", required=True, help="output .jsonl (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out; rerun with it to resume from the cache")
    p.add_argument("--teacher", required=True,
                   help="an OpenAI-compatible base URL (http://127.0.0.1:8000/v1) "
                        "or local:MODEL (smollm2-135m, a run folder)")
    p.add_argument("--model", help="model name sent to the endpoint (default: none, the server's own)")
    p.add_argument("--api-key-env", help="environment variable holding the endpoint's API key (never stored)")
    p.add_argument("--api", choices=["chat", "completions"], default="chat",
                   help="chat request, or a completion-style prompt ending inside the JSON (base/small models)")
    p.add_argument("-n", "--num-rows", type=int, default=20, help="rows to produce")
    p.add_argument("--max-requests", type=int, help="cap on requests (default 5 x --num-rows)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request (exponential backoff)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each retry)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--demos", type=int, default=3, help="seed examples shown per request")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--similarity", type=float, default=0.7,
                   help="drop a new instruction this similar (Jaccard of word 3-grams) to a seed or kept one")
    p.add_argument("--min-response-chars", type=int, default=1)
    p.add_argument("--max-response-chars", type=int, default=4000)
    p.add_argument("--out-format", choices=["alpaca", "chat"], default="alpaca")
    p.add_argument("--cache", help="answer cache (default OUT.cache.jsonl)")


def _teacher(args):
    if args.teacher.startswith("local:"):
        return LocalTeacher(args.teacher[len("local:"):])
    if not args.teacher.startswith(("http://", "https://")):
        raise ConfigError(f"--teacher {args.teacher}: give an http(s):// base URL or local:MODEL")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    return HttpTeacher(args.teacher, args.model, key, args.timeout, args.retries, args.backoff)


def _validate(args) -> None:
    for flag, v, lo in (("--num-rows", args.num_rows, 1), ("--concurrency", args.concurrency, 1),
                        ("--retries", args.retries, 0), ("--demos", args.demos, 1),
                        ("--max-tokens", args.max_tokens, 1), ("--min-response-chars", args.min_response_chars, 0)):
        if v < lo:
            raise ConfigError(f"{flag} must be >= {lo}, got {v}")
    if args.max_requests is not None and args.max_requests < 1:
        raise ConfigError(f"--max-requests must be >= 1, got {args.max_requests}")
    if args.max_response_chars < args.min_response_chars:
        raise ConfigError("--max-response-chars is below --min-response-chars")
    if not 0 <= args.temperature <= 2:
        raise ConfigError(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.timeout <= 0 or args.backoff < 0:
        raise ConfigError("--timeout must be > 0 and --backoff >= 0")
    fraction(args.similarity, "--similarity")


def _out_row(row: dict, fmt: str) -> dict:
    if fmt == "chat":
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}
    return row


def cmd_synth(args) -> int:
    from ..ui import console, warn

    _validate(args)
    out = Path(args.out)
    guard_outputs([out, sidecar(out, "provenance")], args.overwrite)
    cache_path = Path(args.cache) if args.cache else out.with_name(out.name + ".cache.jsonl")
    ds = load_from_args(args)
    seeds = [r.example for r in ds.rows if r.example is not None]
    if not seeds:
        raise ConfigError(f"{args.input}: no usable seed rows")
    teacher = _teacher(args)
    max_requests = args.max_requests or 5 * args.num_rows
    index = NearDupIndex(threshold=args.similarity)
    for i, ex in enumerate(seeds):
        index.add(-1 - i, *index.match(ex.instruction)[2:])
    prov = Provenance("synth", [args.input], rows_in=0, settings={
        "teacher": teacher.label, "model": args.model, "api": args.api, "api_key_env": args.api_key_env,
        "num_rows": args.num_rows, "max_requests": max_requests, "concurrency": args.concurrency,
        "demos": args.demos, "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
        "similarity": args.similarity, "min_response_chars": args.min_response_chars,
        "max_response_chars": args.max_response_chars, "out_format": args.out_format, "cache": str(cache_path)})
    cache = Cache(cache_path)
    counts = {"network": 0, "cached": 0}
    kept: list[dict] = []

    def key_of(i: int, prompt: str) -> str:
        params = [teacher.label, args.model, args.api, args.max_tokens, args.temperature, args.seed, i, prompt]
        return hashlib.sha256(json.dumps(params, ensure_ascii=False).encode()).hexdigest()

    def ask(i: int) -> str:
        prompt = build_prompt(seeds, i, args.seed, args.demos, args.api)
        key = key_of(i, prompt)
        text = cache.get(key)
        if text is not None:
            counts["cached"] += 1
            return text
        text = teacher.complete(prompt, args.api, args.max_tokens, args.temperature, args.seed + i)
        counts["network"] += 1
        cache.put(key, text)
        return text

    def handle(text: str) -> None:
        row, why = parse_answer(text, args.api)
        if row is not None:
            n_words = len(row["instruction"].split())
            if not row["instruction"] or not row["output"]:
                why = "empty instruction or output"
            elif not 3 <= n_words <= 150:
                why = "instruction not 3-150 words"
            elif repeats_instruction(Example(row["instruction"], row["input"], row["output"])):
                why = "output repeats the instruction"
            elif not args.min_response_chars <= len(row["output"]) <= args.max_response_chars:
                why = f"output length outside {args.min_response_chars}-{args.max_response_chars} characters"
            else:
                match, sim, sh, m = index.match(row["instruction"])
                if match is not None:
                    why = f"instruction similar to {'a seed' if match < 0 else 'a kept row'} (>= {args.similarity:g})"
                else:
                    index.add(len(kept), sh, m)
                    kept.append(_out_row(row, args.out_format))
                    return
        prov.drop(why)

    failure: BaseException | None = None
    processed = 0
    t0 = time.time()
    with progress() as bar:
        task = bar.add_task("synth", total=args.num_rows)
        pool = ThreadPoolExecutor(1 if isinstance(teacher, LocalTeacher) else args.concurrency)
        pending, results, next_i = {}, {}, 0
        try:
            while True:
                while (len(kept) < args.num_rows and next_i < max_requests and not failure
                       and len(pending) < args.concurrency):
                    pending[pool.submit(ask, next_i)] = next_i
                    next_i += 1
                if not pending:
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for f in done:
                    i = pending.pop(f)
                    if f.cancelled():  # still queued when enough rows were kept (below): never asked
                        continue
                    try:
                        results[i] = f.result()
                    except RequestRejected as e:
                        results[i] = e
                    except TeacherError as e:
                        failure = failure or e
                while processed in results and len(kept) < args.num_rows:
                    r = results.pop(processed)
                    if isinstance(r, RequestRejected):
                        prov.drop("request rejected by the teacher")
                    else:
                        handle(r)
                    processed += 1
                    bar.update(task, completed=len(kept),
                               description=f"synth ({processed} answers, {len(kept)} kept)")
                if failure or len(kept) >= args.num_rows:
                    for f in pending:
                        f.cancel()
                    if failure:
                        break
        except KeyboardInterrupt as e:
            failure = e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            cache.close()
    prov.rows_in = processed
    prov.extra.update({"requests": processed, "answers_from_teacher": counts["network"],
                       "answers_from_cache": counts["cached"], "complete": failure is None,
                       "rows_per_minute": round(60 * len(kept) / max(time.time() - t0, 1e-9), 2)})
    if kept:
        write_rows_with_provenance(out, kept, prov)
    else:  # no data file, but the counts (why everything was dropped) are kept
        prov.write(out)
    if failure is not None:
        saved = (f"{len(kept)} rows kept so far saved to {out}" if kept else "nothing kept yet")
        msg = f"{saved}; rerun the same command with --overwrite to resume (answers cached in {cache_path})"
        if isinstance(failure, KeyboardInterrupt):
            console.print(f"interrupted: {msg}")
            raise failure
        raise TeacherError(f"{failure}; {msg}")
    console.print(f"synth: {processed} answers ({counts['network']} from {teacher.label}, {counts['cached']} cached), "
                  f"kept {len(kept)} -> {out if kept else '(nothing written)'}")
    for why, n in sorted(prov.dropped.items(), key=lambda kv: -kv[1]):
        console.print(f"  dropped {n}: {why}")
    if len(kept) < args.num_rows:
        warn(f"only {len(kept)} of {args.num_rows} rows after {processed} requests (--max-requests {max_requests})")
    return 0
