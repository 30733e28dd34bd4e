"""data.sources: several files, each with its own format and field map, mixed by weight or row count."""

import json

import pytest

from test_datatools_dedup import run_cli
from tunelab.config import ConfigError, load_config


def files(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}."}) + "\n"
                         for i in range(60)))
    b = tmp_path / "b.csv"
    b.write_text("Q,A\n" + "".join(f"Say {i} twice.,{i} {i}.\n" for i in range(30)))
    return a, b


def run_yaml(tmp_path, tiny_model, sources: str):
    p = tmp_path / "mix.yaml"
    p.write_text(f"""
model:
  name: {tiny_model}
data:
  max_seq_length: 128
  sources:
{sources}
""")
    return p


def test_weights_interleave_reproducibly_and_check_shows_the_mix(tmp_path, tiny_model):
    import contextlib
    import io

    from tunelab.cli import main
    from tunelab.train import setup_data

    a, b = files(tmp_path)
    cfg_path = run_yaml(tmp_path, tiny_model, f"""    - {{path: {a}, weight: 3}}
    - {{path: {b.name}, fields: {{instruction: Q, output: A}}, weight: 1}}""")  # relative to the run file
    cfg, _ = load_config(cfg_path)
    s1 = setup_data(cfg, cfg_path.parent)
    s2 = setup_data(cfg, cfg_path.parent)
    assert [e.input_ids for e in s1.train] == [e.input_ids for e in s2.train]  # reproducible by seed
    mix = s1.stats.mix
    assert set(mix) == {str(a), b.name} and s1.stats.rows_read == 90
    # datasets' first_exhausted interleaving with probabilities 3:1 stops when a.jsonl (60 rows) runs out
    assert mix[str(a)] == 60 and 8 <= mix[b.name] <= 35
    assert s1.stats.dropped == {"not drawn by the mix (data.sources)": 30 - mix[b.name]} or mix[b.name] == 30
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["check", str(cfg_path)]) == 0
    text = " ".join(err.getvalue().split())
    assert "mix" in text and f"a.jsonl {mix[str(a)]} (" in text and f"b.csv {mix[b.name]}" in text
    s3 = setup_data(load_config(cfg_path, ["data.seed=7"])[0], cfg_path.parent)
    assert [e.input_ids for e in s3.train] != [e.input_ids for e in s1.train]


def test_row_counts_oversample_and_mix_command_writes_the_file(tmp_path, tiny_model):
    a, b = files(tmp_path)
    cfg_path = run_yaml(tmp_path, tiny_model, f"""    - {{path: {a}, rows: 10}}
    - {{path: {b}, fields: {{instruction: Q, output: A}}, rows: 45}}""")
    out = tmp_path / "mixed.jsonl"
    r = run_cli("mix", cfg_path, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 55 and sum(r["instruction"].startswith("Say") for r in rows) == 45  # b oversampled
    assert len({r["instruction"] for r in rows if r["instruction"].startswith("Say")}) == 30  # every row, then repeats
    prov = json.loads((tmp_path / "mixed.jsonl.provenance.json").read_text())
    assert prov["mix"] == {str(a): 10, str(b): 45} and prov["dropped"] == {"not drawn by the mix (data.sources)": 50}
    run_cli("mix", cfg_path, "--out", tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


@pytest.mark.parametrize("sources,msg", [
    ("    - {path: a.jsonl}", "give either weight or rows"),
    ("    - {path: a.jsonl, weight: 1}\n    - {path: b.csv, rows: 3}", "not a mix of both"),
    ("    - {path: a.jsonl, weight: -1}", "weight must be a number > 0"),
    ("    - {path: a.jsonl, weight: 1, colour: red}", "unknown key 'colour'"),
    ("    - {path: a.jsonl, weight: 1, format: chat}", "needs data.template=chat_template"),
])
def test_bad_sources_are_config_errors_at_the_line(tmp_path, tiny_model, sources, msg):
    p = run_yaml(tmp_path, tiny_model, sources)
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:")
