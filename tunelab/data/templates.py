"""The one prompt-template definition used by training, generation and evaluation.

A template turns an `Example` (without its response) into the exact prompt text the model sees.
Training appends the response and EOS after it; generation stops there and lets the model write.
Because both call `render_prompt`, the train and inference prompts can't drift apart (RECIPE.md
defect 1: the source trained on `### Response:\\n` and evaluated on `### Response: \\n`).
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


@dataclass
class Example:
    """One training or generation example in tunelab's canonical shape."""

    instruction: str = ""
    input: str = ""
    response: str = ""
    messages: list[dict] | None = field(default=None)
    """For chat data: the conversation before the trained assistant turn."""


def render_prompt(template: str, example: Example, tokenizer=None, system_prompt: str | None = None) -> str:
    """The prompt text for `example`, ending exactly where the response starts."""
    if template == "alpaca":
        if example.input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_PROMPT.format(instruction=example.instruction)
    if template == "plain":
        return example.instruction + (("\n" + example.input) if example.input else "")
    if template == "chat_template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template chat_template: the tokenizer has no chat template")
        messages = list(example.messages or [])
        if not messages:
            content = example.instruction + (("\n\n" + example.input) if example.input else "")
            messages = [{"role": "user", "content": content}]
        if system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt, with BOS added once (chat templates often write it themselves)."""
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def response_start_marker(template: str) -> str | None:
    """The text that ends the prompt, for display and sanity checks only (never used for masking)."""
    return "### Response:\n" if template == "alpaca" else None
