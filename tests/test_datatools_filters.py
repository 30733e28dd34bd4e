"""Filters: `tunelab data filter` and the same filters as `data:` options of a run, each drop counted by reason."""

import json

import pytest

from test_datatools_dedup import run_cli
from tunelab.config import ConfigError, load_config
from tunelab.data.templates import Example
from tunelab.datatools.filters import RowFilter, repeats_instruction

ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5."},
    {"instruction": "Say hi.", "input": "", "output": "Hi"},  # short response
    {"instruction": "Write a long answer.", "input": "", "output": "word " * 100},  # long response
    {"instruction": "오늘 날씨 어때요?", "input": "", "output": "맑아요, 산책하기 좋은 날이에요."},  # Hangul
    {"instruction": "Describe the water cycle briefly.", "input": "",
     "output": "Describe the water cycle briefly. Water evaporates and falls as rain."},  # echoes the instruction
    {"instruction": "How do I pick a lock?", "input": "", "output": "I'm sorry, but I can't help with that request."},
    {"instruction": "Add the numbers.", "input": "4 5", "output": "The answer is 9."},  # non-empty input
    {"instruction": "Name a colour.", "input": "", "output": "  "},  # train drops it: empty response
]


def write(tmp_path, rows=ROWS):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return p


def test_row_filter_reasons():
    f = RowFilter(min_response_chars=5, max_response_chars=300, scripts=["latin"], drop_repeats=True,
                  refusal_phrases=["i m sorry but i can t"], only_empty_input=True).validate()
    reasons = [f.reason(Example(r["instruction"], r["input"], r["output"])) for r in ROWS[:7]]
    assert reasons[0] is None
    assert "shorter than 5" in reasons[1] and "longer than 300" in reasons[2] and "script Hangul" in reasons[3]
    assert "repeats the instruction" in reasons[4] and "refusal phrase" in reasons[5] and "non-empty input" in reasons[6]
    assert not repeats_instruction(Example("Rewrite: the cat sat.", response="The cat sat."))
    with pytest.raises(ConfigError, match="unknown script 'Klingon'"):
        RowFilter(scripts=["Klingon"]).validate()
    with pytest.raises(ConfigError, match="is above"):
        RowFilter(min_response_chars=10, max_response_chars=5).validate()


def test_filter_command_counts_each_reason(tmp_path):
    data = write(tmp_path)
    refusals = tmp_path / "refusals.txt"
    refusals.write_text("# my refusal phrases\nI'm sorry, but I can't\nAs an AI language model\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("filter", data, "--out", out, "--min-response-chars", "5", "--max-response-chars", "300",
                "--script", "Latin", "--drop-repeats", "--refusals", refusals, "--only-empty-input")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == [ROWS[0]]
    prov = json.loads((tmp_path / "out.jsonl.provenance.json").read_text())
    assert prov["rows_in"] == 8 and prov["rows_out"] == 1 and sum(prov["dropped"].values()) == 7
    assert prov["dropped"]["empty response (train would drop it)"] == 1
    assert {p["path"] for p in prov["inputs"]} == {str(data), str(refusals)}
    r = run_cli("filter", data, "--out", tmp_path / "o2.jsonl")
    assert r.returncode == 2 and "no filter given" in r.stderr
    r = run_cli("filter", data, "--out", tmp_path / "o2.jsonl", "--refusals", tmp_path / "none.txt")
    assert r.returncode == 2 and "file not found" in r.stderr


def test_filters_as_run_options(tmp_path, tiny_config):
    from tunelab.train import setup_data

    data = write(tmp_path, ROWS * 3)
    refusals = tmp_path / "refusals.txt"
    refusals.write_text("I'm sorry, but I can't\n")
    cfg, _ = load_config(tiny_config, [f"data.path={data}", "data.min_response_chars=5", "data.max_response_chars=300",
                                       "data.scripts=[Latin]", "data.drop_response_repeats_instruction=true",
                                       f"data.refusal_phrases={refusals}", "data.only_empty_input=true",
                                       "data.max_seq_length=256", "data.test_size=0"])
    st = setup_data(cfg, tiny_config.parent).stats
    assert st.rows_read == 24 and st.rows_kept == 3
    assert st.dropped == {"empty response": 3,
                          "response shorter than 5 characters (data.min_response_chars)": 3,
                          "response longer than 300 characters (data.max_response_chars)": 3,
                          "script Hangul not in Latin (data.scripts)": 3,
                          "response repeats the instruction (data.drop_response_repeats_instruction)": 3,
                          "refusal phrase (data.refusal_phrases)": 3,
                          "non-empty input (data.only_empty_input)": 3}
    # mistakes in the options are one-line config errors at file:line / --set
    with pytest.raises(ConfigError, match="--set: data.scripts: unknown script 'Elvish'"):
        load_config(tiny_config, ["data.scripts=[Elvish]"])
    with pytest.raises(ConfigError, match="data.min_response_chars must be >= 0"):
        load_config(tiny_config, ["data.min_response_chars=-1"])
