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
# Reference-guided prompts (MT-Bench's pair-math-v1 / single-math-v1 layout) for rows that carry a reference
# answer, and multi-turn prompts (pair-v2-multi-turn / single-v1-multi-turn layout) for a question's later turns:
# the judge sees the whole conversation and judges the last answer.
SYSTEM_PAIR_REF = (
    "You are an impartial judge. Compare the two AI assistants' answers to the user's question below and decide "
    "which one answers it better. Judge correctness and helpfulness. You are given a reference answer: begin by "
    "comparing both answers with it, and identify and correct any mistakes. The order of the answers and their length "
    "must not influence you. Explain briefly, then give your verdict strictly as \"[[A]]\" if assistant A is better, "
    "\"[[B]]\" if assistant B is better, or \"[[C]]\" for a tie."
)
USER_PAIR_REF = ("[User Question]\n{question}\n\n[The Start of Reference Answer]\n{ref}\n[The End of Reference Answer]"
                 "\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]"
                 "\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
SYSTEM_SINGLE_REF = (
    "You are an impartial judge. Rate the AI assistant's answer to the user's question below for correctness and "
    "helpfulness. You are given a reference answer: begin by comparing the assistant's answer with it, and identify "
    "and correct any mistakes. Explain briefly, then rate the answer from 1 to 10 strictly in this format: "
    "\"Rating: [[5]]\"."
)
USER_SINGLE_REF = ("[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref}\n[The End of Reference Answer]"
                   "\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")
MULTI_NOTE = (" Two conversations with the user are shown; judge only the assistants' answers to the user's "
              "last question.")
MULTI_NOTE_SINGLE = (" A conversation with the user is shown; judge only the assistant's answer to the user's "
                     "last question.")


def conversation(title: str, speaker: str, questions: list[str], answers: list[str]) -> str:
    """One conversation block as MT-Bench's multi-turn judge prompts lay it out."""
    body = "".join(f"### User:\n{q}\n\n### {speaker}:\n{a}\n\n" for q, a in zip(questions, answers))
    return f"<|The Start of {title}|>\n\n{body}<|The End of {title}|>"


PAIR_RE = re.compile(r"\[\[(A|B|C)\]\]")
SINGLE_RE = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


class JudgeError(ConfigError):
    """The judge can't be reached or answers garbage at the protocol level (one line, exit 2)."""


def server_message(e: urllib.error.HTTPError) -> str:
    """The server's own explanation of an HTTP error, on one line: OpenAI's {"error": {"message"}} body,
    or {"error": "..."} / {"message": "..."} / {"detail": "..."}, else the start of the body text."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    msg = raw
    try:
        body = json.loads(raw)
        err = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(err, dict):
            err = err.get("message") or err.get("detail") or err
        msg = err if isinstance(err, str) else json.dumps(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    msg = " ".join(str(msg).split())[:300]
    return f": {msg}" if msg else f" ({e.reason})" if e.reason else ""


class HttpJudge:
    def __init__(self, url: str, model: str | None, api_key_env: str | None, timeout: float = 120,
                 max_tokens: int | None = None):
        base = url.rstrip("/")
        base = base[: -len("/chat/completions")] if base.endswith("/chat/completions") else base
        self.url, self.base = base + "/chat/completions", base
        self.timeout, self.max_tokens = timeout, max_tokens or 512
        self.key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.key:
            raise JudgeError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
        self.model = model or self.served_model()
        # the default max_tokens keeps the identity (and so the cache keys) of earlier runs
        self.identity = f"http:{self.url}:{self.model}" + (f":max{max_tokens}" if max_tokens else "")

    def _open(self, req, url: str) -> bytes:
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise JudgeError(f"judge endpoint {url} answered HTTP {e.code}{server_message(e)}; "
                             f"judgements so far are cached") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise JudgeError(f"judge endpoint {url} unreachable ({reason}); judgements so far are cached") from None

    def served_model(self) -> str:
        """The model name to send when --judge-model is not given: the one model GET /v1/models lists."""
        url = self.base + "/models"
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        raw = self._open(urllib.request.Request(url, headers=headers), url)
        try:
            ids = [m["id"] for m in json.loads(raw)["data"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise JudgeError(f"{url} did not return an OpenAI model list (got {raw[:80]!r}); "
                             f"name the judge with --judge-model") from None
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise JudgeError(f"{url} lists no model; name the judge with --judge-model")
        raise JudgeError(f"{url} serves {len(ids)} models ({', '.join(ids)}); pick one with --judge-model")

    def __call__(self, system: str, user: str, attempt: int) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "system", "content": system},
                                                             {"role": "user", "content": user}],
                           "temperature": 0.0 if attempt == 0 else 0.7, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        raw = self._open(urllib.request.Request(self.url, data=body, headers=headers, method="POST"), self.url)
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url} did not return OpenAI chat JSON "
                             f"(got {raw[:80]!r}); judgements so far are cached") from None


class LocalJudge:
    def __init__(self, spec: str, max_new_tokens: int | None = None):
        from ..models import load_for_inference

        self.loaded = load_for_inference(spec)
        self.max_new_tokens = max_new_tokens or 256
        self.identity = f"local:{model_fingerprint(self.loaded)}" + (f":max{max_new_tokens}" if max_new_tokens else "")

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


def judge_units(rows: list[dict]) -> list[tuple[dict, int]]:
    """(row, turn) pairs to judge. A row is one question ({prompt, a, b}, optional `reference`) or a
    multi-turn question in MT-Bench's shape ({turns: [q1, q2, ...], a: [...], b: [...]}, optional
    `reference: [r1, r2, ...]`); every turn of it is judged, each with the conversation before it."""
    units = []
    for r in rows:
        if isinstance(r.get("turns"), list):
            n = len(r["turns"])
            if not (isinstance(r.get("a"), list) and isinstance(r.get("b"), list) and len(r["a"]) == len(r["b"]) == n):
                raise JudgeError(f"compare row {r.get('index')}: 'turns' has {n} questions, so 'a' and 'b' must be "
                                 f"lists of {n} answers")
            units += [(r, t) for t in range(n)]
        elif isinstance(r.get("prompt"), str) and isinstance(r.get("a"), str) and isinstance(r.get("b"), str):
            units.append((r, 0))
        else:
            raise JudgeError(f"compare row {r.get('index')}: needs prompt/a/b strings or turns/a/b lists")
    return units


def _turn(r: dict, t: int):
    """(questions up to turn t, answers of a, answers of b, references up to t or None)."""
    if isinstance(r.get("turns"), list):
        qs, a, b = r["turns"][: t + 1], r["a"][: t + 1], r["b"][: t + 1]
        ref = r.get("reference")
        ref = ref[: t + 1] if isinstance(ref, list) and len(ref) > t and all(ref[: t + 1]) else None
    else:
        qs, a, b = [r["prompt"]], [r["a"]], [r["b"]]
        ref = r.get("reference")
        ref = [ref[0] if isinstance(ref, list) and ref else ref] if ref else None
    return qs, a, b, ref


def pair_prompt(r: dict, t: int, swap: bool) -> tuple[str, str]:
    """(system, user) for judging turn t of row r; swap = B's answers shown as assistant A."""
    qs, a, b, ref = _turn(r, t)
    first, second = (b, a) if swap else (a, b)
    if t == 0:
        if ref:
            return SYSTEM_PAIR_REF, USER_PAIR_REF.format(question=qs[0], ref=ref[0], a=first[0], b=second[0])
        return SYSTEM_PAIR, USER_PAIR.format(question=qs[0], a=first[0], b=second[0])
    parts = [conversation("Reference Answer", "Reference answer", qs, ref)] if ref else []
    parts += [conversation("Assistant A's Conversation with User", "Assistant A", qs, first),
              conversation("Assistant B's Conversation with User", "Assistant B", qs, second)]
    return (SYSTEM_PAIR_REF if ref else SYSTEM_PAIR) + MULTI_NOTE, "\n\n\n".join(parts)


def single_prompt(r: dict, t: int, side: str) -> tuple[str, str]:
    qs, a, b, ref = _turn(r, t)
    ans = a if side == "a" else b
    if t == 0:
        if ref:
            return SYSTEM_SINGLE_REF, USER_SINGLE_REF.format(question=qs[0], ref=ref[0], answer=ans[0])
        return SYSTEM_SINGLE, USER_SINGLE.format(question=qs[0], answer=ans[0])
    parts = [conversation("Reference Answer", "Reference answer", qs, ref)] if ref else []
    parts.append(conversation("Assistant's Conversation with User", "Assistant", qs, ans))
    return (SYSTEM_SINGLE_REF if ref else SYSTEM_SINGLE) + MULTI_NOTE_SINGLE, "\n\n\n".join(parts)


def judge_pairwise(judge, rows, cache, retries: int, progress=None) -> dict:
    units = judge_units(rows)
    items = []
    for r, t in units:
        v1, raw1 = ask(judge, cache, *pair_prompt(r, t, swap=False), PAIR_RE, retries)
        v2, raw2 = ask(judge, cache, *pair_prompt(r, t, swap=True), PAIR_RE, retries)
        consistent = False
        if v1 is None or v2 is None:
            winner = "error"
        else:
            w1 = {"A": "a", "B": "b", "C": "tie"}[v1]
            w2 = {"A": "b", "B": "a", "C": "tie"}[v2]  # second order: A is model b
            consistent = w1 == w2
            winner = w1 if consistent else "tie"  # a flip with the order is no preference
        items.append({"index": r["index"], "turn": t + 1, "reference": bool(_turn(r, t)[3]), "verdict_ab": v1,
                      "verdict_ba": v2, "winner": winner, "consistent": consistent, "raw": [raw1, raw2]})
        if progress:
            progress()
    ok = [(it, r, t) for it, (r, t) in zip(items, units) if it["winner"] != "error"]
    outcomes = [{"b": 1.0, "a": 0.0, "tie": 0.5}[it["winner"]] for it, _, _ in ok]
    result = {"mode": "pairwise", "n": len(items), "judged": len(ok), "errors": len(items) - len(ok),
              "b_wins": sum(o == 1 for o in outcomes), "a_wins": sum(o == 0 for o in outcomes),
              "ties": sum(o == 0.5 for o in outcomes), "items": items}
    if outcomes:
        result["b_win_rate"] = list(win_rate(outcomes))
        # position consistency: the share of judged pairs where both orders gave the same verdict
        result["consistency_rate"] = sum(it["consistent"] for it, _, _ in ok) / len(ok)
        result.update(length_controlled(outcomes, [len(_turn(r, t)[2][t]) - len(_turn(r, t)[1][t]) for _, r, t in ok]))
        turns = sorted({t for _, _, t in ok})
        if len(turns) > 1:
            result["by_turn"] = {str(t + 1): {"judged": len(o), "b_win_rate": list(win_rate(o))}
                                 for t in turns for o in [[x for x, (_, _, tt) in zip(outcomes, ok) if tt == t]]}
    return result


def judge_single(judge, rows, cache, retries: int, progress=None) -> dict:
    items = []
    for r, t in judge_units(rows):
        scores = {}
        for side in ("a", "b"):
            v, raw = ask(judge, cache, *single_prompt(r, t, side), SINGLE_RE, retries)
            scores[side] = min(10.0, max(1.0, float(v))) if v is not None else None
            scores[f"raw_{side}"] = raw
        items.append({"index": r["index"], "turn": t + 1, "reference": bool(_turn(r, t)[3]), **scores})
        if progress:
            progress()
    ok = [it for it in items if it["a"] is not None and it["b"] is not None]
    result = {"mode": "single", "n": len(items), "judged": len(ok), "errors": len(items) - len(ok), "items": items}
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
    p.add_argument("--judge-model", default=None,
                   help="model name sent to --judge-url (default: the one model the endpoint's /v1/models lists)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
    p.add_argument("--mode", choices=["pairwise", "single"], default="pairwise")
    p.add_argument("--retries", type=int, default=2, help="extra attempts when the verdict can't be parsed")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest judge answer in tokens (default 512 for --judge-url, 256 for a local --judge)")


def cmd_judge(args) -> int:
    from ..ui import Progress

    folder = Path(args.folder)
    meta, rows = load_pairs(folder)
    rows = rows[: args.limit or None]
    if args.max_tokens is not None and args.max_tokens < 1:
        raise JudgeError(f"--max-tokens {args.max_tokens}: must be at least 1")
    units = judge_units(rows)  # a malformed row fails before the judge is asked anything
    judge = (HttpJudge(args.judge_url, args.judge_model, args.api_key_env, max_tokens=args.max_tokens)
             if args.judge_url else LocalJudge(args.judge, args.max_tokens))
    cache = Cache()
    with Progress(console=console, transient=True, label="judge", unit="items") as prog:
        bar = prog.add_task("judging", total=len(units))
        fn = judge_pairwise if args.mode == "pairwise" else judge_single
        result = fn(judge, rows, cache, args.retries, progress=lambda: prog.advance(bar))
    result.update({"judge": args.judge_url and f"{args.judge_url} ({judge.model})" or args.judge,
                   "a": meta.get("a"), "b": meta.get("b")})
    atomic_write_text(folder / f"judge_{args.mode}.json", json.dumps(result, indent=1, ensure_ascii=False))
    if args.mode == "pairwise" and "b_win_rate" in result:
        wr, lc = result["b_win_rate"], result["lc_win_rate"]
        console.print(f"B = {meta.get('b')} vs A = {meta.get('a')}: "
                      f"B wins {result['b_wins']}, A wins {result['a_wins']}, "
                      f"ties {result['ties']} (incl. order flips), errors {result['errors']}\n"
                      f"B's win rate {100 * wr[0]:.1f}% (95% CI {100 * wr[1]:.1f}-{100 * wr[2]:.1f}); position "
                      f"consistency {100 * result['consistency_rate']:.1f}% (both orders agree); length-controlled "
                      f"{100 * lc[0]:.1f}% ({100 * lc[1]:.1f}-{100 * lc[2]:.1f}); length explains "
                      f"{100 * (wr[0] - lc[0]):+.1f} points")
    elif "score_a" in result:
        console.print(f"mean grade A {result['score_a'][0]:.2f}, B {result['score_b'][0]:.2f}, B - A "
                      f"{result['diff_b_minus_a'][0]:+.2f} (95% CI {result['diff_b_minus_a'][1]:+.2f}.."
                      f"{result['diff_b_minus_a'][2]:+.2f}); errors {result['errors']}")
    else:
        console.print(f"no item could be judged ({result['errors']} errors); see {folder / f'judge_{args.mode}.json'}")
        return 1  # a run that judged nothing is a failure, whatever it wrote
    for t, bt in result.get("by_turn", {}).items():
        console.print(f"turn {t}: B's win rate {100 * bt['b_win_rate'][0]:.1f}% over {bt['judged']} judged")
    return 0
