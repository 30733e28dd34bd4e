"""Data for the methods past SFT: preference pairs, KTO's unpaired rows, GRPO prompts, classifier rows.

Same rules as SFT (tunelab/data/pipeline.py): the prompt is rendered by the one template definition
(templates.render_prompt) and tokenized on its own; each response is tokenized separately and
gets the EOS appended, so chosen and rejected are scored on their response tokens only, EOS
included, and the prompt the model is tuned on is exactly the one generation feeds it.

Preference rows come in three layouts, told apart per row:
- prompt/chosen/rejected text (the prompt as `prompt`, or alpaca `instruction` + `input`);
- chat messages: `chosen`/`rejected` are message lists, with a `prompt` list or sharing every turn
  but the last;
- whole dialogues as text that share every turn but the last (Anthropic HH-RLHF:
  "\\n\\nHuman: ...\\n\\nAssistant: ..."): split into the shared prompt and the two final replies.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from .pipeline import DataStats
from .sources import DataError, read_rows
from .templates import Example, encode_prompt, render_prompt

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclass
class Pair:
    where: str
    prompt: Example
    chosen: str
    rejected: str


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str = ""
    text: tuple[str, str, str] = ("", "", "")
    """(rendered prompt, chosen, rejected) as text, for trainers that tokenize themselves (ORPO, SimPO)."""


@dataclass
class PairStats:
    rows_read: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    unfair_truncation: int = 0
    unfair_examples: list[str] = field(default_factory=list)
    both_truncated: int = 0
    chosen_tokens_mean: float = 0.0
    rejected_tokens_mean: float = 0.0
    chosen_longer_share: float = 0.0
    prompt_tokens_max: int = 0

    # the same drop counting (and dict form) as the SFT pipeline's DataStats: `check` prints both alike
    drop = DataStats.drop
    to_dict = DataStats.to_dict


def split_shared_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two HH-RLHF-style dialogues that share every turn but
    the last; prompt + reply gives back each input exactly. ValueError when they differ earlier."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    # the final replies may begin with the same words: cut at the last assistant marker that both share
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise ValueError(f"no shared '{HH_ASSISTANT.strip()}' turn before the dialogues differ")
    cut += len(HH_ASSISTANT)
    prompt, c, r = chosen[:cut], chosen[cut:], rejected[cut:]
    if HH_HUMAN in c or HH_HUMAN in r:
        raise ValueError("the dialogues differ before their last turn (a later Human turn follows)")
    return prompt, c, r


def _hh_turns(prompt: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> chat messages (user/assistant)."""
    body = prompt[: -len(HH_ASSISTANT)]
    msgs = []
    for chunk in body.split(HH_HUMAN)[1:]:
        parts = chunk.split(HH_ASSISTANT)
        msgs.append({"role": "user", "content": parts[0].strip()})
        for a in parts[1:]:
            msgs.append({"role": "assistant", "content": a.strip()})
    return msgs


def _col(cfg: DataConfig, name: str) -> str:
    return cfg.fields.get(name, name)


def _missing(row: dict, where: str, need: list[str]) -> DataError:
    have = sorted(k for k in row if k != "__line__")
    return DataError(f"{where}: a preference row needs {' and '.join(need)} (the file has: {', '.join(have)}); "
                     f"map names with data.fields, e.g. {{chosen: {have[0] if have else 'A'}}}")


def to_pair(row: dict, cfg: DataConfig, where: str) -> Pair:
    """One raw row -> Pair. Structural problems raise DataError; empty sides give a Pair to be dropped."""
    c_col, r_col = _col(cfg, "chosen"), _col(cfg, "rejected")
    if c_col not in row or r_col not in row:
        raise _missing(row, where, [c_col, r_col])
    chosen, rejected = row[c_col], row[r_col]
    p_col = _col(cfg, "prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        for side in (chosen, rejected):
            for m in side:
                if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                    raise DataError(f"{where}: each message needs 'role' and text 'content', got {str(m)[:60]}")
        if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(f"{where}: chosen and rejected must end with the assistant's message")
        prompt = row.get(p_col)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if prompt is None:
            if chosen[:-1] != rejected[:-1]:
                raise DataError(f"{where}: chosen and rejected differ before their last message; give a separate "
                                f"'{p_col}' or make them share every turn but the last")
            prompt = chosen[:-1]
        msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
        user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        return Pair(where, Example(instruction=user, messages=msgs), chosen[-1]["content"], rejected[-1]["content"])
    for name, v in ((c_col, chosen), (r_col, rejected)):
        if not isinstance(v, str):
            raise DataError(f"{where}: field '{name}' should be text or a list of messages, got {type(v).__name__}")
    if isinstance(row.get(p_col), str):
        return Pair(where, Example(instruction=row[p_col]), chosen, rejected)
    i_col = _col(cfg, "instruction")
    if isinstance(row.get(i_col), str):
        inp = row.get(_col(cfg, "input"))
        return Pair(where, Example(instruction=row[i_col], input=inp if isinstance(inp, str) else ""), chosen, rejected)
    if HH_ASSISTANT in chosen:
        try:
            prompt, c, r = split_shared_dialogue(chosen, rejected)
        except ValueError as e:
            raise DataError(f"{where}: can't split the dialogues into a shared prompt and two replies ({e})") from None
        msgs = _hh_turns(prompt)
        text = prompt.strip()[: -len(HH_ASSISTANT.strip())].strip()
        return Pair(where, Example(instruction=text, messages=msgs), c.strip(), r.strip())
    raise _missing(row, where, [p_col + " (or instruction)", c_col, r_col])


def encode_response(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def split_train_eval(cfg: DataConfig, items: list, wheres: list[str], stats) -> tuple[list, list]:
    """Shuffle, max_rows and test_size exactly as the SFT pipeline does (datasets' shuffle/split)."""
    import datasets

    table = datasets.Dataset.from_dict({"i": list(range(len(items)))})
    if cfg.shuffle:
        table = table.shuffle(seed=cfg.seed)
    if cfg.max_rows is not None and len(table) > cfg.max_rows:
        for i in table["i"][cfg.max_rows:]:
            stats.drop("beyond data.max_rows", wheres[i])
        table = table.select(range(cfg.max_rows))
    if len(table) == 0:
        raise DataError(f"{cfg.path}: no usable rows left")
    evals: list = []
    if cfg.test_size > 0:
        if round(len(table) * cfg.test_size) < 1:
            raise DataError(f"data.test_size={cfg.test_size} of {len(table)} rows leaves no evaluation row")
        sp = table.train_test_split(test_size=cfg.test_size, seed=cfg.seed)
        table, evals = sp["train"], [items[i] for i in sp["test"]["i"]]
    return [items[i] for i in table["i"]], evals


def load_pairs(cfg: DataConfig, tokenizer, base: Path | None = None):
    """(train, eval, stats, samples): TokenizedPair lists, PairStats and the first Pairs (for display)."""
    stats = PairStats()

    def read(path: str) -> list[Pair]:
        rows = read_rows(path, cfg.split, base)
        stats.rows_read += len(rows)
        pairs = []
        for row in rows:
            where = f"{path}:{row.get('__line__', '?')}"
            p = to_pair(row, cfg, where)
            if not p.chosen.strip() or not p.rejected.strip():
                stats.drop("empty chosen or rejected", where)
            elif p.chosen.strip() == p.rejected.strip():
                stats.drop("chosen == rejected (nothing to compare)", where)
            elif p.prompt.messages is None and not p.prompt.instruction.strip():
                stats.drop("empty prompt", where)
            else:
                pairs.append(p)
        return pairs

    pairs = read(cfg.path)
    if not pairs:
        raise DataError(f"{cfg.path}: no usable preference pairs ({_drops(stats)})")
    train, evals = split_train_eval(cfg, pairs, [p.where for p in pairs], stats)
    if cfg.eval_path:
        evals = read(cfg.eval_path)
    tok_train = tokenize_pairs(cfg, tokenizer, train, stats, count=True)
    tok_eval = tokenize_pairs(cfg, tokenizer, evals, stats, count=False)
    stats.train_rows, stats.eval_rows = len(tok_train), len(tok_eval)
    if not tok_train:
        raise DataError(f"{cfg.path}: no trainable pairs left ({_drops(stats)})")
    return tok_train, tok_eval, stats, pairs[:20]


def tokenize_pairs(cfg: DataConfig, tok, pairs: list[Pair], stats: PairStats, count: bool) -> list[TokenizedPair]:
    out, c_len, r_len, longer = [], [], [], 0
    n = cfg.max_seq_length
    for p in pairs:
        prompt = render_prompt(cfg.template, p.prompt, tok, cfg.system_prompt)
        prompt_ids = encode_prompt(tok, prompt)
        c, r = encode_response(tok, p.chosen), encode_response(tok, p.rejected)
        if len(prompt_ids) >= n:
            if not cfg.drop_untrainable:
                raise DataError(f"{p.where}: the prompt alone is {len(prompt_ids)} tokens, at or past "
                                f"data.max_seq_length={n}, so chosen and rejected can't be compared; raise "
                                f"max_seq_length or set data.drop_untrainable=true")
            stats.drop("prompt alone reaches max_seq_length", p.where)
            continue
        if count:
            c_len.append(len(c))
            r_len.append(len(r))
            longer += len(c) > len(r)
            stats.prompt_tokens_max = max(stats.prompt_tokens_max, len(prompt_ids))
            cut_c, cut_r = len(prompt_ids) + len(c) > n, len(prompt_ids) + len(r) > n
            if cut_c != cut_r:  # one side loses its tail and EOS, the other is whole: an unfair comparison
                stats.unfair_truncation += 1
                if len(stats.unfair_examples) < 3:
                    stats.unfair_examples.append(p.where)
            elif cut_c:
                stats.both_truncated += 1
        out.append(TokenizedPair(prompt_ids, c, r, p.where, (prompt, p.chosen, p.rejected)))
    if count and c_len:
        stats.chosen_tokens_mean = round(statistics.fmean(c_len), 2)
        stats.rejected_tokens_mean = round(statistics.fmean(r_len), 2)
        stats.chosen_longer_share = round(longer / len(c_len), 4)
    return out


def pair_report(stats: PairStats, cfg: DataConfig) -> list[str]:
    """The preflight's advisory findings on pairs (fatal ones were raised while loading)."""
    w = []
    for reason, k in stats.dropped.items():
        if reason == "beyond data.max_rows":  # asked for, not a finding
            continue
        w.append(f"{k} pairs dropped: {reason} (e.g. {', '.join(stats.dropped_examples[reason])})")
    if stats.unfair_truncation:
        w.append(f"{stats.unfair_truncation} pairs are cut unfairly by data.max_seq_length={cfg.max_seq_length}: "
                 f"one side is truncated (no EOS) and the other is whole (e.g. {', '.join(stats.unfair_examples)}); "
                 f"raise max_seq_length")
    c, r = stats.chosen_tokens_mean, stats.rejected_tokens_mean
    if r > 0 and c > 1.3 * r and stats.chosen_longer_share > 0.6:
        w.append(f"length bias: chosen is on average {c / r:.2f}x as long as rejected ({c:.0f} vs {r:.0f} tokens; "
                 f"longer in {stats.chosen_longer_share:.0%} of pairs), so the model can learn 'longer is better'; "
                 f"consider dpo.loss_type=sigmoid_norm or length-matched pairs")
    return w


def _drops(stats) -> str:
    return "; ".join(f"{n} dropped: {r}" for r, n in stats.dropped.items()) or "none dropped"


# ---------------------------------------------------------------------------------------------
# KTO: unpaired prompt/completion/label rows


@dataclass
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    where: str = ""
    text: tuple[str, str] = ("", "")


def _bool_label(v, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise DataError(f"{where}: label must be true/false (desirable or not), got {v!r}")


def load_unpaired(cfg: DataConfig, tokenizer, base: Path | None = None):
    from .formats import RowError, to_example

    stats = PairStats()

    def read(path):
        rows = read_rows(path, cfg.split, base)
        stats.rows_read += len(rows)
        out = []
        for row in rows:
            where = f"{path}:{row.get('__line__', '?')}"
            lab = _col(cfg, "label")
            if lab not in row and _col(cfg, "chosen") in row and _col(cfg, "rejected") in row:
                # a preference pair gives two unpaired rows (TRL's unpair_preference_dataset does the same)
                p = to_pair(row, cfg, where)
                for text, good in ((p.chosen, True), (p.rejected, False)):
                    if text.strip():
                        out.append((where, Example(p.prompt.instruction, p.prompt.input, text, p.prompt.messages),
                                    good))
                continue
            if lab not in row:
                have = sorted(k for k in row if k != "__line__")
                raise DataError(f"{where}: a KTO row needs prompt, completion and label (the file has: "
                                f"{', '.join(have)}); map names with data.fields")
            try:
                ex = to_example(row, cfg.format, cfg.fields)
            except RowError as e:
                if str(e).startswith("missing field"):
                    have = sorted(k for k in row if k != "__line__")
                    raise DataError(f"{where}: {e} (the file has: {', '.join(have)}); map names with data.fields")
                stats.drop(str(e), where)
                continue
            out.append((where, ex, _bool_label(row[lab], where)))
        return out

    items = read(cfg.path)
    train, evals = split_train_eval(cfg, items, [w for w, _, _ in items], stats)
    if cfg.eval_path:
        evals = read(cfg.eval_path)

    def tok_all(xs):
        out = []
        for where, ex, label in xs:
            prompt = render_prompt(cfg.template, ex, tokenizer, cfg.system_prompt)
            prompt_ids = encode_prompt(tokenizer, prompt)
            if len(prompt_ids) >= cfg.max_seq_length:
                raise DataError(f"{where}: the prompt alone is {len(prompt_ids)} tokens, at or past "
                                f"data.max_seq_length={cfg.max_seq_length}")
            out.append(TokenizedUnpaired(prompt_ids, encode_response(tokenizer, ex.response), label, where,
                                         (prompt, ex.response)))
        return out

    tr, ev = tok_all(train), tok_all(evals)
    labels = {t.label for t in tr}
    if len(labels) < 2:
        raise DataError(f"{cfg.path}: every KTO row is labelled {labels.pop() if labels else '?'}; KTO needs both "
                        f"desirable (true) and undesirable (false) completions")
    stats.train_rows, stats.eval_rows = len(tr), len(ev)
    return tr, ev, stats


# ---------------------------------------------------------------------------------------------
# GRPO: prompts (+ the raw row, for reward functions)


@dataclass
class PromptRow:
    where: str
    prompt: str
    """The rendered prompt text (templates.render_prompt), fed to generation as is."""
    row: dict


def load_prompts(cfg: DataConfig, tokenizer, base: Path | None = None):
    from .formats import RowError, to_example

    stats = PairStats()

    def read(path):
        rows = read_rows(path, cfg.split, base)
        stats.rows_read += len(rows)
        out = []
        for row in rows:
            where = f"{path}:{row.get('__line__', '?')}"
            try:
                ex = to_example(row, cfg.format, cfg.fields)
            except RowError as e:
                if str(e) == "empty response":  # GRPO needs no reference answer unless a reward reads one
                    ex = _prompt_only(row, cfg)
                elif str(e).startswith("missing field") and "output" not in str(e) and "completion" not in str(e):
                    have = sorted(k for k in row if k != "__line__")
                    raise DataError(f"{where}: {e} (the file has: {', '.join(have)}); map names with data.fields")
                else:
                    ex = _prompt_only(row, cfg)
            if ex is None:
                stats.drop("empty prompt", where)
                continue
            text = render_prompt(cfg.template, ex, tokenizer, cfg.system_prompt)
            if len(encode_prompt(tokenizer, text)) >= cfg.max_seq_length:
                raise DataError(f"{where}: the prompt alone reaches data.max_seq_length={cfg.max_seq_length}")
            out.append(PromptRow(where, text, {k: v for k, v in row.items() if k != "__line__"}))
        return out

    items = read(cfg.path)
    train, evals = split_train_eval(cfg, items, [p.where for p in items], stats)
    if cfg.eval_path:
        evals = read(cfg.eval_path)
    stats.train_rows, stats.eval_rows = len(train), len(evals)
    return train, evals, stats


def _prompt_only(row: dict, cfg: DataConfig) -> Example | None:
    if cfg.format == "chat":
        msgs = row.get(_col(cfg, "messages"))
        if isinstance(msgs, list) and msgs:
            if msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            return Example(messages=[{"role": m["role"], "content": m["content"]} for m in msgs]) if msgs else None
        return None
    key = "prompt" if cfg.format == "prompt_completion" else "instruction"
    text = row.get(_col(cfg, key))
    if not isinstance(text, str) or not text.strip():
        return None
    inp = row.get(_col(cfg, "input")) if cfg.format == "alpaca" else ""
    return Example(instruction=text, input=inp if isinstance(inp, str) else "")


def dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
