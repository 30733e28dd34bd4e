"""The training template, written in the formats the serving side reads.

`render_prompt` (data/templates.py) is what training, generate and serve render. An export must
carry the same text to engines that never run tunelab:

- `jinja_template`: a Hugging Face chat template (tokenizer_config / chat_template.jinja, the GGUF's
  `tokenizer.chat_template`, vLLM's --chat-template) whose `apply_chat_template(messages,
  add_generation_prompt=True)` equals `render_prompt` for the run's template and system prompt.
  Alpaca and plain take one user message (its optional `input` key selects the with-input Alpaca
  wording) and refuse a system message or several turns, as `render_prompt` does; a final
  assistant message renders as training saw it (reply + EOS). For chat_template runs it is the
  tokenizer's own template with the run's system prompt put first when the conversation has none.
- `go_template`: the same prompt as an Ollama TEMPLATE (Go text/template: {{ .System }},
  {{ .Prompt }}, {{ if .System }}), made by rendering the Jinja template on placeholder messages
  and checked to round-trip, so it is never a hand-written guess of a model's chat format.
"""

from __future__ import annotations

import json

from .data.templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    Example,
    TemplateError,
    render_prompt,
)


def _lit(s: str) -> str:
    """A Jinja expression for the literal string s (JSON string syntax is valid Jinja)."""
    return json.dumps(s)


_ONE_USER = (
    "{%- if messages | length == 0 or messages[0]['role'] == 'system' -%}"
    "{{ raise_exception('the TEMPLATE template has no place for a system message (only chat_template renders one)') }}"
    "{%- endif -%}"
    "{%- set n = messages | length - (1 if messages[-1]['role'] == 'assistant' else 0) -%}"
    "{%- if n != 1 or messages[0]['role'] != 'user' -%}"
    "{{ raise_exception('the TEMPLATE template renders one instruction, not a conversation; send one user message') }}"
    "{%- endif -%}"
    "{%- set m = messages[0] -%}"
)
_REPLY = ("{%- if messages[-1]['role'] == 'assistant' -%}"
          "{{ messages[-1]['content'] }}{{ eos_token }}"
          "{%- endif -%}")


def _alpaca_jinja() -> str:
    def fill(s: str) -> str:  # the exact Alpaca text with {instruction}/{input} as Jinja expressions
        out, rest = [], s
        while "{" in rest:
            before, _, after = rest.partition("{")
            name, _, rest = after.partition("}")
            out += [f"{{{{ {_lit(before)} }}}}", "{{ m['content'] }}" if name == "instruction" else "{{ m['input'] }}"]
        return "".join(out) + f"{{{{ {_lit(rest)} }}}}"

    return (_ONE_USER.replace("TEMPLATE", "alpaca")
            + "{%- if m['input'] is defined and m['input'] -%}" + fill(ALPACA_PROMPT_WITH_INPUT)
            + "{%- else -%}" + fill(ALPACA_PROMPT) + "{%- endif -%}" + _REPLY)


def _plain_jinja() -> str:
    return (_ONE_USER.replace("TEMPLATE", "plain") + "{{ m['content'] }}"
            "{%- if m['input'] is defined and m['input'] -%}{{ '\\n' }}{{ m['input'] }}{%- endif -%}" + _REPLY)


def jinja_template(template: str, tokenizer=None, system_prompt: str | None = None) -> str:
    """A Hugging Face chat template rendering what `render_prompt(template, ..., system_prompt)` renders."""
    if template == "alpaca":
        return _alpaca_jinja()
    if template == "plain":
        return _plain_jinja()
    if template == "chat_template":
        own = getattr(tokenizer, "chat_template", None)
        if not isinstance(own, str) or not own:
            raise TemplateError("template chat_template: the tokenizer has no (single) chat template")
        if not system_prompt:
            return own
        # templates.conversation(): the run's system prompt first unless the request brings its own
        return ("{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
                f"{{%- set messages = [{{'role': 'system', 'content': {_lit(system_prompt)}}}] + messages -%}}"
                "{%- endif -%}" + own)
    raise TemplateError(f"unknown template {template!r}")


# ---------------------------------------------------------------------------------------------
# Ollama

_P, _S = "TUNELABPROMPTPLACEHOLDER", "TUNELABSYSTEMPLACEHOLDER"


def _go_text(s: str) -> str:
    """Literal text inside a Go template ("{{" would start an action)."""
    return s.replace("{{", '{{ "{{" }}')


def go_template(template: str, tokenizer=None, system_prompt: str | None = None) -> tuple[str, str | None]:
    """(Ollama TEMPLATE, Ollama SYSTEM or None) for a single-turn prompt equal to render_prompt's.

    Made by rendering the run's template with placeholder text where the user's prompt and the
    system message go; for a chat template without a system turn of its own the TEMPLATE has an
    `{{ if .System }}` branch, and the run's system prompt becomes the Modelfile's SYSTEM."""
    def render(messages) -> str:
        return render_prompt(template, Example(messages=messages), tokenizer, None)

    bare = render([{"role": "user", "content": _P}])
    if bare.count(_P) != 1:
        raise TemplateError(f"the {template} template does not show the user's message verbatim once")
    if template != "chat_template":
        return _go_text(bare).replace(_P, "{{ .Prompt }}"), None
    with_sys = render([{"role": "system", "content": _S}, {"role": "user", "content": _P}])
    if with_sys.count(_S) != 1 or with_sys.count(_P) != 1:
        raise TemplateError("the chat template does not show the system message verbatim once")
    go = ("{{ if .System }}" + _go_text(with_sys).replace(_S, "{{ .System }}").replace(_P, "{{ .Prompt }}")
          + "{{ else }}" + _go_text(bare).replace(_P, "{{ .Prompt }}") + "{{ end }}")
    return go, system_prompt or None


def modelfile(gguf_name: str, template: str, tokenizer, system_prompt: str | None, stops: list[str],
              params: dict) -> str:
    """An Ollama Modelfile for the GGUF beside it."""
    go, system = go_template(template, tokenizer, system_prompt)
    if '"""' in go + (system or ""):
        raise TemplateError('the template contains """, which a Modelfile can\'t quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for s in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    for k, v in params.items():
        lines.append(f"PARAMETER {k} {v}")
    return "\n".join(lines) + "\n"
