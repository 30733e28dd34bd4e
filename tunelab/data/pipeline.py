"""The recipe's data pipeline as options: read, convert, shuffle, filter, split, tokenize, mask.

Loss masking works on the token boundary of the rendered prompt: the prompt and the response are
tokenized separately and concatenated, so the prompt tokens are exactly the ones generation will
feed the model, and every response token plus the appended EOS is trained. Nothing searches for
the template's token ids (RECIPE.md defect: "### Response:\\n" can tokenize differently in context,
and the collator then silently masks the whole example). A multi-turn chat trains every assistant
turn (data.train_on: all_assistant, as TRL's assistant_only_loss) or only the last (last_assistant);
templates.training_turns says how the text between turns is found.
"""

from __future__ import annotations

import collections
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DataConfig
from .formats import FORMAT_FIELDS, BadRowError, RowError, to_example
from .sources import DataError, read_rows
from .templates import Example, TemplateError, encode_prompt, training_turns

IGNORE_INDEX = -100
SAMPLE_ROWS = 100


@dataclass
class DataStats:
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    train_rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    response_cut_away: int = 0
    untrainable: list[str] = field(default_factory=list)
    """file:line of (the first few) rows whose every response token was cut away by truncation."""
    length_percentiles: dict[str, int] = field(default_factory=dict)
    trained_tokens: int = 0
    total_tokens: int = 0
    mix: dict[str, int] = field(default_factory=dict)
    """data.sources: rows drawn from each source."""

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(where)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    full_len: int
    """Length before truncation."""
    where: str = ""
    """file:line of the source row, for error messages."""
    turn_starts: list[int] = field(default_factory=list)
    """Index of the first trained token of each trained turn (the prompt before it is what inference sends)."""

    @property
    def truncated(self) -> bool:
        return self.full_len > len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def tokenize_example(tokenizer, template: str, ex: Example, max_seq_length: int,
                     system_prompt: str | None = None, train_on: str = "all_assistant") -> TokenizedExample:
    """Per trained turn: the text before it (masked) + its reply ids + EOS (trained); truncated at max_seq_length."""
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for k, turn in enumerate(training_turns(template, ex, tokenizer, system_prompt, train_on)):
        before = (encode_prompt(tokenizer, turn.before) if k == 0
                  else tokenizer(turn.before, add_special_tokens=False)["input_ids"])
        reply = tokenizer(turn.reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += before
        labels += [IGNORE_INDEX] * len(before)
        starts.append(len(ids))
        ids += reply
        labels += reply
    return TokenizedExample(ids[:max_seq_length], labels[:max_seq_length], starts[0], len(ids),
                            turn_starts=starts)


def percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    s = sorted(lengths)

    def q(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"min": s[0], "p50": q(50), "p90": q(90), "p95": q(95), "p99": q(99), "max": s[-1]}


def load_examples(cfg: DataConfig, path: str, stats: DataStats, base: Path | None = None) -> list[tuple[str, Example]]:
    """Rows -> (where, Example). Structural errors raise DataError; empty rows are dropped and counted."""
    rows = read_rows(path, cfg.split, base)
    stats.rows_read += len(rows)
    out = []
    for row in rows:
        where = f"{path}:{row.get('__line__', '?')}"
        try:
            ex = to_example(row, cfg.format, cfg.fields)
        except BadRowError as e:
            if cfg.skip_bad_rows:
                stats.drop(f"bad row (data.skip_bad_rows): {e}", where)
                continue
            raise DataError(f"{where}: {e}{_bad_row_hint(e, row, cfg)}") from None
        except RowError as e:
            stats.drop(str(e), where)
            continue
        out.append((where, ex))
    return out


def _bad_row_hint(e: Exception, row: dict, cfg: DataConfig) -> str:
    hint = "; fix the row or set data.skip_bad_rows=true to drop such rows"
    if str(e).startswith("missing field"):
        columns = sorted(k for k in row if k != "__line__")
        return (f"; format {cfg.format} expects {', '.join(FORMAT_FIELDS[cfg.format])} (this row has: "
                f"{', '.join(columns)}; map names with data.fields)" + hint)
    return hint


def prepare(cfg: DataConfig, tokenizer, base: Path | None = None):
    """Returns (train, eval, stats, samples): TokenizedExample lists, DataStats, and the first
    SAMPLE_ROWS converted rows as (where, Example) for the preflight's train/inference parity check."""
    import datasets

    stats = DataStats()
    if cfg.sources:  # several files mixed by weight or row count (tunelab/datatools/mix.py)
        from ..datatools.mix import mix_sources

        pairs = mix_sources(cfg, stats, base)
    else:
        pairs = load_examples(cfg, cfg.path, stats, base)
    from ..datatools.filters import apply_config_filters  # data.min_response_chars, scripts, ... (tunelab data filter)

    pairs = apply_config_filters(cfg, pairs, stats, base)
    # `datasets` does the shuffle and split so the order matches the recipe's
    # load_dataset(...).shuffle(seed).filter(...).train_test_split(test_size, seed) exactly.
    table = datasets.Dataset.from_dict({
        "where": [w for w, _ in pairs],
        "ex": [json.dumps(asdict(e), ensure_ascii=False) for _, e in pairs],
        "has_input": [bool(e.input.strip()) for _, e in pairs],
    })
    if cfg.shuffle:
        table = table.shuffle(seed=cfg.seed)
    if cfg.only_empty_input:
        for w, has in zip(table["where"], table["has_input"]):
            if has:
                stats.drop("non-empty input (data.only_empty_input)", w)
        table = table.filter(lambda r: not r["has_input"])
    if cfg.max_rows is not None and len(table) > cfg.max_rows:
        for w in table["where"][cfg.max_rows:]:
            stats.drop("beyond data.max_rows", w)
        table = table.select(range(cfg.max_rows))
    if len(table) == 0:
        raise DataError(f"{cfg.path}: no usable rows left ({_drop_summary(stats)})")
    eval_table = None
    if cfg.test_size > 0:
        if round(len(table) * cfg.test_size) < 1:
            raise DataError(f"data.test_size={cfg.test_size} of {len(table)} rows leaves no evaluation row")
        split = table.train_test_split(test_size=cfg.test_size, seed=cfg.seed)
        table, eval_table = split["train"], split["test"]

    def tokenize_all(t, count_stats: bool):
        def encode(batch):
            cols = {"input_ids": [], "labels": [], "prompt_len": [], "full_len": [], "turn_starts": []}
            for raw, where in zip(batch["ex"], batch["where"]):
                tex = _tokenize(tokenizer, cfg, Example(**json.loads(raw)), where)
                for k in cols:
                    cols[k].append(getattr(tex, k))
            return cols

        t = t.map(encode, batched=True, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                  remove_columns=["ex", "has_input"], new_fingerprint=f"tok-{len(t)}-{id(t)}")
        out, lengths = [], []
        for row in t:
            tex = TokenizedExample(row["input_ids"], row["labels"], row["prompt_len"], row["full_len"], row["where"],
                                   row["turn_starts"])
            if count_stats:
                lengths.append(tex.full_len)
                stats.truncated += tex.truncated
            if tex.n_trained == 0:
                # Left out of training either way; without data.drop_untrainable the preflight refuses
                # the run (preflight.check_examples), so `check` reports it with everything else.
                stats.response_cut_away += 1
                if cfg.drop_untrainable:
                    stats.drop("response cut away by truncation", row["where"])
                elif len(stats.untrainable) < 3:
                    stats.untrainable.append(f"{row['where']} (prompt {tex.prompt_len} tokens)")
                continue
            if count_stats:
                stats.trained_tokens += tex.n_trained
                stats.total_tokens += len(tex.input_ids)
            out.append(tex)
        if count_stats:
            stats.length_percentiles = percentiles(lengths)
        return out

    train = tokenize_all(table, True)
    if eval_table is not None:
        evals = tokenize_all(eval_table, False)
    elif cfg.eval_path:
        eval_pairs = load_examples(cfg, cfg.eval_path, DataStats(), base)
        evals = []
        for where, ex in eval_pairs:
            tex = _tokenize(tokenizer, cfg, ex, where)
            if tex.n_trained:
                evals.append(tex)
    else:
        evals = []
    if not train:
        if stats.untrainable:
            raise DataError(f"{stats.untrainable[0]}: the prompt reaches data.max_seq_length={cfg.max_seq_length}, "
                            f"so no response token is trained, and no other row is left; raise max_seq_length")
        raise DataError(f"{cfg.path}: no trainable rows left ({_drop_summary(stats)})")
    stats.train_rows, stats.eval_rows = len(train), len(evals)
    stats.rows_kept = len(train) + len(evals)
    return train, evals, stats, pairs[:SAMPLE_ROWS]


def _tokenize(tokenizer, cfg: DataConfig, ex: Example, where: str) -> TokenizedExample:
    try:
        tex = tokenize_example(tokenizer, cfg.template, ex, cfg.max_seq_length, cfg.system_prompt,
                               cfg.train_on)
    except TemplateError as e:
        raise DataError(f"{where}: {e}") from None
    tex.where = where
    return tex


def _drop_summary(stats: DataStats) -> str:
    if not stats.dropped:
        return "none dropped"
    return "; ".join(f"{n} dropped: {r}" for r, n in collections.Counter(stats.dropped).most_common())


class Collator:
    """Pads a batch to its longest row: pad id in input_ids, -100 in labels, 0 in attention_mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            n = (n + self.multiple - 1) // self.multiple * self.multiple
        ids = torch.full((len(batch), n), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if all("row_index" in b for b in batch):  # lets a NaN report name the rows
            out["row_index"] = torch.tensor([b["row_index"] for b in batch])
        return out


class TokenizedDataset:
    """A map-style dataset over TokenizedExample for the Trainer's DataLoader."""

    def __init__(self, examples: list[TokenizedExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels, "row_index": i}
