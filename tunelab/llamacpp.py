"""The written GGUF run in llama.cpp itself (issue 17.4), through llama-cpp-python.

The parity steps "gguf f16"/"gguf q8_0" read the file back with transformers' GGUF loader (weights
de-quantised to float32, torch kernels): they check the file's weights, names and q/k order. What a
user of llama.cpp / Ollama / LM Studio actually runs differs in three more ways, which only
llama.cpp can check: its own tokenizer (driven by the GGUF's vocabulary and `tokenizer.ggml.pre`
metadata), its kernels (f16 or q8_0 dot products, an f16 KV cache) and its decoding. The steps
"llama.cpp f16"/"llama.cpp q8_0" load the GGUF with llama_cpp.Llama and measure the same two things
as every other step (parity.measure): the per-token log-likelihood of each probe's trained tokens,
from llama.cpp's own logits, and the greedy continuation of each prompt (argmax until EOS, as
transformers' greedy generate); plus a tokenizer check (llama.cpp's tokenize of each probe's text
equals transformers').

llama-cpp-python is published on PyPI as a source distribution only: installing it compiles
llama.cpp (cmake and a C++ compiler, minutes). It is the optional extra `tunelab[llamacpp]`; when it
is not importable the steps are skipped and the report says why.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = ("pip install 'tunelab[llamacpp]' (llama-cpp-python: compiles llama.cpp from source, needs cmake "
                "and a C++ compiler, takes minutes)")


def unavailable() -> str | None:
    """None when llama_cpp imports, else why not (the reason a skipped step states)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or a built library that fails to load (OSError)
        return f"llama_cpp is not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]}); {INSTALL_HINT}"
    return None


def load(path: Path, n_ctx: int, n_threads: int | None = None):
    """A GGUF in llama.cpp with every position's logits kept (log-likelihoods need them), fixed seed,
    llama.cpp's defaults otherwise (f16 KV cache, its CPU kernels), as a llama.cpp user gets it."""
    from llama_cpp import Llama

    threads = n_threads or max(1, min(8, torch.get_num_threads(), os.cpu_count() or 1))
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, seed=0,
                 n_threads=threads, n_threads_batch=threads, verbose=False)


def context_for(probes, tokens: int) -> int:
    """A context that holds the longest probe and its greedy continuation."""
    need = max([len(p.ids) for p in probes] + [p.prompt_len + tokens for p in probes]) + 8
    return int(-(-need // 64) * 64)


def _logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`, evaluated from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def measure(llm, probes, tokens: int, eos_token_id: int | None,
            timing: dict | None = None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """parity.measure for llama.cpp: (per-token log-probabilities of each probe's trained tokens,
    greedy continuation of each prompt). Greedy is argmax of llama.cpp's logits, stopping after EOS
    (the EOS id is kept, as in transformers' generate output). `timing`, when given, gets the greedy
    tokens produced and the seconds spent producing them."""
    lls, gens = [], []
    spent, produced = 0.0, 0
    for p in probes:
        if p.labels is not None:
            logp = torch.log_softmax(torch.from_numpy(_logits(llm, p.ids)[:-1]).float(), -1)
            y = torch.tensor(p.labels[1:])
            keep = y != -100
            lls.append(logp[keep].gather(-1, y[keep][:, None])[:, 0])
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(p.ids[:p.prompt_len])
        out: list[int] = []
        for _ in range(tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if nxt == eos_token_id or len(out) == tokens:
                break
            llm.eval([nxt])
        spent += time.perf_counter() - t0
        produced += len(out)
        gens.append(out)
    if timing is not None:
        timing.update(seconds=spent, tokens=produced)
    return lls, gens


def tokenizer_mismatches(llm, tok, probes) -> list[int]:
    """Indices of probes whose text llama.cpp tokenizes differently from transformers. The text is each
    probe's prompt and answer decoded; special tokens in it (<|im_start|>, the EOS) are parsed as
    specials by both, as transformers does by default."""
    bad = []
    for i, p in enumerate(probes):
        text = tok.decode(p.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        want = tok(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if list(got) != list(want):
            bad.append(i)
    return bad


def run_step(path: Path, kind: str, ref, probes, tokens: int, tok):
    """The parity step "llama.cpp KIND" against the reference measurement `ref` (parity.measure's pair),
    and a note on the tokenizer check. A GGUF llama.cpp cannot load, or whose text llama.cpp tokenizes
    differently from transformers, fails the step."""
    from .parity import THRESHOLDS, StepResult, compare

    step = f"llama.cpp {kind}"
    try:
        llm = load(path, context_for(probes, tokens))
    except Exception as e:  # llama.cpp refuses the file: that is what this step is for
        bmax, bmean, bshare = THRESHOLDS[step]
        return (StepResult(step, len(probes), None, None, 0, 0, False, f"identical>={100 * bshare:.0f}%"),
                f"{step}: llama.cpp does not load {path.name} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    try:
        bad = tokenizer_mismatches(llm, tok, probes)
        result = compare(step, ref, measure(llm, probes, tokens, tok.eos_token_id))
    finally:
        llm.close()
    note = (f"{step}: llama.cpp tokenizes {len(probes) - len(bad)}/{len(probes)} probe texts as transformers does"
            + (f" (first differing probe: #{bad[0]})" if bad else ""))
    if bad:
        result.passed = False
    return result, note


def steps(path: Path, kind: str, ref, probes, tokens: int, tok):
    """([the llama.cpp step] or [] when llama_cpp is missing, a note for the report)."""
    why = unavailable()
    if why:
        return [], f"llama.cpp {kind}: skipped: {why}"
    result, note = run_step(path, kind, ref, probes, tokens, tok)
    return [result], note
