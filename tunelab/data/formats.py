"""Row formats: turn a raw data row into an `Example`, with field names mappable in the config."""

from __future__ import annotations

from typing import Any

from .templates import Example

FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
}
CHAT_FORMATS = ("chat", "sharegpt")

# Role names of the common chat datasets -> the chat-template roles (ShareGPT's human/gpt, OpenAI's
# user/assistant/system/developer, Gemini's model, tool results), as axolotl's and LLaMA-Factory's
# ShareGPT readers map them.
ROLE_NAMES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "function_call": "assistant",  # LLaMA-Factory ShareGPT: the assistant's call, its value the call JSON
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}


class RowError(ValueError):
    """A row that can't be used; the message is the reason (used in drop counts and errors)."""


class BadRowError(RowError):
    """A row whose shape is wrong (a field missing, null or of the wrong type): an error naming file:line,
    or with data.skip_bad_rows a dropped row counted in the stats. Plain RowErrors (empty text) are drops."""


def _text(row: dict, column: str, required: bool, label: str) -> str:
    if column not in row:
        if required:
            raise BadRowError(f"missing field '{column}'" + (f" (mapped from {label})" if column != label else ""))
        return ""
    if row[column] is None:
        if required:
            raise BadRowError(f"field '{column}' is null")
        return ""
    value = row[column]
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise BadRowError(f"field '{column}' should be text, got {type(value).__name__}")
    return value


def to_example(row: dict[str, Any], fmt: str, fields: dict[str, str]) -> Example:
    col = {name: fields.get(name, name)
           for name in ("instruction", "input", "output", "prompt", "completion", "messages", "conversations")}
    if fmt == "alpaca":
        ex = Example(instruction=_text(row, col["instruction"], True, "instruction"),
                     input=_text(row, col["input"], False, "input"),
                     response=_text(row, col["output"], True, "output"))
    elif fmt == "prompt_completion":
        ex = Example(instruction=_text(row, col["prompt"], True, "prompt"),
                     response=_text(row, col["completion"], True, "completion"))
    elif fmt in CHAT_FORMATS:
        msgs = chat_messages(row, fmt, col)
        if msgs[-1]["role"] != "assistant":
            raise BadRowError("the last message must be the assistant's (the trained answer)")
        # Only the final assistant turn is trained; earlier turns are context.
        ex = Example(messages=msgs[:-1], response=msgs[-1]["content"])
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if not ex.response.strip():
        raise RowError("empty response")
    if ex.messages is None and not ex.instruction.strip():
        raise RowError("empty instruction/prompt")
    return ex


def chat_messages(row: dict[str, Any], fmt: str = "chat", col: dict[str, str] | None = None) -> list[dict]:
    """A row's conversation as [{role, content}] with the chat-template role names and text content.

    chat: `messages` of {role, content}; sharegpt: `conversations` of {from, value}. Either accepts the
    other's key names inside a turn, ShareGPT role names (human/gpt), and OpenAI content parts (a list
    of {"type": "text", "text": ...}, joined with newlines). A top-level `system` text (ShareGPT
    datasets carry one) becomes the first message. Tool-call fields (tool_calls, name, tool_call_id)
    are carried along for templates that render them.
    """
    key = (col or {}).get("messages" if fmt == "chat" else "conversations",
                          "messages" if fmt == "chat" else "conversations")
    raw = row.get(key)
    if raw is None:
        other = "conversations" if fmt == "chat" else "messages"
        hint = f" (this row has '{other}': set data.format={'sharegpt' if fmt == 'chat' else 'chat'})" \
            if other in row else ""
        raise BadRowError(f"missing field '{key}'{hint}")
    if not isinstance(raw, list) or not raw:
        raise BadRowError(f"field '{key}' must be a non-empty list of "
                          + ("{role, content}" if fmt == "chat" else "{from, value}"))
    msgs = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        msgs.append({"role": "system", "content": row["system"]})
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise BadRowError(f"turn {i} of '{key}' is not an object: {str(m)[:60]}")
        role = m.get("role", m.get("from"))
        if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
            raise BadRowError(f"turn {i} of '{key}' has role {role!r}; known: {', '.join(ROLE_NAMES)}")
        content = m.get("content", m.get("value"))
        if isinstance(content, list):  # OpenAI content parts
            texts = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif (isinstance(part, dict) and part.get("type", "text") == "text"
                      and isinstance(part.get("text"), str)):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise BadRowError(f"turn {i} of '{key}' has a content part of type {kind!r}; "
                                      f"only text parts can be trained")
            content = "\n".join(texts)
        role = ROLE_NAMES[role.lower()]
        if content is None and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise BadRowError(f"turn {i} of '{key}' needs text content, got {str(m)[:60]}")
        msg = {"role": role, "content": content}
        for extra in ("tool_calls", "name", "tool_call_id"):
            if m.get(extra) is not None:
                msg[extra] = m[extra]
        msgs.append(msg)
    return msgs
