"""Scorers: multiple-choice log-likelihood, generative exact match, perplexity.

Log-likelihoods follow lm-evaluation-harness exactly where it matters for parity: trailing spaces
of the context move to the continuation, the continuation's tokens are taken from tokenizing
context + continuation whole, no BOS is added, and acc_norm divides by the choice's length in
characters. The context is run once per item and its KV cache is shared by all choices.
"""

from __future__ import annotations

import math
import re

import torch

from ..data.templates import Example


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    if not ctx:  # lm-eval uses the end-of-text token as the context of an empty prompt
        ctx = [tok.eos_token_id]
    return ctx, cont


@torch.inference_mode()
def choice_logliks(loaded, context: str, choices: list[str], delimiter: str = " ") -> list[float]:
    """Summed log-probability of each `delimiter + choice` after `context`."""
    model, tok, dev = loaded.model, loaded.tokenizer, loaded.device
    pairs = [encode_pair(tok, context, delimiter + c) for c in choices]
    ctx = pairs[0][0]
    conts = [c for _, c in pairs]
    if any(p[0] != ctx for p in pairs):  # can't share: score each choice on its own
        return [_full_loglik(model, p[0], p[1], dev) for p in pairs]
    out = model(input_ids=torch.tensor([ctx], device=dev), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    lls = [float(first[c[0]]) for c in conts]
    rest = [c[:-1] for c in conts]  # inputs that predict each choice's 2nd..last tokens
    width = max(len(r) for r in rest)
    if width == 0:
        return lls
    n = len(choices)
    cache = getattr(out, "cache", None) or out.past_key_values  # `cache` since transformers 5.2x
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, len(ctx) + width), dtype=torch.long)
    mask[:, : len(ctx)] = 1
    for i, r in enumerate(rest):  # right padding: pads sit after the real tokens and can't affect them
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, len(ctx): len(ctx) + len(r)] = 1
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), cache=cache).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    for i, c in enumerate(conts):
        if len(c) > 1:
            target = torch.tensor(c[1:], device=dev)
            lls[i] += float(logp[i, torch.arange(len(c) - 1, device=dev), target].sum())
    return lls


@torch.inference_mode()
def batch_choice_logliks(loaded, requests: list[tuple[str, list[str], str]], batch_size: int = 16) -> list[list[float]]:
    """choice_logliks for many items at once, as lm-eval batches them: every (context, choice) becomes one
    sequence context + choice[:-1]; an item whose choices are all one token after the same context (MMLU's
    letters) needs only its context (lm-eval's one-token shortcut). Sequences are sorted by length, left-padded
    into batches of `batch_size` with position ids from the mask, and only the last positions' logits are
    computed (`logits_to_keep`), so memory grows with the batch, not with batch x vocabulary x length."""
    model, tok, dev = loaded.model, loaded.tokenizer, loaded.device
    out = [[0.0] * len(choices) for _, choices, _ in requests]
    seqs: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []
    for r, (context, choices, delimiter) in enumerate(requests):
        pairs = [encode_pair(tok, context, delimiter + c) for c in choices]
        if all(p[0] == pairs[0][0] and len(p[1]) == 1 for p in pairs):
            seqs.append((pairs[0][0], [(r, j, p[1]) for j, p in enumerate(pairs)]))
        else:
            seqs += [(ctx + cont[:-1], [(r, j, cont)]) for j, (ctx, cont) in enumerate(pairs)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start:start + batch_size]]
        width = max(len(s) for s, _ in chunk)
        keep = max(len(cont) for _, targets in chunk for _, _, cont in targets)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, (s, _) in enumerate(chunk):
            ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       logits_to_keep=keep).logits
        for b, (_, targets) in enumerate(chunk):
            for r, j, cont in targets:  # the last len(cont) positions predict the continuation's tokens
                n = len(cont)
                logp = torch.log_softmax(logits[b, keep - n:].float(), dim=-1)
                out[r][j] = float(logp[torch.arange(n, device=dev), torch.tensor(cont, device=dev)].sum())
    return out


@torch.inference_mode()
def loglik_greedy(loaded, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's loglikelihood request: the continuation's summed log-probability after the context, and
    whether greedy decoding would have produced exactly its tokens."""
    ctx, cont = encode_pair(loaded.tokenizer, context, continuation)
    dev = loaded.device
    logits = loaded.model(input_ids=torch.tensor([ctx + cont[:-1]], device=dev)).logits[0]
    logp = torch.log_softmax(logits[len(ctx) - 1:].float(), dim=-1)
    target = torch.tensor(cont, device=dev)
    ll = float(logp[torch.arange(len(cont), device=dev), target].sum())
    return ll, bool((logp.argmax(-1) == target).all())


def _full_loglik(model, ctx: list[int], cont: list[int], dev) -> float:
    ids = torch.tensor([ctx + cont[:-1]], device=dev)
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=dev)
    return float(logp[pos, torch.tensor(cont, device=dev)].sum())


def score_choice(lls: list[float], choices: list[str], gold: int) -> dict:
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]
    return {"acc": float(max(range(len(lls)), key=lls.__getitem__) == gold),
            "acc_norm": float(max(range(len(norm)), key=norm.__getitem__) == gold)}


def _normalize_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() else str(f)
    except ValueError:
        return s.lower()


def extract_answer(text: str, regex: str) -> str | None:
    """The last match of `regex` in the output (flexible extraction); a group that matched wins."""
    matches = re.findall(regex, text)
    if not matches:
        return None
    m = matches[-1]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "")
    return m


def exact_match(output: str, target: str, regex: str) -> float:
    got = extract_answer(output, regex)
    return float(got is not None and _normalize_number(got) == _normalize_number(target))


@torch.inference_mode()
def response_nll(loaded, prompt: str | Example, response: str) -> tuple[float, int]:
    """Summed negative log-likelihood of response + EOS after the templated prompt (a user prompt or
    a whole example, sent as `generate` sends it), and its token count."""
    from ..generate import prompt_ids

    tok = loaded.tokenizer
    p = prompt_ids(loaded, prompt)
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ll = _full_loglik(loaded.model, p, r, loaded.device)
    return -ll, len(r)


@torch.inference_mode()
def text_nll(loaded, text: str, max_len: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood of a plain text (no template) and its token count.

    Like lm-eval's loglikelihood_rolling: the first token is predicted from the end-of-text token,
    and a text longer than the model's window is cut into disjoint windows, each conditioned on
    the one token before it (hand-written: transformers has no rolling scorer)."""
    tok, model = loaded.tokenizer, loaded.model
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return 0.0, 0
    window = max_len or min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    full = [tok.eos_token_id] + ids
    nll = 0.0
    for start in range(0, len(ids), window):
        nll -= _full_loglik(model, [full[start]], ids[start:start + window], loaded.device)
    return nll, len(ids)


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / max(1, tokens))


def macro_f1(gold: list[int], pred: list[int]) -> float:
    """Macro-averaged F1 over the labels seen in gold or pred, 0 for a label without true positives: what
    sklearn's f1_score(average="macro") gives (lm-eval's kobest metric). Written out because scikit-learn is
    not a tunelab dependency and this is six lines."""
    labels = sorted(set(gold) | set(pred))
    f1s = []
    for c in labels:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0
