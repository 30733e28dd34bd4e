"""Chat data as users bring it: ShareGPT, role-name mapping, OpenAI content parts, a JSON array named .jsonl."""

import json

import pytest

from tunelab.config import ConfigError, DataConfig, load_config
from tunelab.data.pipeline import DataStats, load_examples
from tunelab.data.sources import DataError

SHAREGPT = [
    {"system": "Be brief.",
     "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                       {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"conversations": [{"from": "system", "value": "Answer in French."}, {"from": "user", "value": "Yes?"},
                       {"from": "assistant", "value": "Oui."}]},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path, **kw):
    cfg = DataConfig(path=str(path), template="chat_template", **kw)
    return [ex for _, ex in load_examples(cfg, str(path), DataStats())]


def test_sharegpt_conversations_with_role_names(tmp_path):
    f = _write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    a, b = _load(f, format="sharegpt")
    assert a.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    assert a.response == "4"
    assert b.messages == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Yes?"}]
    assert b.response == "Oui."


def test_sharegpt_column_mapping_and_chat_hint(tmp_path):
    f = _write_jsonl(tmp_path / "sg.jsonl", [{"dialog": SHAREGPT[1]["conversations"]}])
    (ex,) = _load(f, format="sharegpt", fields={"conversations": "dialog"})
    assert ex.response == "Oui."
    g = _write_jsonl(tmp_path / "g.jsonl", SHAREGPT[:1])
    with pytest.raises(DataError, match=r"g.jsonl:1: missing field 'messages' \(this row has 'conversations': "
                                        r"set data.format=sharegpt\)"):
        _load(g, format="chat")


def test_openai_messages_with_content_parts_and_sharegpt_roles(tmp_path):
    rows = [{"messages": [{"role": "developer", "content": [{"type": "text", "text": "Rules."}]},
                          {"role": "human", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
                          {"role": "gpt", "content": [{"type": "text", "text": "Done."}]}]}]
    (ex,) = _load(_write_jsonl(tmp_path / "c.jsonl", rows), format="chat")
    assert ex.messages == [{"role": "system", "content": "Rules."}, {"role": "user", "content": "Part one.\nPart two."}]
    assert ex.response == "Done."


@pytest.mark.parametrize("turns,expected", [
    ([{"from": "robot", "value": "x"}], "has role 'robot'; known: system"),
    ([{"from": "human", "value": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"from": "gpt", "value": "y"}],
     "content part of type 'image_url'; only text parts can be trained"),
    ([{"from": "human", "value": "x"}], "the last message must be the assistant's"),
    ([{"from": "human", "value": None}, {"from": "gpt", "value": "y"}], "turn 1 of 'conversations' needs text content"),
])
def test_bad_turns_name_the_line(tmp_path, turns, expected):
    f = _write_jsonl(tmp_path / "b.jsonl", [SHAREGPT[1], {"conversations": turns}])
    with pytest.raises(DataError) as e:
        _load(f, format="sharegpt")
    assert str(e.value).startswith(f"{f}:2: ") and expected in str(e.value), str(e.value)
    stats = DataStats()
    out = load_examples(DataConfig(path=str(f), format="sharegpt", template="chat_template", skip_bad_rows=True),
                        str(f), stats)
    assert len(out) == 1 and sum(stats.dropped.values()) == 1


def test_json_array_under_jsonl_name(tmp_path):
    f = tmp_path / "arr.jsonl"
    f.write_text(json.dumps(SHAREGPT, indent=2, ensure_ascii=False), encoding="utf-8")
    assert [ex.response for ex in _load(f, format="sharegpt")] == ["4", "Oui."]


def test_sharegpt_needs_chat_template(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  path: d.jsonl\n  format: sharegpt\n")
    with pytest.raises(ConfigError, match="data.format=sharegpt needs data.template=chat_template"):
        load_config(cfg)


def test_sharegpt_trains_through_the_chat_template(tmp_path, tiny_model, capsys):
    from tunelab.cli import main

    f = _write_jsonl(tmp_path / "sg.jsonl", SHAREGPT * 2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model}\ndata:\n  path: {f}\n  format: sharegpt\n"
                   f"  template: chat_template\n  max_seq_length: 128\n")
    main(["check", str(cfg), "--set", "data.shuffle=false"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "read 4, kept 4" in text, text[-3000:]
    assert "Be brief." in text and "2+2?" in text and "▶4" in text, text[-3000:]


def test_tool_call_turns_are_carried_for_the_template(tmp_path):
    call = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    rows = [{"messages": [{"role": "user", "content": "1+2?"},
                          {"role": "assistant", "content": None, "tool_calls": call},
                          {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "3"},
                          {"role": "assistant", "content": "3"}]}]
    (ex,) = _load(_write_jsonl(tmp_path / "t.jsonl", rows), format="chat")
    assert ex.messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert ex.messages[2] == {"role": "tool", "content": "3", "name": "add", "tool_call_id": "c1"}
    assert ex.response == "3"
