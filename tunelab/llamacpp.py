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

llama.cpp runs in a child process (`python -m tunelab.llamacpp SPEC OUT`, numpy only, no torch): a
crash in native code (ggml's AMX kernels segfault on q8_0 on this project's Sapphire Rapids machine,
llama.cpp issue #20824) is then a failed step with its signal, not a dead export.

llama-cpp-python is published on PyPI as a source distribution only: installing it compiles
llama.cpp (cmake and a C++ compiler, minutes). It is the optional extra `tunelab[llamacpp]`; when it
is not importable the steps are skipped and the report says why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INSTALL_HINT = ("pip install 'tunelab[llamacpp]' (llama-cpp-python: compiles llama.cpp from source, needs cmake "
                "and a C++ compiler, takes minutes)")


def unavailable() -> str | None:
    """None when llama_cpp is installed, else why the llama.cpp steps are skipped. Only looked up here: the
    native library is loaded in the child process alone (a broken build fails the step there, with its error)."""
    from importlib.util import find_spec

    if find_spec("llama_cpp") is None:
        return f"llama_cpp is not installed; {INSTALL_HINT}"
    return None


def context_for(probes, tokens: int) -> int:
    """A context that holds the longest probe and its greedy continuation."""
    need = max([len(p.ids) for p in probes] + [p.prompt_len + tokens for p in probes]) + 8
    return int(-(-need // 64) * 64)


class LlamaCppFailed(RuntimeError):
    pass


def run(path: Path, probes, tokens: int, tok, n_threads: int | None = None, timeout: float = 3600) -> dict:
    """Run the GGUF at `path` in llama.cpp on the probes, in a child process. Returns
    {"lls": [[logp of each trained token] per probe with labels], "gens": [greedy ids per probe],
     "tokenize_bad": [probe indices whose text llama.cpp tokenizes differently], "eos": llama.cpp's EOS id,
     "greedy_seconds", "greedy_tokens"}; raises LlamaCppFailed (one line) when llama.cpp fails or dies."""
    import torch

    texts, want = [], []
    for p in probes:  # the probe's prompt and answer as text; specials (<|im_start|>, EOS) parsed as specials
        text = tok.decode(p.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        texts.append(text)
        want.append(tok(text, add_special_tokens=False)["input_ids"])
    threads = n_threads or max(1, min(8, torch.get_num_threads(), os.cpu_count() or 1))
    spec = {"path": str(path), "n_ctx": context_for(probes, tokens), "threads": threads, "tokens": tokens,
            "eos": tok.eos_token_id, "texts": texts, "want": want,
            "probes": [{"ids": list(p.ids), "labels": None if p.labels is None else list(p.labels),
                        "prompt_len": p.prompt_len} for p in probes]}
    with tempfile.TemporaryDirectory(prefix="tunelab_llamacpp_") as d:
        (Path(d) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        try:
            cp = subprocess.run([sys.executable, "-m", "tunelab.llamacpp", f"{d}/spec.json", f"{d}/out.json"],
                                capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise LlamaCppFailed(f"llama.cpp did not finish within {timeout:.0f} s") from None
        if cp.returncode != 0 or not (Path(d) / "out.json").is_file():
            rc = cp.returncode
            why = (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}")
            last = (cp.stderr.strip().splitlines() or [""])[-1][:160]
            raise LlamaCppFailed(f"llama.cpp {why} on {Path(path).name}" + (f": {last}" if last else ""))
        return json.loads((Path(d) / "out.json").read_text())


def as_measurement(out: dict):
    """run()'s output as parity.measure's pair (log-probabilities as tensors, greedy ids)."""
    import torch

    return [torch.tensor(x, dtype=torch.float32) for x in out["lls"]], out["gens"]


def _child(spec_path: str, out_path: str) -> None:
    """In the child: load the GGUF with every position's logits kept (log-likelihoods need them), llama.cpp's
    defaults otherwise (f16 KV cache, its CPU kernels), as a llama.cpp user gets it."""
    from llama_cpp import Llama

    spec = json.loads(Path(spec_path).read_text())
    llm = Llama(model_path=spec["path"], n_ctx=spec["n_ctx"], n_batch=min(spec["n_ctx"], 512), logits_all=True,
                seed=0, n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)
    bad = [i for i, (text, want) in enumerate(zip(spec["texts"], spec["want"]))
           if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != want]
    lls, gens, spent, produced = [], [], 0.0, 0
    for p in spec["probes"]:
        ids, labels = p["ids"], p["labels"]
        if labels is not None:
            llm.reset()
            llm.eval(ids)
            z = np.array(llm.scores[:len(ids) - 1], dtype=np.float64)
            m = z.max(-1, keepdims=True)
            logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))  # log-softmax, as parity.measure
            y = np.array(labels[1:])
            keep = np.nonzero(y != -100)[0]
            lls.append(logp[keep, y[keep]].tolist())
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(ids[:p["prompt_len"]])
        out: list[int] = []
        while len(out) < spec["tokens"]:  # greedy: argmax, stop after EOS (kept, as generate keeps it)
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if nxt == spec["eos"] or len(out) == spec["tokens"]:
                break
            llm.eval([nxt])
        spent += time.perf_counter() - t0
        produced += len(out)
        gens.append(out)
    eos = llm.token_eos()
    llm.close()
    Path(out_path).write_text(json.dumps({"lls": lls, "gens": gens, "tokenize_bad": bad, "eos": eos,
                                          "greedy_seconds": spent, "greedy_tokens": produced}))


def run_step(path: Path, kind: str, ref, probes, tokens: int, tok):
    """The parity step "llama.cpp KIND" against the reference measurement `ref` (parity.measure's pair),
    and a note for the report. A GGUF llama.cpp cannot load or run, whose text llama.cpp tokenizes
    differently from transformers, or whose EOS differs, fails the step."""
    from .parity import THRESHOLDS, StepResult, compare

    step = f"llama.cpp {kind}"
    try:
        out = run(path, probes, tokens, tok)
    except LlamaCppFailed as e:
        bshare = THRESHOLDS[step][2]
        return (StepResult(step, len(probes), None, None, 0, 0, False, f"identical>={100 * bshare:.0f}%"),
                f"{step}: FAIL: {e}")
    result = compare(step, ref, as_measurement(out))
    bad = out["tokenize_bad"]
    note = (f"{step}: llama.cpp tokenizes {len(probes) - len(bad)}/{len(probes)} probe texts as transformers does"
            + (f" (first differing probe: #{bad[0]})" if bad else ""))
    if out["eos"] != tok.eos_token_id:
        note += f"; its EOS id is {out['eos']}, transformers' {tok.eos_token_id}"
    if bad or out["eos"] != tok.eos_token_id:
        result.passed = False
    return result, note


def steps(path: Path, kind: str, ref, probes, tokens: int, tok):
    """([the llama.cpp step] or [] when llama_cpp is missing, a note for the report)."""
    why = unavailable()
    if why:
        return [], f"llama.cpp {kind}: skipped: {why}"
    result, note = run_step(path, kind, ref, probes, tokens, tok)
    return [result], note


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
