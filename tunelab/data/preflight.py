"""Preflight: catch the classic fine-tuning mistakes before any weights load.

`tunelab check run.yaml` prints the report; `tunelab train` runs the same fatal checks first.
The fatal checks test the contract between training and inference on the tokenized rows the
Trainer will get (not on what the code is meant to produce):

- parity: for every trained turn of a sample of rows, the token ids before its first trained token
  equal the ids `tunelab generate` sends for that row (generate.prompt_ids, the same code path);
- EOS: every trained span ends in the EOS token generation stops at, and no prompt ends in one;
- truncation: at least one response token of every row survives data.max_seq_length;
- history (chat templates): the template renders a finished conversation the way training saw it,
  so the next turn's prompt starts with what the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from .pipeline import IGNORE_INDEX
from .templates import render_conversation, render_prompt, training_turns


class PreflightError(ValueError):
    """A fatal preflight finding; the message says what and how to fix it."""


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained (not IGNORE_INDEX) labels."""
    spans, start = [], None
    for i, x in enumerate(labels):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def _e_g(wheres: list[str]) -> str:
    return ", ".join(w for w in wheres[:3] if w) or "?"


def check_examples(s) -> Report:
    """Fatal and advisory checks over a prepared `train.Setup`."""
    r = Report()
    tok, cfg = s.tokenizer, s.cfg
    d = cfg.data
    eos = tok.eos_token_id
    examples = s.train + s.evals

    if s.stats.response_cut_away and not d.drop_untrainable:
        r.errors.append(f"{s.stats.response_cut_away} rows have every response token cut away by "
                        f"data.max_seq_length={d.max_seq_length} (e.g. {_e_g(s.stats.untrainable)}), so nothing of "
                        f"them is trained; raise max_seq_length or set data.drop_untrainable=true to leave them out")

    no_eos, eos_prompt = [], []
    for e in examples:
        for start, end in trained_spans(e.labels):
            if (end < len(e.labels) or not e.truncated) and e.labels[end - 1] != eos:
                no_eos.append(e.where)
        if any(0 < st <= len(e.input_ids) and e.input_ids[st - 1] == eos for st in e.turn_starts):
            eos_prompt.append(e.where)
    if no_eos:
        r.errors.append(f"{len(no_eos)} examples have a trained reply that does not end in the EOS token "
                        f"{tok.eos_token!r} (e.g. {_e_g(no_eos)}): the model would not learn to stop")
    if eos_prompt:
        r.errors.append(f"{len(eos_prompt)} prompts end in the EOS token {tok.eos_token!r} (e.g. {_e_g(eos_prompt)}): "
                        f"the tokenizer adds EOS when it encodes text (its post-processor or add_eos_token), so the "
                        f"model would be taught to answer after an end of text; turn that off in tokenizer_config.json")

    mismatch = _parity(s, examples)
    if mismatch:
        r.errors.append(mismatch)
    history = _history_mismatch(s)
    if history:
        r.errors.append(history)

    if d.system_prompt and d.template != "chat_template":
        r.warnings.append(f"data.system_prompt is set but the {d.template} template has no system part: it is "
                          f"not used (use data.template=chat_template to train with it)")
    if s.stats.truncated:
        share = s.stats.truncated / max(1, s.stats.train_rows)
        r.warnings.append(f"{s.stats.truncated} training examples ({share:.1%}) are longer than "
                          f"data.max_seq_length={d.max_seq_length} and were truncated (their EOS is cut off)")
    if d.test_size == 0 and not d.eval_path:
        r.warnings.append("no evaluation data (data.test_size or data.eval_path): overfitting can't be seen")
    return r


def _parity(s, examples) -> str | None:
    """Train/inference prompt parity on the sample rows, through the code path `generate` uses."""
    from ..generate import prompt_ids

    d, tok = s.cfg.data, s.tokenizer
    inference = SimpleNamespace(tokenizer=tok, template=d.template, system_prompt=d.system_prompt)
    by_where = {e.where: e for e in examples}
    for where, ex in s.samples:
        tex = by_where.get(where)
        if tex is None:  # dropped, or cut away entirely (reported above)
            continue
        turns = training_turns(d.template, ex, tok, d.system_prompt, d.train_on)
        for k, (turn, start) in enumerate(zip(turns, tex.turn_starts)):
            if start > len(tex.input_ids):
                break  # this turn was truncated away
            sent = prompt_ids(inference, turn.prompt_example)
            trained = tex.input_ids[:start]
            if trained != sent:
                i = next((j for j, (a, b) in enumerate(zip(trained, sent)) if a != b), min(len(trained), len(sent)))
                which = f"assistant turn {k + 1} of {len(turns)}" if len(turns) > 1 else "the prompt"
                hint = ("; with data.train_on=last_assistant earlier turns are context, rendered as inference "
                        "renders them" if len(turns) > 1 else "")
                return (f"train/inference mismatch at {where}, {which}: training puts "
                        f"{show_tokens(tok, trained[i:i + 8])!r} at token {i} where inference sends "
                        f"{show_tokens(tok, sent[i:i + 8])!r} (the {d.template} template or the tokenizer treats "
                        f"the turns differently in a longer sequence, e.g. a turn that does not end with the EOS "
                        f"token {tok.eos_token!r}){hint}")
    return None


def _history_mismatch(s) -> str | None:
    """A chat template must render a finished conversation beginning with the prompt training used
    plus the reply; templates that rewrite earlier turns (or add a thinking block only to the
    generation prompt) show the model different history at the next turn than it was trained on."""
    d, tok = s.cfg.data, s.tokenizer
    for where, ex in s.samples:
        full = render_conversation(d.template, ex, tok, d.system_prompt)
        if full is None:
            return None
        if not full.startswith(render_prompt(d.template, ex, tok, d.system_prompt) + ex.response):
            return (f"train/inference template mismatch at {where}: the chat template renders the generation "
                    f"prompt differently from the same turns in a finished conversation (e.g. a thinking block "
                    f"only in the generation prompt); use data.template=alpaca or fix the tokenizer's chat template")
    return None


def show_tokens(tok, ids: list[int]) -> str:
    """Decode ids, showing special tokens as ⟦token⟧ so they can't hide."""
    special = set(tok.all_special_ids)
    out = []
    run: list[int] = []
    for i in ids:
        if i in special:
            if run:
                out.append(tok.decode(run))
                run = []
            out.append(f"⟦{tok.convert_ids_to_tokens(i)}⟧")
        else:
            run.append(i)
    if run:
        out.append(tok.decode(run))
    return "".join(out)


def render_spans(tok, example) -> list[tuple[str, bool]]:
    """A tokenized example as (text, trained) pieces in order, special tokens visible."""
    pieces, pos = [], 0
    for start, end in trained_spans(example.labels):
        if start > pos:
            pieces.append((show_tokens(tok, example.input_ids[pos:start]), False))
        pieces.append((show_tokens(tok, example.labels[start:end]), True))
        pos = end
    if pos < len(example.input_ids):
        pieces.append((show_tokens(tok, example.input_ids[pos:]), False))
    return pieces
