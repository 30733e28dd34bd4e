"""`tunelab data stats` on a small mixed-script file, with the run's tokenizer."""

import json

from test_datatools_dedup import run_cli


def test_stats_counts_scripts_lengths_duplicates_and_png(tmp_path, tiny_config, alpaca_file):
    from tunelab.config import load_config
    from tunelab.train import setup_data

    rows = [json.loads(line) for line in alpaca_file.read_text().splitlines()]
    rows += [{"instruction": "안녕하세요 오늘 날씨 어때요?", "input": "", "output": "맑아요."},
             {"instruction": "北京是哪个国家的首都？", "input": "", "output": "中国。"},
             {"instruction": "Empty answer", "input": "", "output": "  "},  # train drops it
             dict(rows[0])]  # an exact duplicate
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(tiny_config.read_text().replace(str(alpaca_file), str(data)).replace("test_size: 0.1", "shuffle: false"))
    r = run_cli("stats", data, "--config", cfg, "--png", tmp_path / "h.png", "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    st = json.loads((tmp_path / "s.json").read_text())
    assert st["rows"] == 44 and st["usable_rows"] == 43 and st["dropped_by_train"] == {"empty response": 1}
    assert st["fields"]["input"] == {"present": 44, "empty": 44, "missing": 0} and st["fields"]["output"]["empty"] == 1
    assert st["scripts"] == {"Latin": 41, "Hangul": 1, "Han": 1}
    assert st["duplicates"]["exact"] == 1
    # token lengths are train's: the same percentiles `check`/`train` compute for this run
    c, _ = load_config(cfg, ["data.max_seq_length=512"])
    assert st["length_unit"] == "tokens" and st["lengths"]["max"] == setup_data(c, cfg.parent).stats.length_percentiles["max"]
    assert st["longest"][0]["length"] == st["lengths"]["max"] and st["shortest"][0]["length"] == st["lengths"]["min"]
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli("stats", data, "--png", tmp_path / "h.png")
    assert again.returncode == 2 and "already exists" in again.stderr
    plain = run_cli("stats", data, "--json", tmp_path / "s2.json")  # no --config: characters
    assert plain.returncode == 0 and json.loads((tmp_path / "s2.json").read_text())["length_unit"] == "characters"
