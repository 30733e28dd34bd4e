"""Parity report of an export (issue 17.1): does every written artefact behave as the adapter model did?

Probe set: the run's own held-out rows (data.test_size / data.eval_path; `--probe-rows`, 32 by
default), tokenized exactly as training tokenized them (data/pipeline.prepare: the run's template,
system prompt and EOS). Without held-out rows the last training rows are used, and without the
data the three fixed verification prompts (greedy agreement only). Each model is compared with the
adapter model (the reference) on

- log-likelihood: the per-token log-probability of every trained (reference answer) token; max and
  mean absolute difference from the adapter's;
- greedy agreement: greedy continuations of each prompt (`tokens` new tokens), how many are
  identical, and the earliest position at which one diverges.

Thresholds are per step (THRESHOLDS): the merged model saved in float32 must match to float
rounding; 16-bit saves and f16 GGUF round every weight, q8_0 quantises them, so they get looser
bounds. The GGUF is read back through transformers' GGUF loader (de-quantised weights, torch
kernels), not run in llama.cpp: it checks the file's weights, names, q/k order and vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# step -> (max |d logp| bound or None, mean |d logp| bound, least share of identical greedy continuations)
THRESHOLDS = {
    "merged (float32)": (1e-4, 1e-5, 1.0),
    "merged (16-bit)": (None, 0.05, 0.75),
    "gguf f16": (None, 0.05, 0.75),
    "gguf q8_0": (None, 0.15, 0.5),
    # the GGUF run in llama.cpp itself (tunelab/llamacpp.py): its kernels and f16 KV cache round more
    "llama.cpp f16": (None, 0.05, 0.75),
    "llama.cpp q8_0": (None, 0.15, 0.5),
}


@dataclass
class Probe:
    ids: list[int]
    labels: list[int] | None  # None: no reference answer (the fixed verification prompts)
    prompt_len: int


@dataclass
class StepResult:
    step: str
    rows: int
    max_abs_dlogp: float | None
    mean_abs_dlogp: float | None
    greedy_identical: int
    first_divergence: int | None
    passed: bool
    bounds: str


def probe_set(run, cfg, tok, n: int) -> tuple[list[Probe], str]:
    """(probes, where they came from); `cfg` is the run's typed RunConfig (rundir.run_config)."""
    try:
        from .data.pipeline import prepare

        rc = cfg
        train, evals, _, _ = prepare(rc.data, tok, base=run)
        rows, source = (evals, "held-out rows") if evals else (train[-n:], "last training rows (no held-out set)")
        return [Probe(list(r.input_ids), list(r.labels), r.prompt_len) for r in rows[:n]], source
    except Exception as e:  # the data moved or can't be read: parity on the fixed prompts (greedy only)
        from .export import VERIFY_PROMPTS, verify_prompt_ids

        ids = verify_prompt_ids(tok, cfg.data.template, cfg.data.system_prompt)
        return ([Probe(x, None, len(x)) for x in ids],
                f"{len(VERIFY_PROMPTS)} fixed prompts (run data unavailable: {str(e).splitlines()[0][:80]})")


@torch.inference_mode()
def measure(model, tok, probes: list[Probe], tokens: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """(per-token log-probabilities of each probe's trained tokens, greedy continuation of each prompt)."""
    dev = next(model.parameters()).device
    lls, gens = [], []
    for p in probes:
        if p.labels is not None:
            x = torch.tensor([p.ids], device=dev)
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            y = torch.tensor(p.labels[1:], device=dev)
            keep = y != -100
            lls.append(logp[keep].gather(-1, y[keep][:, None])[:, 0].cpu())
        x = torch.tensor([p.ids[:p.prompt_len]], device=dev)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, temperature=None,
                             top_p=None, top_k=None)
        gens.append(out[0, x.shape[1]:].tolist())
    return lls, gens


def compare(step: str, ref, got) -> StepResult:
    (ref_ll, ref_gen), (ll, gen) = ref, got
    diffs = torch.cat([(a - b).abs() for a, b in zip(ref_ll, ll)]) if ref_ll else torch.empty(0)
    mx = float(diffs.max()) if diffs.numel() else None
    mean = float(diffs.mean()) if diffs.numel() else None
    same, first = 0, None
    for a, b in zip(ref_gen, gen):
        if a == b:
            same += 1
            continue
        k = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
        first = k if first is None else min(first, k)
    bmax, bmean, bshare = THRESHOLDS[step]
    ok = (same >= bshare * len(ref_gen)
          and (mx is None or bmax is None or mx <= bmax) and (mean is None or mean <= bmean))
    bounds = (f"{'max<=%g, ' % bmax if bmax is not None else ''}mean<={bmean:g}, "
              f"identical>={100 * bshare:.0f}%")
    return StepResult(step, len(ref_gen), mx, mean, same, first, ok, bounds)


def table(results: list[StepResult], source: str) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2e}"

    lines = [f"parity vs the adapter model on {results[0].rows if results else 0} probes ({source}):",
             f"{'step':<18} {'max|dlogp|':>10} {'mean|dlogp|':>11} {'greedy same':>11} {'1st diverge':>11}  "
             f"result (bounds)"]
    for r in results:
        lines.append(f"{r.step:<18} {f(r.max_abs_dlogp):>10} {f(r.mean_abs_dlogp):>11} "
                     f"{f'{r.greedy_identical}/{r.rows}':>11} "
                     f"{'-' if r.first_divergence is None else r.first_divergence:>11}"
                     f"  {'ok' if r.passed else 'FAIL'} ({r.bounds})")
    return "\n".join(lines)


def report(results: list[StepResult], source: str, tokens: int) -> dict:
    return {"probe_source": source, "greedy_tokens": tokens, "thresholds": {k: list(v) for k, v in THRESHOLDS.items()},
            "steps": [asdict(r) for r in results], "passed": all(r.passed for r in results)}
