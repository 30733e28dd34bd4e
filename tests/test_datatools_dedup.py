"""`tunelab data dedup` on small files and on the real alpaca_en_demo with planted near duplicates."""

import json
import random
import re
import pytest

from conftest import SHARED
from tunelab.datatools.dedup import find_duplicates, jaccard, shingles

ALPACA_EN = SHARED / "train" / "alpaca_en_demo" / "data.json"

SYN = {"describe": "explain", "create": "make", "write": "compose", "generate": "produce", "list": "name",
       "important": "crucial", "help": "assist", "use": "utilize", "good": "great", "many": "numerous",
       "also": "additionally", "make": "create", "however": "but", "example": "instance", "provide": "give",
       "can": "could", "very": "really", "different": "various"}


def paraphrase(row: dict, rng: random.Random) -> dict:
    """Paraphrase-level edits: synonyms swapped, 'Please' prepended, one sentence of the answer dropped."""
    def edit(text, rate):
        out = []
        for w in re.split(r"(\s+)", text):
            lw = w.lower().strip(".,!?:;")
            if lw in SYN and rng.random() < rate:
                w = w.replace(lw, SYN[lw]).replace(lw.capitalize(), SYN[lw].capitalize())
            out.append(w)
        return "".join(out)

    sents = re.split(r"(?<=[.!?])\s+", row["output"])
    if len(sents) > 3:
        del sents[rng.randrange(1, len(sents))]
    ins = edit(row["instruction"], 1.0)
    return {"instruction": "Please " + ins[0].lower() + ins[1:], "input": row["input"], "output": edit(" ".join(sents), 0.8)}


def run_cli(*args):
    """`tunelab data ARGS` in this process (a subprocess would pay the transformers import each time)."""
    import contextlib
    import io
    import types

    from tunelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["data", *map(str, args)])
        except SystemExit as e:  # argparse usage errors
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_exact_and_near_duplicates_first_kept():
    texts = ["Add 2 and 3.\nThe answer is 5.",
             "add 2 and 3!\n  The answer is 5",  # exact after normalisation
             "Name the capital city of France and say one thing about it.\nParis is the capital; it has the Louvre.",
             "Name the capital city of France, and say one thing about it.\nParis is the capital; it has the Louvre museum.",
             "Subtract 7 from 9.\nThe answer is 2.", None]
    r = find_duplicates(texts, threshold=0.5)
    assert r.keep == [0, 2, 4, 5]
    sim = round(jaccard(shingles(texts[2]), shingles(texts[3])), 4)
    assert sim > 0.5 and r.clusters == {0: [(1, "exact", 1.0)], 2: [(3, "near", sim)]}
    assert find_duplicates(texts, threshold=0.5, near=False).keep == [0, 2, 3, 4, 5]
    assert shingles("a b", "word", 3) == {"a b"} and shingles("", "word", 3) == set()
    assert shingles("我爱北京", "word", 2) == {"我 爱", "爱 北", "北 京"}  # Han characters count as words


@pytest.mark.skipif(not ALPACA_EN.exists(), reason="shared data not present")
def test_planted_paraphrases_in_alpaca_en_demo_are_found_and_distinct_rows_kept(tmp_path):
    rows = json.loads(ALPACA_EN.read_text())
    rng = random.Random(0)
    sources = rng.sample(range(len(rows)), 20)
    planted = [paraphrase(rows[i], rng) for i in sources]
    data = tmp_path / "alpaca_planted.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + planted))
    out = tmp_path / "dedup.jsonl"
    r = run_cli("dedup", data, "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "dedup.jsonl.clusters.json").read_text())
    near = {d["where"]: c["kept"] for c in report["clusters"] for d in c["duplicates"] if d["kind"] == "near"}
    exact = [d["where"] for c in report["clusters"] for d in c["duplicates"] if d["kind"] == "exact"]

    def first_copy(i):  # the source row, or its first exact copy (the demo has exact duplicates of its own)
        key = json.dumps(rows[i], sort_keys=True)
        return next(j for j, row in enumerate(rows) if json.dumps(row, sort_keys=True) == key)

    # every planted paraphrase is found, and clustered with the row it was made from ...
    assert near == {f"{data}:{len(rows) + k + 1}": f"{data}:{first_copy(i) + 1}" for k, i in enumerate(sources)}
    # ... and no two distinct demo rows were merged: the only other drops are byte-identical copies
    for where in exact:
        line = int(where.rsplit(":", 1)[1])
        assert any(rows[line - 1] == rows[j] for j in range(line - 1))
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == len(rows) + 20 - len(near) - len(exact)
    prov = json.loads((tmp_path / "dedup.jsonl.provenance.json").read_text())
    assert prov["rows_in"] == len(rows) + 20 and prov["rows_out"] == len(kept)
    assert prov["inputs"][0]["sha256"] and sum(prov["dropped"].values()) == len(near) + len(exact)
    # never overwritten without --overwrite
    again = run_cli("dedup", data, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,msg", [
    (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["--threshold", "0"], "--threshold must be in (0, 1]"),
    (["--ngram", "0"], "--ngram must be >= 1"),
])
def test_bad_thresholds_are_one_line_errors(tmp_path, alpaca_file, args, msg):
    r = run_cli("dedup", alpaca_file, "--out", tmp_path / "o.jsonl", *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_empty_file_and_wrong_field_map(tmp_path, alpaca_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli("dedup", empty, "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "no rows" in r.stderr
    r = run_cli("dedup", alpaca_file, "--out", tmp_path / "o.jsonl", "--field", "output=answer")
    assert r.returncode == 2 and f"{alpaca_file}:1: missing field 'answer'" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()
