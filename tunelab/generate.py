"""Batched generation with the run's own prompt template: `tunelab generate`.

Prompts are whole examples (instruction, input or chat turns) rendered by `templates.render_prompt`
with the run's template and system prompt (the function training used; `prompt_ids` is the one
path from an example to the ids the model is sent, which `tunelab check` compares with training's),
left-padded into batches of similar length, and decoded greedily or by sampling by `decode.decode`,
the decoding core `tunelab serve` uses too (per-row sampling seeded per row, stop strings matched in
the generated text only and cut from it, EOS, streaming).
Results are cached on disk (see cache.py) so reruns are instant. A prompt that with max_new_tokens
would not fit the model's context window is refused before anything runs; a reply cut inside a
multi-byte character (max_new_tokens reached mid-Hangul) ends before that character, never in U+FFFD.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import decode as core
from .config import ConfigError
from .data.templates import Example, TemplateError, encode_prompt, example_from_row, render_prompt


class GenerationError(ConfigError):
    """A bad generation request (one line, exit 2)."""


@dataclass
class GenParams:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """The recipe's bug: temperature=0.05 without do_sample=True is silently greedy. Here it is an error."""
        ignored = [f"{k}={v}" for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                            ("top_k", self.top_k)) if v is not None]
        if ignored and not self.do_sample:
            raise GenerationError(f"{', '.join(ignored)} only apply when sampling; add --do-sample "
                                  f"(greedy decoding would silently ignore them)")
        if self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k <= 0:
            raise GenerationError(f"top_k must be > 0, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def key(self) -> dict:
        # sampled texts cached before decode.py drew each row from its own seeded generator were drawn
        # differently: a new key keeps them from standing in for today's sample (greedy keys are unchanged)
        return {**asdict(self), **({"sampler": "row-seeded"} if self.do_sample else {})}


@dataclass
class Completion:
    prompt: str
    text: str
    tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    cached: bool = False


def as_example(prompt: str | Example) -> Example:
    return prompt if isinstance(prompt, Example) else Example(instruction=prompt)


def build_prompt(loaded, prompt: str | Example, template: str | None = None) -> str:
    """The model's prompt text for a user prompt or a whole example: the run's template and system
    prompt, or `template` (plain = the text as is)."""
    try:
        return render_prompt(template or loaded.template, as_example(prompt), loaded.tokenizer, loaded.system_prompt)
    except TemplateError as e:
        raise GenerationError(str(e)) from None


def prompt_ids(loaded, prompt: str | Example, template: str | None = None) -> list[int]:
    """The token ids the model is sent for a prompt (`loaded` needs .tokenizer, .template, .system_prompt)."""
    return encode_prompt(loaded.tokenizer, build_prompt(loaded, prompt, template))


def unescape(stop: str) -> str:
    """`--stop '\\n'` means a newline: the usual backslash escapes (\\n, \\t, \\\\, \\uXXXX, \\x..) are decoded.
    Python's own unicode_escape codec does the work; non-Latin-1 text survives via backslashreplace."""
    try:
        return stop.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise GenerationError(f"--stop {stop!r}: bad escape ({e.reason})") from None


def context_limit(loaded) -> int | None:
    """The model's context window in tokens (max_position_embeddings), None when it doesn't say."""
    n = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_fits(loaded, n_prompt: int, max_new_tokens: int, what: str = "the prompt") -> None:
    limit = context_limit(loaded)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise GenerationError(f"{what} is {n_prompt} tokens; with max_new_tokens {max_new_tokens} that is "
                              f"{n_prompt + max_new_tokens} > the model's context window of {limit} tokens "
                              f"(shorten the prompt or lower --max-new-tokens)")


def decode_threads(model, rows: int, reps: int = 5) -> int:
    """Intra-op threads for CPU decoding: the current count, or 1 where one thread is faster right now.

    A decoding step is a few hundred tiny matmuls ([rows, hidden] x [hidden, intermediate]); with
    several threads each one ends in a barrier that waits for every thread to be scheduled. On a busy
    machine (more runnable threads than cores) that wait is a scheduler time slice per matmul: 17 tokens
    of SmolLM2 took 80-106 s with 2 threads and 4.5-5.0 s with 1 on this 2-core CPU at load 15-17. The
    cheapest honest test is to time that very matmul both ways now (median of `reps`, a few ms on an idle
    machine, ~0.1 s on a busy one) and keep the faster."""
    n = torch.get_num_threads()
    if n == 1:
        return 1
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 1024)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    a, w = torch.randn(max(1, rows), hidden), torch.randn(hidden, inter)

    def median_seconds(k: int) -> float:
        torch.set_num_threads(k)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ w
            times.append(time.perf_counter() - t)
        return sorted(times)[reps // 2]

    try:
        many, one = median_seconds(n), median_seconds(1)
    finally:
        torch.set_num_threads(n)
    return 1 if one < many else n


def generate_batch(loaded, prompts: list[str | Example], params: GenParams, template: str | None = None,
                   stream=None) -> list[Completion]:
    """One left-padded batch through the decoding core (decode.decode). `prompts` are raw user prompts or
    examples. `stream(text)` receives a single prompt's completion piece by piece as it is generated."""
    rows = [core.Row(prompt_ids(loaded, p, template), params,
                     on_text=stream if stream is not None and len(prompts) == 1 else None) for p in prompts]
    threads = torch.get_num_threads()
    if loaded.device == "cpu":  # decode on one thread where the machine is too busy for several (see decode_threads)
        torch.set_num_threads(decode_threads(loaded.model, len(prompts)))
    try:
        out = core.decode(loaded, rows)
    finally:
        torch.set_num_threads(threads)
    return [Completion(as_example(p).display(), d.text, len(d.ids), d.finish_reason) for p, d in zip(prompts, out)]


def generate(loaded, prompts: list[str | Example], params: GenParams, *, batch_size: int = 16, cache=None,
             on_result=None, progress: bool = False, template: str | None = None, stream=None) -> list[Completion]:
    """Generate for many prompts: cached ones come from disk, the rest in batches of similar length.

    on_result(index, Completion) is called as each completion is ready (for streaming output);
    with a single prompt to generate, stream(text) also gets its tokens as they come."""
    params.validate()
    results: list[Completion | None] = [None] * len(prompts)
    lengths = [len(prompt_ids(loaded, p, template)) for p in prompts]
    for i, n in enumerate(lengths):  # before any work: a too-long prompt would run for minutes into garbage
        check_fits(loaded, n, params.max_new_tokens, f"prompt {i + 1} ({as_example(prompts[i]).display()[:40]!r})")
    todo = []
    for i, p in enumerate(prompts):
        hit = cache.get(loaded, build_prompt(loaded, p, template), params) if cache is not None else None
        if hit is not None:
            results[i] = Completion(as_example(p).display(), hit["text"], hit["tokens"], hit["finish_reason"],
                                    cached=True)
            if on_result:
                on_result(i, results[i])
        else:
            todo.append(i)
    # Sort by prompt length so each batch pads little; results go back to their original order.
    todo.sort(key=lambda i: lengths[i])
    bar = _progress(len(todo)) if progress and todo else None
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for i, c in zip(chunk, generate_batch(loaded, [prompts[i] for i in chunk], params, template,
                                                   stream if len(prompts) == 1 else None)):
                results[i] = c
                if cache is not None:
                    cache.put(loaded, build_prompt(loaded, prompts[i], template), params,
                              {"text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason})
                if on_result:
                    on_result(i, c)
            if bar:
                bar[0].update(bar[1], advance=len(chunk))
    finally:
        if bar:
            bar[0].stop()
    return results  # type: ignore[return-value]


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from .ui import Progress

    p = Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                 TimeRemainingColumn(), transient=True, label="generate", unit="prompts")
    p.start()
    return p, p.add_task("generate", total=total)


def read_prompts(prompts: list[str], file: str | None) -> list[Example]:
    """Examples from --prompt flags, a .txt (one prompt per line) / .jsonl file (rows as
    `templates.example_from_row` reads them: instruction with its input, messages, prompt, turns), or stdin."""
    out = list(prompts or [])
    if file:
        path = Path(file)
        if file == "-":
            text = sys.stdin.read()
            path = Path("<stdin>")
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise GenerationError(f"prompt file not found: {file}") from None
            except UnicodeDecodeError:
                raise GenerationError(f"{file}: not UTF-8 text") from None
        if path.suffix == ".jsonl":
            from .data.sources import parse_jsonl

            for n, row in parse_jsonl(text, file, GenerationError):
                ex = example_from_row(row) if isinstance(row, dict) else None
                if ex is None:
                    raise GenerationError(f"{file}:{n}: no 'prompt', 'instruction', 'messages' or 'turns' field")
                out.append(ex)
        else:
            out += [line for line in text.splitlines() if line.strip()]
    elif not out and not sys.stdin.isatty():
        out = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not out:
        raise GenerationError("no prompts: give --prompt TEXT, --file FILE (txt or jsonl) or pipe them on stdin")
    return [as_example(p) for p in out]


def add_decoding_args(p, max_new_tokens: int) -> None:
    """The decoding flags `params_from_args` reads, shared by generate and chat."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable; escapes like \\n, \\t, \\uXXXX are understood)")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer prompts with a model, run folder or checkpoint")
    p.add_argument("model", help="model spec (smollm2-135m, folder, .gguf, hub id) or a run folder / checkpoint")
    p.add_argument("--adapter", help="a LoRA adapter (run folder or checkpoint) to apply to MODEL")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", "-f",
                   help="prompts file: .txt one per line, .jsonl with prompt/instruction/turns; - = stdin")
    p.add_argument("--out", help="write results as JSONL here")
    p.add_argument("--template", choices=["alpaca", "chat_template", "plain"],
                   help="prompt template (default: the run's; alpaca for a bare model)")
    add_decoding_args(p, max_new_tokens=128)
    p.add_argument("--system", help="system message (chat_template runs; replaces the run's data.system_prompt)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the generation cache")
    p.add_argument("--show-prompt", action="store_true",
                   help="print each rendered prompt (special tokens shown as ⟦...⟧) before its completion")


def params_from_args(args) -> GenParams:
    return GenParams(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                     top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                     seed=args.seed, stop=[unescape(s) for s in args.stop])


def set_system(loaded, system: str | None) -> None:
    """--system: the system message, through render_prompt's system prompt (only chat templates have one)."""
    if system is None:
        return
    if loaded.template != "chat_template":
        raise GenerationError(f"--system: the {loaded.template} template has no system message (only "
                              f"chat_template renders one; pass --template chat_template for a chat model)")
    loaded.system_prompt = system


def cmd_generate(args) -> int:
    from .cache import Cache
    from .fsutil import atomic_write_text
    from .models import load_for_inference
    from .ui import console

    params = params_from_args(args)
    params.validate()  # before the model loads
    if args.batch_size <= 0:
        raise GenerationError(f"--batch-size must be > 0, got {args.batch_size}")
    prompts = read_prompts(args.prompt, args.file)
    loaded = load_for_inference(args.model, adapter=args.adapter, template=args.template)
    set_system(loaded, args.system)
    cache = None if args.no_cache else Cache()
    t0 = time.perf_counter()
    stream = sys.stdout.isatty() or not args.out or args.show_prompt

    tty = sys.stdout.isatty()
    streamed = []

    def sent(i: int) -> str:  # --show-prompt: exactly the ids the model was sent, special tokens as ⟦...⟧
        from .data.preflight import show_tokens

        return show_tokens(loaded.tokenizer, prompt_ids(loaded, prompts[i]))

    def show(i, c: Completion):
        if streamed:  # its tokens are on the screen already
            print(flush=True)
        elif stream and not tty:
            row = {"index": i, "prompt": c.prompt, **({"rendered_prompt": sent(i)} if args.show_prompt else {}),
                   "completion": c.text}
            print(json.dumps(row, ensure_ascii=False), flush=True)
        elif stream:
            shown = f"\n[{i}] prompt sent:\n{sent(i)}" if args.show_prompt else f"\n[{i}] {c.prompt}"
            print(f"{shown}\n→ {c.text}", flush=True)

    def stream_tokens(piece: str):  # a single prompt on a terminal: token by token
        if not streamed:
            shown = f"prompt sent:\n{sent(0)}" if args.show_prompt else prompts[0].display()
            print(f"\n[0] {shown}\n→ ", end="", flush=True)
        streamed.append(piece)
        print(piece, end="", flush=True)

    results = generate(loaded, prompts, params, batch_size=args.batch_size, cache=cache, on_result=show,
                       progress=not (tty and len(prompts) == 1), stream=stream_tokens if tty else None)
    if args.out:
        rows = [{"prompt": c.prompt, "completion": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason,
                 "model": loaded.name, "template": loaded.template,
                 **{f"param_{k}": v for k, v in params.key().items()}}
                for c in results]
        atomic_write_text(Path(args.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    new = sum(c.tokens for c in results if not c.cached)
    dt = time.perf_counter() - t0
    console.print(f"[dim]{len(results)} completions ({sum(c.cached for c in results)} from cache), "
                  f"{new} new tokens in {dt:.1f} s ({new / dt if dt else 0:.1f} tok/s)[/dim]")
    return 0
