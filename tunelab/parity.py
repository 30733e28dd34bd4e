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

`tunelab serve` of the export is a step too: a real server (serve.open_server, what `tunelab serve
EXPORT` runs) on a free local port, sent every probe prompt as token ids over HTTP (/v1/completions,
temperature 0); its text is compared with the adapter model's greedy continuation decoded as generate
decodes it. Its log-likelihood columns are n/a: the server answers `logprobs` with a 400 (it has no
honest way to return them), so only greedy agreement is measured there.

Exact match, when the run has a task (its config's eval.tasks or `export --task FILE`; generation
tasks only): each step (adapter, merged, each GGUF, serve) answers the task's first items greedily,
scored as `tunelab eval` scores them; a step fails when its exact match is more than EXACT_MATCH_DROP
below the adapter model's.
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
    "serve (float32)": (None, None, 1.0),  # no log-probabilities through serve (see the module doc)
    "serve (16-bit)": (None, None, 0.75),
    # the GGUF run in llama.cpp itself (tunelab/llamacpp.py): its kernels and f16 KV cache round more
    "llama.cpp f16": (None, 0.05, 0.75),
    "llama.cpp q8_0": (None, 0.15, 0.5),
}
# step -> the most its exact match may fall below the adapter model's (a share, 0..1)
EXACT_MATCH_DROP = {"merged (float32)": 0.0, "merged (16-bit)": 0.05, "gguf f16": 0.05, "gguf q8_0": 0.10,
                    "serve (float32)": 0.0, "serve (16-bit)": 0.05,
                    "llama.cpp f16": 0.05, "llama.cpp q8_0": 0.10}  # llama.cpp steps: exact match not scored yet
SERVE_LOGLIK_NOTE = "log-likelihood n/a: serve answers logprobs with a 400 (not returned, so not compared)"


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
    exact_match: dict | None = None  # task -> share of exact matches (None: the run has no task)
    note: str | None = None


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


def compare(step: str, ref, got, ref_em: dict | None = None, em: dict | None = None,
            same_first: tuple[int, int | None] | None = None, note: str | None = None) -> StepResult:
    """`ref`/`got`: (log-likelihoods, greedy ids) as `measure` returns them; `same_first` instead of the
    greedy ids where the step's continuations are texts (serve: `compare_texts`); `ref_em`/`em`: exact
    match per task of the adapter model and of this step."""
    (ref_ll, ref_gen), (ll, gen) = ref, got
    diffs = torch.cat([(a - b).abs() for a, b in zip(ref_ll, ll)]) if ref_ll and ll else torch.empty(0)
    mx = float(diffs.max()) if diffs.numel() else None
    mean = float(diffs.mean()) if diffs.numel() else None
    if same_first is not None:
        same, first = same_first
    else:
        same, first = 0, None
        for a, b in zip(ref_gen, gen):
            if a == b:
                same += 1
                continue
            k = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
            first = k if first is None else min(first, k)
    bmax, bmean, bshare = THRESHOLDS[step]
    drop = EXACT_MATCH_DROP[step]
    # a task this step could not be asked (serve: settings with no OpenAI field) is n/a with a note, not a failure
    em_ok = all(ref_em[t] - em[t] <= drop + 1e-9 for t in ref_em or {} if em is not None and t in em)
    ok = (same >= bshare * len(ref_gen) and em_ok
          and (mx is None or bmax is None or mx <= bmax) and (mean is None or bmean is None or mean <= bmean))
    bounds = ", ".join(b for b in (f"max<={bmax:g}" if bmax is not None else "",
                                   f"mean<={bmean:g}" if bmean is not None else "",
                                   f"identical>={100 * bshare:.0f}%",
                                   f"exact match>=adapter-{100 * drop:g}pt" if ref_em else "") if b)
    return StepResult(step, len(ref_gen), mx, mean, same, first, ok, bounds, em, note)


def reference_texts(tok, gens: list[list[int]]) -> list[str]:
    """The adapter's greedy continuations as text, decoded as the decoding core decodes a reply
    (up to EOS, special tokens skipped, no trailing incomplete character)."""
    from .decode import decode_whole

    return [decode_whole(tok, g[:g.index(tok.eos_token_id)] if tok.eos_token_id in g else g) for g in gens]


def compare_texts(tok, ref_gens: list[list[int]], texts: list[str]) -> tuple[int, int | None]:
    """(identical continuations, first divergence) of text continuations against the adapter's greedy
    ids; the divergence is counted in the adapter's tokens: how many of them the text still agrees with."""
    from .decode import decode_whole

    same, first = 0, None
    for g, want, got in zip(ref_gens, reference_texts(tok, ref_gens), texts):
        if got == want:
            same += 1
            continue
        k = 0
        while k < len(g) and got.startswith(decode_whole(tok, g[:k + 1])):
            k += 1
        first = k if first is None else min(first, k)
    return same, first


# ---- exact match (a run with a task) ---------------------------------------------------------------


@dataclass
class TaskProbe:
    name: str
    task: object  # evaluate.tasks.Task
    items: list
    params: object  # generate.GenParams, as `tunelab eval` decodes the task


def task_probes(names: list[str], files: list[str], n: int) -> tuple[list[TaskProbe], list[str]]:
    """(generation tasks to score, notes on the ones left out): the run's eval.tasks that can be loaded
    here (a task whose data is missing is a note, not an error) and every --task FILE (errors are)."""
    from .evaluate.harness import resolve_tasks
    from .evaluate.tasks import TaskError
    from .generate import GenParams

    out, notes = [], []
    for name, strict in [(x, False) for x in names] + [(x, True) for x in files]:
        try:
            tasks = resolve_tasks(name)
        except TaskError as e:
            if strict:
                raise
            notes.append(f"task {name} left out: {str(e).splitlines()[0][:120]}")
            continue
        for t in tasks:
            if t.kind != "generate":
                notes.append(f"task {t.name} left out: a {t.kind} task has no exact match")
                continue
            lm = t.lm_eval or {}
            params = GenParams(max_new_tokens=t.max_new_tokens, stop=list(t.stop), **lm.get("sampling", {}))
            out.append(TaskProbe(t.name, t, t.with_fewshot(None)[:n], params))
    return out, notes


def task_prompt_texts(loaded, tp: TaskProbe) -> list[str]:
    """The prompt texts `tunelab eval` sends for the task's items (plain, or the run's template)."""
    from .generate import build_prompt

    return [build_prompt(loaded, it.context, None if tp.task.template == "model" else "plain") for it in tp.items]


def score_outputs(tp: TaskProbe, texts: list[str]) -> float:
    """Exact match of `texts` on the task's items, scored as `tunelab eval` scores them."""
    from .evaluate import scoring

    t, lm = tp.task, tp.task.lm_eval
    if lm is None:
        vals = [scoring.exact_match(x, it.target, t.regex) for x, it in zip(texts, tp.items)]
    else:  # an lm-eval task file: its first filter pipeline (the one `tunelab eval` reports first)
        from .evaluate.lmeval import apply_filter, exact_match

        steps = (lm["filters"] or [("none", [])])[0][1]
        vals = [exact_match(apply_filter(x, steps), it.target, **lm["em"]) for x, it in zip(texts, tp.items)]
    return sum(vals) / len(vals) if vals else 0.0


def model_exact_match(model, tok, template: str, system_prompt: str | None, tps: list[TaskProbe]) -> dict | None:
    """Exact match per task of an in-process model, through `tunelab generate`'s own path."""
    from types import SimpleNamespace

    from .generate import generate

    if not tps:
        return None
    loaded = SimpleNamespace(model=model, tokenizer=tok, template=template, system_prompt=system_prompt,
                             device=str(next(model.parameters()).device))
    out = {}
    for tp in tps:
        got = generate(loaded, [it.context for it in tp.items], tp.params, cache=None,
                       template=None if tp.task.template == "model" else "plain")
        out[tp.name] = score_outputs(tp, [c.text for c in got])
    return out


def serve_step(folder, tok, probes: list[Probe], ref_gens: list[list[int]], tokens: int, template: str,
               system_prompt: str | None, tps: list[TaskProbe], ref_em: dict | None) -> StepResult:
    """`tunelab serve` of the export in `folder`: a real server on a free local port, probes sent as
    token ids over HTTP, greedy (temperature 0); exact match through the same server."""
    import json
    import threading
    import urllib.request
    from types import SimpleNamespace

    from .serve import open_server

    limit = max([tokens] + [tp.params.max_new_tokens for tp in tps])
    httpd, srv = open_server(str(folder), port=0, name="export", max_tokens_limit=limit,
                             max_prompt_tokens=1 << 30, window=0.0)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def complete(body: dict) -> str:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["choices"][0]["text"]

    try:
        texts = [complete({"prompt": p.ids[:p.prompt_len], "max_tokens": tokens, "temperature": 0}) for p in probes]
        em, notes = {}, [SERVE_LOGLIK_NOTE]
        run = SimpleNamespace(tokenizer=tok, template=template, system_prompt=system_prompt)
        for tp in tps:
            p = tp.params
            if len(p.stop) > 4 or p.top_k is not None or p.repetition_penalty is not None:
                notes.append(f"exact match on {tp.name} n/a: its decoding settings have no OpenAI request field")
                continue
            body = {"max_tokens": p.max_new_tokens, "temperature": (p.temperature or 1.0) if p.do_sample else 0,
                    "seed": p.seed, **({"stop": p.stop} if p.stop else {}),
                    **({"top_p": p.top_p} if p.do_sample and p.top_p is not None else {})}
            em[tp.name] = score_outputs(tp, [complete({**body, "prompt": x}) for x in task_prompt_texts(run, tp)])
    finally:
        srv.engine.stopped = True
        httpd.shutdown()
        httpd.server_close()
    from pathlib import Path

    cfg = json.loads((Path(folder) / "config.json").read_text())  # the saved weights' dtype, not the loaded one
    step = "serve (float32)" if (cfg.get("dtype") or cfg.get("torch_dtype") or "float32") == "float32" \
        else "serve (16-bit)"
    return compare(step, ([], ref_gens), ([], None), ref_em, em if tps else None,
                   same_first=compare_texts(tok, ref_gens, texts), note="; ".join(notes))


def table(results: list[StepResult], source: str, ref_em: dict | None = None, notes: list[str] = ()) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.2e}"

    def em(d):
        return "-" if d is None else " ".join(f"{100 * v:.0f}%" for v in d.values()) or "n/a"

    lines = [f"parity vs the adapter model on {results[0].rows if results else 0} probes ({source}):"]
    if ref_em:
        lines.append("exact match of the adapter model: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in ref_em.items()))
    lines.append(f"{'step':<18} {'max|dlogp|':>10} {'mean|dlogp|':>11} {'greedy same':>11} {'1st diverge':>11} "
                 f"{'exact match':>11}  result (bounds)")
    for r in results:
        lines.append(f"{r.step:<18} {f(r.max_abs_dlogp):>10} {f(r.mean_abs_dlogp):>11} "
                     f"{f'{r.greedy_identical}/{r.rows}':>11} "
                     f"{'-' if r.first_divergence is None else r.first_divergence:>11} {em(r.exact_match):>11}"
                     f"  {'ok' if r.passed else 'FAIL'} ({r.bounds})")
    lines += [f"  {r.step}: {r.note}" for r in results if r.note] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def report(results: list[StepResult], source: str, tokens: int, ref_em: dict | None = None,
           tps: list[TaskProbe] = (), notes: list[str] = ()) -> dict:
    return {"probe_source": source, "greedy_tokens": tokens, "thresholds": {k: list(v) for k, v in THRESHOLDS.items()},
            "exact_match": {"adapter": ref_em, "items": {tp.name: len(tp.items) for tp in tps},
                            "max_drop": EXACT_MATCH_DROP} if ref_em else None,
            "notes": list(notes), "steps": [asdict(r) for r in results], "passed": all(r.passed for r in results)}
