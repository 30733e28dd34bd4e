"""The one prompt-template definition used by training, generation, evaluation, serving and export.

A template turns an `Example` (instruction, input and chat turns; the run's system prompt comes
with the template) into the exact prompt text the model sees. `render_prompt` is the only function
that does this: training (`training_turns`, via data/pipeline.py), `tunelab generate` (also for
`-f rows.jsonl`), `eval` (ppl: tasks), `compare`, `serve` and export verification all call it with
the whole example, so the train and inference prompts can't drift apart (RECIPE.md defect 1: the
source trained on `### Response:\\n` and evaluated on `### Response: \\n`; an earlier tunelab joined
instruction and input into one string at inference while training rendered `### Input:`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# RECIPE.md section 2, character for character. Plain concatenation, not an indented
# triple-quoted string, so no stray indentation can creep in.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)
# The original Alpaca wording for rows that carry an `input`.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)
TEMPLATES = ("alpaca", "chat_template", "plain")
TRAIN_ON = ("all_assistant", "last_assistant")


class TemplateError(ValueError):
    """An example the template can't render (e.g. several chat turns for the alpaca template)."""


@dataclass
class Example:
    """One training or generation example in tunelab's canonical shape."""

    instruction: str = ""
    input: str = ""
    response: str = ""
    messages: list[dict] | None = field(default=None)
    """For chat data: the conversation before the final assistant turn (earlier assistant turns included)."""

    def display(self) -> str:
        """The user's side of the example as one text, for tables and output files (never for the model)."""
        if self.messages is not None:
            users = [m.get("content", "") for m in self.messages if m.get("role") == "user"]
            return users[-1] if users else ""
        return self.instruction + (f"\n\n{self.input}" if self.input else "")


def _single_instruction(template: str, example: Example) -> tuple[str, str]:
    """(instruction, input) of an example for a template without turns; chat turns it can't show are refused."""
    if example.messages is None:
        return example.instruction, example.input
    roles = [m.get("role") for m in example.messages]
    if "system" in roles:
        raise TemplateError(f"the {template} template has no place for a system message (only chat_template "
                            f"renders one)")
    if roles != ["user"]:
        raise TemplateError(f"the {template} template renders one instruction, not a conversation of "
                            f"{len(roles)} turns; send one user message, or use a model trained with chat_template")
    return example.messages[0].get("content", ""), ""


def conversation(example: Example, system_prompt: str | None = None) -> list[dict]:
    """The chat messages of an example before its final reply, with the run's system prompt first
    when the example has no system message of its own. An instruction row is one user turn."""
    if example.messages is not None:
        messages = [dict(m) for m in example.messages]
    else:
        content = example.instruction + (("\n\n" + example.input) if example.input else "")
        messages = [{"role": "user", "content": content}]
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_prompt(template: str, example: Example, tokenizer=None, system_prompt: str | None = None) -> str:
    """The prompt text for `example`, ending exactly where the (final) response starts.

    `system_prompt` is the run's data.system_prompt; only chat_template renders it (the Alpaca text
    has no system part; `tunelab check` warns when one is set for alpaca/plain)."""
    if template == "alpaca":
        instruction, inp = _single_instruction(template, example)
        if inp:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
        return ALPACA_PROMPT.format(instruction=instruction)
    if template == "plain":
        instruction, inp = _single_instruction(template, example)
        return instruction + (("\n" + inp) if inp else "")
    if template == "chat_template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template chat_template: the tokenizer has no chat template")
        return _apply(tokenizer, conversation(example, system_prompt), add_generation_prompt=True)
    raise TemplateError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")


def render_conversation(template: str, example: Example, tokenizer=None,
                        system_prompt: str | None = None) -> str | None:
    """The whole conversation with its final reply, as the template renders finished history (chat
    templates only; None for the others). The preflight checks that it begins with what training used."""
    if template != "chat_template":
        return None
    msgs = conversation(example, system_prompt) + [{"role": "assistant", "content": example.response}]
    return _apply(tokenizer, msgs, add_generation_prompt=False)


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    # raise_exception(...) in a chat template, e.g. "roles must alternate", is jinja2's TemplateError
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as e:
        roles = "/".join(m.get("role", "?") for m in messages)
        raise TemplateError(f"the tokenizer's chat template refuses a conversation {roles}: {e}") from None


@dataclass
class Turn:
    """One trained reply: the masked text before it (the whole prompt for the first), the trained
    reply (EOS follows it) and the example inference is sent for that turn (for the parity check)."""

    before: str
    reply: str
    prompt_example: Example


def training_turns(template: str, example: Example, tokenizer=None, system_prompt: str | None = None,
                   train_on: str = "all_assistant") -> list[Turn]:
    """The example as training sees it: each trained assistant turn with the text before it.

    Every prompt comes from `render_prompt` on the conversation up to that turn, i.e. what
    `generate`/`serve` send for it. The text between two replies is the next prompt minus what the
    sequence already holds (previous prompt + reply + EOS). A template that renders history
    differently from the turn it generated (a thinking block, or an end-of-turn other than EOS)
    makes that difference not a prefix; the sequence is then built anyway and `tunelab check`
    reports the mismatch as fatal (with data.train_on=last_assistant, only the last turn is trained
    and earlier ones are rendered as history, as inference renders them)."""
    if train_on not in TRAIN_ON:
        raise TemplateError(f"unknown data.train_on {train_on!r} (known: {', '.join(TRAIN_ON)})")
    last = Turn(render_prompt(template, example, tokenizer, system_prompt), example.response, example)
    if template != "chat_template" or not example.messages or train_on == "last_assistant":
        return [last]
    msgs = example.messages
    # assistant turns with a user turn before them (a greeting that opens a chat has no prompt to answer)
    points = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"
              and any(x.get("role") not in ("system", "assistant") for x in msgs[:i])]
    turns, covered = [], ""
    for i in points + [len(msgs)]:
        pe = Example(messages=msgs[:i]) if i < len(msgs) else example
        reply = msgs[i]["content"] if i < len(msgs) else example.response
        prompt = render_prompt(template, pe, tokenizer, system_prompt) if i < len(msgs) else last.before
        n = len(covered) if prompt.startswith(covered) else _common_prefix(prompt, covered)
        turns.append(Turn(prompt[n:], reply, pe))
        covered = prompt + reply + tokenizer.eos_token
    return turns


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt, with BOS added once (chat templates often write it themselves)."""
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def example_from_row(row: dict) -> Example | None:
    """An inference example from a JSONL row: tunelab's {prompt} / {instruction, input} / {messages}
    (a final assistant message is the reference answer and is left out), MT-Bench/Vicuna's {turns}
    (the first turn) or KULLM's {instruction, instances: [{input}]}. None when the row has none of these."""
    if isinstance(row.get("prompt"), str):
        return Example(instruction=row["prompt"])
    if isinstance(row.get("instruction"), str):
        inp = row.get("input") or ""
        if not inp and isinstance(row.get("instances"), list) and row["instances"]:
            inp = row["instances"][0].get("input") or ""
        return Example(instruction=row["instruction"], input=inp if isinstance(inp, str) else str(inp))
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in msgs):
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        reply = ""
        if msgs[-1]["role"] == "assistant":
            reply = msgs.pop()["content"]
        return Example(messages=msgs, response=reply) if msgs else None
    if isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
        return Example(instruction=row["turns"][0])
    return None


def response_start_marker(template: str) -> str | None:
    """The text that ends the prompt, for display only (never used for masking)."""
    return "### Response:\n" if template == "alpaca" else None
