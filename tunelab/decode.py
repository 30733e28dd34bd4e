"""The one decoding core: `decode(loaded, rows)` turns a batch of prompts into completions.

`tunelab generate` (generate.generate_batch, and through it chat, eval, judge, compare and synth) and
`tunelab serve`'s batching engine both call it; nothing else in tunelab decodes text for a user. Each row
has its own prompt ids, settings (a generate.GenParams: max_new_tokens, greedy or sampling with its
temperature/top_p/top_k/repetition_penalty and seed, stop strings) and optional callbacks: `on_text`
receives the completion piece by piece as it becomes final (streaming), `on_done` the finished row the
moment it ends (a server answers that client without waiting for the rest of the batch).

The loop itself is transformers' `model.generate` on one left-padded batch (KV cache, position ids from
the attention mask, the model's own generation_config processors, EOS). What generate cannot do per row
is added through its two public extension points:

- `_RowSampling` (a LogitsProcessor): each row's repetition penalty, temperature, top-k and top-p
  (transformers' own processors, applied to that row only) and, for a sampling row, the draw itself from
  the row's own torch.Generator seeded with its seed; the drawn token is left as the only finite score,
  so generate's greedy pick returns it. generate's own sampling has one temperature for the batch and
  draws from the global RNG, so a sample would depend on which other requests shared the batch; here a
  seeded row gives the same text alone, in any batch, through `generate` or through `serve`.
- `_RowEnds` (a StoppingCriteria): each row ends at EOS, at its own max_new_tokens, or once its generated
  text (never the prompt) contains one of its stop strings; the text returned is cut before the first
  stop string (`cut_at_stop`), without a trailing incomplete character (`decode_whole`). Streaming holds
  back the characters that could still begin a stop string and any unfinished multi-byte character, so
  the streamed pieces add up to exactly the returned text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclass
class Row:
    ids: list[int]  # the prompt's token ids
    params: Any  # generate.GenParams (duck-typed here: generate imports this module)
    on_text: Callable[[str], None] | None = None
    on_done: Callable[["Decoded"], None] | None = None


@dataclass
class Decoded:
    ids: list[int]  # generated ids, without the EOS
    text: str  # cut before the first stop string, no trailing incomplete character
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(the text before the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def decode_whole(tok, ids: list[int]) -> str:
    """The text of generated ids without a trailing incomplete character: byte-level tokenizers split a
    Hangul syllable (3 UTF-8 bytes) into several tokens, and a reply cut between them would end in U+FFFD.
    Up to 3 trailing tokens (the bytes of one incomplete character) are held back."""
    text = tok.decode(ids, skip_special_tokens=True)
    for k in range(1, min(3, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        text = tok.decode(ids[:-k], skip_special_tokens=True)
    return text


class _RowEnds(StoppingCriteria):
    """Per-row ends (EOS, max_new_tokens, stop strings), streaming and results; see the module doc."""

    def __init__(self, tok, rows: list[Row]):
        self.tok, self.rows = tok, rows
        self.generated: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self.done: list[Decoded | None] = [None] * len(rows)

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if self.done[i] is not None:
                continue
            t, p = last[i], row.params
            if t == self.tok.eos_token_id:
                self.finish(i, "stop")
                continue
            self.generated[i].append(t)
            if p.stop or row.on_text:
                text, hit = cut_at_stop(self.tok.decode(self.generated[i], skip_special_tokens=True), p.stop)
                if hit:
                    self.finish(i, "stop")
                    continue
                if row.on_text:  # what can no longer change: not the tail that could begin a stop string,
                    upto = max(0, len(text) - (max((len(s) for s in p.stop), default=1) - 1))
                    bad = text.find("\ufffd", len(self.sent[i]))  # nor an unfinished multi-byte character
                    self._send(i, text[:upto if bad < 0 else min(upto, bad)])
            if len(self.generated[i]) >= p.max_new_tokens:
                self.finish(i, "length")
        return torch.tensor([d is not None for d in self.done], dtype=torch.bool, device=input_ids.device)

    def _send(self, i: int, text: str) -> None:
        if len(text) > len(self.sent[i]):
            self.rows[i].on_text(text[len(self.sent[i]):])
            self.sent[i] = text

    def finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        text, hit = cut_at_stop(decode_whole(self.tok, self.generated[i]), row.params.stop)
        self.done[i] = Decoded(self.generated[i], text, "stop" if hit else reason)
        if row.on_text:
            self._send(i, text)
        if row.on_done:
            row.on_done(self.done[i])


class _RowSampling(LogitsProcessor):
    """Each row's own logits processing and sampling; see the module doc."""

    def __init__(self, rows: list[Row], pads: list[int], ends: _RowEnds, device):
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.pads, self.ends = pads, ends
        self.procs, self.gens = [], []
        for row in rows:  # transformers' order: repetition penalty, then temperature, top-k, top-p
            p, procs = row.params, []
            if p.repetition_penalty is not None:
                procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
            if p.do_sample:
                if p.temperature is not None:
                    procs.append(TemperatureLogitsWarper(p.temperature))
                if p.top_k is not None:
                    procs.append(TopKLogitsWarper(p.top_k))
                if p.top_p is not None and p.top_p < 1.0:
                    procs.append(TopPLogitsWarper(p.top_p))
            self.procs.append(procs)
            self.gens.append(torch.Generator(device=device).manual_seed(int(p.seed)) if p.do_sample else None)

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for i, procs in enumerate(self.procs):
            if self.ends.done[i] is not None or (not procs and self.gens[i] is None):
                continue
            row = scores[i:i + 1]
            seq = input_ids[i:i + 1, self.pads[i]:]  # the row's own ids: no left padding in the penalty
            for proc in procs:
                row = proc(seq, row)
            if self.gens[i] is not None:
                pick = torch.multinomial(torch.softmax(row, -1), 1, generator=self.gens[i])
                row = torch.full_like(row, float("-inf")).scatter(-1, pick, 0.0)
            out[i] = row[0]
        return out


@torch.inference_mode()
def decode(loaded, rows: list[Row]) -> list[Decoded]:
    """Decode `rows` as one left-padded batch on `loaded.model` (see the module doc); results in row order.
    `loaded` needs .model, .tokenizer and .device."""
    tok, model = loaded.tokenizer, loaded.model
    width = max(len(r.ids) for r in rows)
    pads = [width - len(r.ids) for r in rows]
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's last prompt token sits at the same column
        input_ids[i, pads[i]:] = torch.tensor(r.ids)
        mask[i, pads[i]:] = 1
    ends = _RowEnds(tok, rows)
    sampling = _RowSampling(rows, pads, ends, loaded.device)
    # do_sample=False: the draw is _RowSampling's; the sampling knobs are None so that a model's
    # generation_config cannot switch on batch-wide warpers behind the rows' backs.
    model.generate(input_ids=input_ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                   max_new_tokens=max(r.params.max_new_tokens for r in rows), do_sample=False,
                   temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, logits_processor=[sampling], stopping_criteria=[ends])
    for i, d in enumerate(ends.done):
        if d is None:  # generate stopped on a limit of its own (max_length of the model's generation_config)
            ends.finish(i, "length")
    return ends.done  # type: ignore[return-value]
