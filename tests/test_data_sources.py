"""Data readers: the standard line semantics of CSV and JSON Lines, null fields, skip_bad_rows, one JSONL reader."""

import csv
import json

import pytest

from tunelab.config import DataConfig
from tunelab.data.pipeline import DataStats, load_examples
from tunelab.data.sources import DataError, parse_jsonl, read_rows

TRICKY = ["Line one.\nLine two.", "para\u2028graph", "next\u0085line", "sep\u2029x", "form\x0cfeed", "vt\x0bx"]


def test_csv_keeps_newlines_inside_quoted_fields(tmp_path):
    f = tmp_path / "d.csv"
    with f.open("w", newline="", encoding="utf-8") as fh:  # written by the csv module itself
        w = csv.writer(fh)
        w.writerow(["instruction", "output"])
        w.writerow(["Two lines, please.", "Line one.\nLine two."])
        w.writerow(["Windows ending", "a\r\nb"])
        w.writerow(["plain", "x"])
    rows = read_rows(str(f))
    assert [r["output"] for r in rows] == ["Line one.\nLine two.", "a\r\nb", "x"]
    assert [r["__line__"] for r in rows] == [2, 4, 6]  # the line each row starts on


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    f = tmp_path / "d.jsonl"
    rows_in = [{"instruction": f"q{i}", "output": t} for i, t in enumerate(TRICKY)]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_in), encoding="utf-8")
    assert "\u2028" in f.read_text(encoding="utf-8")  # raw in the file, as json.dumps(ensure_ascii=False) leaves it
    rows = read_rows(str(f))
    assert [r["output"] for r in rows] == TRICKY
    assert [r["__line__"] for r in rows] == list(range(1, len(TRICKY) + 1))


def test_jsonl_crlf_and_blank_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"instruction": "a", "output": "b"}\r\n\r\n{"instruction": "c", "output": "d"}\r\n')
    assert [(r["output"], r["__line__"]) for r in read_rows(str(f))] == [("b", 1), ("d", 3)]


def test_one_jsonl_reader_for_prompts_and_benchmarks(tmp_path, monkeypatch):
    from tunelab.evaluate import tasks
    from tunelab.generate import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n"
                 + json.dumps({"prompt": "c\u0085d"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [e.instruction for e in read_prompts([], str(f))] == ["a\u2028b", "c\u0085d"]
    assert [r["prompt"] for r in tasks._read_jsonl(f)] == ["a\u2028b", "c\u0085d"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(tasks.TaskError, match=r"bad.jsonl:2: malformed JSON"):
        tasks._read_jsonl(bad)


def test_parse_jsonl_names_the_line():
    assert parse_jsonl('{"a": 1}\n\n[2]\n', "x") == [(1, {"a": 1}), (3, [2])]
    with pytest.raises(DataError, match=r"^src:2: malformed JSON"):
        parse_jsonl('{"a": 1}\n{"a": \u2028}\n', "src")


def test_json_array_saved_as_jsonl_is_read(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}], indent=2))
    assert [r["output"] for r in read_rows(str(f))] == ["b", "d"]
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: this .jsonl file holds a JSON array"):
        read_rows(str(f))


def _null_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "input": "", "output": "b"}\n'
                 '{"instruction": "c", "input": "", "output": null}\n'
                 '{"instruction": "e", "input": null, "output": "f"}\n', encoding="utf-8")
    return f


def test_null_field_is_named_with_its_line(tmp_path):
    f = _null_file(tmp_path)
    with pytest.raises(DataError) as e:
        load_examples(DataConfig(path=str(f)), str(f), DataStats())
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: field 'output' is null"), msg
    assert "missing" not in msg and "data.skip_bad_rows" in msg


def test_skip_bad_rows_drops_and_counts(tmp_path):
    f = _null_file(tmp_path)
    stats = DataStats()
    out = load_examples(DataConfig(path=str(f), skip_bad_rows=True), str(f), stats)
    assert [ex.response for _, ex in out] == ["b", "f"]  # a null optional input is an empty input
    assert stats.dropped == {"bad row (data.skip_bad_rows): field 'output' is null": 1}
    assert stats.dropped_examples["bad row (data.skip_bad_rows): field 'output' is null"] == [f"{f}:2"]


def test_check_prints_skipped_rows(tmp_path, tiny_model, capsys):
    from tunelab.cli import main

    f = _null_file(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model}\ndata:\n  path: {f}\n  max_seq_length: 128\n"
                   f"  skip_bad_rows: true\n")
    assert main(["check", str(cfg)]) in (0, 2)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "read 3, kept 2" in text and "field 'output' is null" in text, text[-2000:]


def test_skip_bad_rows_is_a_validated_bool(tmp_path):
    from tunelab.config import ConfigError, load_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  path: d.jsonl\n  skip_bad_rows: sometimes\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: data.skip_bad_rows: expected true or false"):
        load_config(cfg)
