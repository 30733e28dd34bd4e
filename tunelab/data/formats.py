"""Row formats: turn a raw data row into an `Example`, with field names mappable in the config."""

from __future__ import annotations

from typing import Any

from .templates import Example

FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
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
    col = {name: fields.get(name, name) for name in ("instruction", "input", "output", "prompt", "completion", "messages")}
    if fmt == "alpaca":
        ex = Example(instruction=_text(row, col["instruction"], True, "instruction"),
                     input=_text(row, col["input"], False, "input"),
                     response=_text(row, col["output"], True, "output"))
    elif fmt == "prompt_completion":
        ex = Example(instruction=_text(row, col["prompt"], True, "prompt"),
                     response=_text(row, col["completion"], True, "completion"))
    elif fmt == "chat":
        msgs = row.get(col["messages"])
        if not isinstance(msgs, list) or not msgs:
            raise BadRowError(f"field '{col['messages']}' must be a non-empty list of {{role, content}}")
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise BadRowError(f"each message needs 'role' and text 'content', got {str(m)[:60]}")
        if msgs[-1]["role"] != "assistant":
            raise BadRowError("the last message must be the assistant's (the trained answer)")
        # Only the final assistant turn is trained; earlier turns are context.
        ex = Example(messages=[{"role": m["role"], "content": m["content"]} for m in msgs[:-1]],
                     response=msgs[-1]["content"])
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if not ex.response.strip():
        raise RowError("empty response")
    if ex.messages is None and not ex.instruction.strip():
        raise RowError("empty instruction/prompt")
    return ex
