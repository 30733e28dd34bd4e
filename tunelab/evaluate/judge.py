"""`tunelab judge DIR`: LLM-as-a-judge over a compare folder.

The judge is any model tunelab can load, or an OpenAI-compatible endpoint (URL + model; the API
key only from an environment variable). Pairwise mode asks in both orders, as FastChat's MT-Bench
does: a verdict that flips with the order counts as a tie. Single mode grades each answer 1-10.
Unparsable output is retried (sampling on retries for a local judge) and then recorded as an
error, never guessed. Every judgement is cached, so an interrupted run resumes.
Win rates come with a bootstrap CI and a length-controlled figure (AlpacaEval's idea: a logistic
model of the outcome on the answers' length difference; the win rate at equal length).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..cache import Cache, model_fingerprint
from ..config import ConfigError
from ..fsutil import atomic_write_text
from ..ui import console
from .compare import load_pairs
from .stats import bootstrap_ci, paired_diff_ci, win_rate

# Prompts in the style of MT-Bench's judge prompts (FastChat), worded for tunelab.
SYSTEM_PAIR = (
    "You are an impartial judge. Compare the two AI assistants' answers to the user's question below and decide "
    "which one answers it better. Consider helpfulness, relevance, accuracy, depth and level of detail. The order "
    "of the answers and their length must not influence you. Explain briefly, then give your verdict strictly as "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, or \"[[C]]\" for a tie."
)
USER_PAIR = ("[User Question]\n{question}\n\n"
             "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]"
             "\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
SYSTEM_SINGLE = (
    "You are an impartial judge. Rate the quality of the AI assistant's answer to the user's question below. "
    "Consider helpfulness, relevance, accuracy, depth and level of detail. Explain briefly, then rate the answer "
    "from 1 to 10 strictly in this format: \"Rating: [[5]]\"."
)
USER_SINGLE = "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
PAIR_RE = re.compile(r"\[\[(A|B|C)\]\]")
SINGLE_RE = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


class JudgeError(ConfigError):
    """The judge can't be reached or answers garbage at the protocol level (one line, exit 2)."""


class HttpJudge:
    def __init__(self, url: str, model: str, api_key_env: str | None, timeout: float = 120):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.timeout = model, timeout
        self.key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.key:
            raise JudgeError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
        self.identity = f"http:{self.url}:{model}"

    def __call__(self, system: str, user: str, attempt: int) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "system", "content": system},
                                                             {"role": "user", "content": user}],
                           "temperature": 0.0 if attempt == 0 else 0.7, "max_tokens": 512}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise JudgeError(f"judge endpoint {self.url} answered HTTP {e.code}; "
                             f"judgements so far are cached") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise JudgeError(f"judge endpoint {self.url} unreachable ({reason}); "
                             f"judgements so far are cached") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url} did not return OpenAI chat JSON "
                             f"(got {raw[:80]!r}); judgements so far are cached") from None


class LocalJudge:
    def __init__(self, spec: str, max_new_tokens: int = 256):
        from ..models import load_for_inference

        self.loaded = load_for_inference(spec)
        self.max_new_tokens = max_new_tokens
        self.identity = f"local:{model_fingerprint(self.loaded)}"

    def __call__(self, system: str, user: str, attempt: int) -> str:
        from ..data.templates import encode_prompt
        from ..generate import GenParams, generate_batch

        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                           tokenize=False, add_generation_prompt=True)
        else:
            text = f"{system}\n\n{user}\n\n"
        encode_prompt(tok, text)  # fail early on a tokenizer problem
        params = GenParams(max_new_tokens=self.max_new_tokens, do_sample=attempt > 0,
                           temperature=0.7 if attempt else None, seed=attempt)
        return generate_batch(self.loaded, [text], params, template="plain")[0].text


def ask(judge, cache: Cache, system: str, user: str, pattern: re.Pattern, retries: int):
    """(parsed verdict or None, raw outputs). Each attempt is cached on its own."""
    raws = []
    for attempt in range(retries + 1):
        key = Cache.key("judge", judge.identity, system, user, attempt)
        raw = cache.get_raw(key)
        if raw is None:
            raw = judge(system, user, attempt)
            cache.put_raw(key, "judge", raw)
        raws.append(raw)
        found = pattern.findall(raw)
        if found:
            return found[-1], raws
    return None, raws


def length_controlled(outcomes, len_diff, n_boot: int = 500, seed: int = 0) -> dict:
    """Logistic regression of B's outcome on tanh(length difference / sd); LC win rate = sigmoid(intercept)."""
    y, d = np.asarray(outcomes, float), np.asarray(len_diff, float)
    sd = d.std() or 1.0
    x = np.tanh(d / sd)

    def fit(yy, xx):
        w = np.zeros(2)
        X = np.stack([np.ones_like(xx), xx], 1)
        for _ in range(50):  # Newton steps with a small ridge, so separable data stays finite
            p = 1 / (1 + np.exp(-X @ w))
            g = X.T @ (p - yy) + 1e-2 * w
            H = X.T @ (X * (p * (1 - p))[:, None]) + 1e-2 * np.eye(2)
            w -= np.linalg.solve(H, g)
        return w

    w = fit(y, x)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        boots.append(1 / (1 + np.exp(-fit(y[i], x[i])[0])))
    lc = float(1 / (1 + np.exp(-w[0])))
    return {"lc_win_rate": [lc, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "length_coef": float(w[1]), "mean_len_diff_chars": float(d.mean())}


def judge_pairwise(judge, rows, cache, retries: int, progress=None) -> dict:
    items = []
    for r in rows:
        v1, raw1 = ask(judge, cache, SYSTEM_PAIR, USER_PAIR.format(question=r["prompt"], a=r["a"], b=r["b"]),
                       PAIR_RE, retries)
        v2, raw2 = ask(judge, cache, SYSTEM_PAIR, USER_PAIR.format(question=r["prompt"], a=r["b"], b=r["a"]),
                       PAIR_RE, retries)
        consistent = False
        if v1 is None or v2 is None:
            winner = "error"
        else:
            w1 = {"A": "a", "B": "b", "C": "tie"}[v1]
            w2 = {"A": "b", "B": "a", "C": "tie"}[v2]  # second order: A is model b
            consistent = w1 == w2
            winner = w1 if consistent else "tie"  # a flip with the order is no preference
        items.append({"index": r["index"], "verdict_ab": v1, "verdict_ba": v2, "winner": winner,
                      "consistent": consistent, "raw": [raw1, raw2]})
        if progress:
            progress()
    ok = [(it, r) for it, r in zip(items, rows) if it["winner"] != "error"]
    outcomes = [{"b": 1.0, "a": 0.0, "tie": 0.5}[it["winner"]] for it, _ in ok]
    result = {"mode": "pairwise", "n": len(rows), "judged": len(ok), "errors": len(rows) - len(ok),
              "b_wins": sum(o == 1 for o in outcomes), "a_wins": sum(o == 0 for o in outcomes),
              "ties": sum(o == 0.5 for o in outcomes), "items": items}
    if outcomes:
        result["b_win_rate"] = list(win_rate(outcomes))
        result.update(length_controlled(outcomes, [len(r["b"]) - len(r["a"]) for _, r in ok]))
    return result


def judge_single(judge, rows, cache, retries: int, progress=None) -> dict:
    items = []
    for r in rows:
        scores = {}
        for side in ("a", "b"):
            v, raw = ask(judge, cache, SYSTEM_SINGLE, USER_SINGLE.format(question=r["prompt"], answer=r[side]),
                         SINGLE_RE, retries)
            scores[side] = min(10.0, max(1.0, float(v))) if v is not None else None
            scores[f"raw_{side}"] = raw
        items.append({"index": r["index"], **scores})
        if progress:
            progress()
    ok = [it for it in items if it["a"] is not None and it["b"] is not None]
    result = {"mode": "single", "n": len(rows), "judged": len(ok), "errors": len(rows) - len(ok), "items": items}
    if ok:
        result["score_a"] = list(bootstrap_ci([it["a"] for it in ok]))
        result["score_b"] = list(bootstrap_ci([it["b"] for it in ok]))
        result["diff_b_minus_a"] = list(paired_diff_ci([it["a"] for it in ok], [it["b"] for it in ok]))
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("judge", help="LLM-as-a-judge over a compare folder (pairwise both orders, or 1-10 grades)")
    p.add_argument("folder", help="a folder written by `tunelab compare`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--judge", help="a local judge model: spec, run folder or checkpoint")
    g.add_argument("--judge-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", default="default", help="model name sent to --judge-url")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
    p.add_argument("--mode", choices=["pairwise", "single"], default="pairwise")
    p.add_argument("--retries", type=int, default=2, help="extra attempts when the verdict can't be parsed")
    p.add_argument("--limit", type=int)


def cmd_judge(args) -> int:
    from ..ui import Progress

    folder = Path(args.folder)
    meta, rows = load_pairs(folder)
    rows = rows[: args.limit or None]
    judge = HttpJudge(args.judge_url, args.judge_model, args.api_key_env) if args.judge_url else LocalJudge(args.judge)
    cache = Cache()
    with Progress(console=console, transient=True, label="judge", unit="items") as prog:
        bar = prog.add_task("judging", total=len(rows))
        fn = judge_pairwise if args.mode == "pairwise" else judge_single
        result = fn(judge, rows, cache, args.retries, progress=lambda: prog.advance(bar))
    result.update({"judge": args.judge_url and f"{args.judge_url} ({args.judge_model})" or args.judge,
                   "a": meta.get("a"), "b": meta.get("b")})
    atomic_write_text(folder / f"judge_{args.mode}.json", json.dumps(result, indent=1, ensure_ascii=False))
    if args.mode == "pairwise" and "b_win_rate" in result:
        wr, lc = result["b_win_rate"], result["lc_win_rate"]
        console.print(f"B = {meta.get('b')} vs A = {meta.get('a')}: "
                      f"B wins {result['b_wins']}, A wins {result['a_wins']}, "
                      f"ties {result['ties']} (incl. order flips), errors {result['errors']}\n"
                      f"B's win rate {100 * wr[0]:.1f}% (95% CI {100 * wr[1]:.1f}-{100 * wr[2]:.1f}); "
                      f"length-controlled "
                      f"{100 * lc[0]:.1f}% ({100 * lc[1]:.1f}-{100 * lc[2]:.1f}); length explains "
                      f"{100 * (wr[0] - lc[0]):+.1f} points")
    elif "score_a" in result:
        console.print(f"mean grade A {result['score_a'][0]:.2f}, B {result['score_b'][0]:.2f}, B - A "
                      f"{result['diff_b_minus_a'][0]:+.2f} (95% CI {result['diff_b_minus_a'][1]:+.2f}.."
                      f"{result['diff_b_minus_a'][2]:+.2f}); errors {result['errors']}")
    else:
        console.print(f"no item could be judged ({result['errors']} errors); see {folder / f'judge_{args.mode}.json'}")
    return 0
