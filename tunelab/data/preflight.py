"""Preflight: catch the classic fine-tuning mistakes before any weights load.

`tunelab check run.yaml` prints the report; `tunelab train` runs the same fatal checks first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .pipeline import IGNORE_INDEX
from .templates import Example, encode_prompt, render_prompt, response_start_marker


class PreflightError(ValueError):
    """A fatal preflight finding; the message says what and how to fix it."""


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_examples(s) -> Report:
    """Fatal and advisory checks over a prepared `train.Setup`."""
    r = Report()
    tok, cfg = s.tokenizer, s.cfg
    if tok.pad_token_id is None:
        r.errors.append("tokenizer has no pad token")
    elif tok.pad_token_id == tok.eos_token_id:
        r.errors.append(f"pad token == EOS ({tok.eos_token!r}): the EOS would be masked as padding and the model "
                        f"would never learn to stop; set model.pad_token to another token")
    eos = tok.eos_token_id
    examples = s.train + s.evals
    no_eos = [i for i, e in enumerate(examples) if not e.truncated and (e.labels[-1] != eos or e.input_ids[-1] != eos)]
    if no_eos:
        r.errors.append(f"{len(no_eos)} examples do not end in a trained EOS token ({tok.eos_token!r})")
    untrained = [i for i, e in enumerate(examples) if e.n_trained == 0]
    if untrained:
        r.errors.append(f"{len(untrained)} examples have no trained token")
    # Train/inference prompt parity: the ids generation would feed for an example must be exactly
    # the masked prefix training used. (Both go through templates.render_prompt, so this fails
    # only if a tokenizer or chat template treats a prompt differently on its own.)
    mismatch = _template_mismatch(s)
    if mismatch:
        r.errors.append(mismatch)
    if s.stats.truncated:
        share = s.stats.truncated / max(1, s.stats.train_rows)
        r.warnings.append(f"{s.stats.truncated} training examples ({share:.1%}) are longer than "
                          f"data.max_seq_length={cfg.data.max_seq_length} and were truncated (their EOS is cut off)")
    if cfg.data.test_size == 0 and not cfg.data.eval_path:
        r.warnings.append("no evaluation data (data.test_size or data.eval_path): overfitting can't be seen")
    return r


def _template_mismatch(s) -> str | None:
    cfg, tok = s.cfg, s.tokenizer
    for where, ex in s.samples:
        prompt = render_prompt(cfg.data.template, ex, tok, cfg.data.system_prompt)
        if cfg.data.template == "chat_template":
            # The conversation rendered whole must begin with the generation prompt; templates that
            # rewrite earlier turns (or add a thinking block) break this and train a different prompt.
            msgs = list(ex.messages or [{"role": "user", "content": ex.instruction}])
            if cfg.data.system_prompt and msgs[0].get("role") != "system":
                msgs = [{"role": "system", "content": cfg.data.system_prompt}] + msgs
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": ex.response}], tokenize=False)
            if not full.startswith(prompt):
                return (f"train/inference template mismatch at {where}: the chat "
                        f"template renders the generation prompt differently from the same turns in a full "
                        f"conversation; use data.template=alpaca or fix the tokenizer's chat template")
        marker = response_start_marker(cfg.data.template)
        if marker and not prompt.endswith(marker):
            return f"train/inference template mismatch: the {cfg.data.template} prompt does not end with {marker!r}"
        if encode_prompt(tok, prompt) != encode_prompt(tok, render_prompt(cfg.data.template, Example(
                instruction=ex.instruction, input=ex.input, messages=ex.messages), tok, cfg.data.system_prompt)):
            return "train/inference template mismatch: the prompt depends on the response"
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


def render_trained_span(tok, example) -> tuple[str, str]:
    """(masked prompt text, trained text) of a tokenized example, special tokens visible."""
    prompt_ids = [i for i, l in zip(example.input_ids, example.labels) if l == IGNORE_INDEX]
    trained_ids = [l for l in example.labels if l != IGNORE_INDEX]
    return show_tokens(tok, prompt_ids), show_tokens(tok, trained_ids)
