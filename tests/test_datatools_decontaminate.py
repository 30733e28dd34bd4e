"""`tunelab data decontaminate`: planted ARC and GSM8K items in a copy of alpaca_en_demo, and the check hook."""

import json
import random

import pytest

from conftest import SHARED
from test_datatools_dedup import run_cli
from tunelab.datatools.common import words
from tunelab.datatools.decontaminate import NgramIndex, BenchItem, find_contamination, load_bench_items

ALPACA_EN = SHARED / "train" / "alpaca_en_demo" / "data.json"
BENCH = SHARED / "bench"


def reword(q: str, a: str, every: int) -> tuple[str, str]:
    """Change every `every`-th word of question + answer (a synonym, or a word inserted before it), counting
    words as the method does; the rest stays verbatim, so the longest verbatim run is every-1 words."""
    syn = {"which": "what", "what": "which", "is": "was", "the": "this", "a": "one", "of": "from", "how": "in what way",
           "many": "numerous", "does": "will", "each": "every", "and": "plus", "to": "towards"}
    out, k = [], 0
    for text in (q, a):
        ws = []
        for w in words(text):
            k += 1
            ws.append(syn.get(w, "indeed " + w) if k % every == 0 else w)
        out.append(" ".join(ws))
    return out[0], out[1]


def test_ngram_index_rules():
    items = [BenchItem("t", 0, " ".join(f"w{i}" for i in range(20))),
             BenchItem("t", 1, "one two three four five six seven eight nine"),  # short: matched whole
             BenchItem("t", 2, "too short to check")]
    idx = NgramIndex(items, n=13, min_n=8)
    assert idx.too_short == [2] and idx.item_grams == [8, 1, 0]
    texts = ["x " + " ".join(f"w{i}" for i in range(3, 16)) + " y",  # 13 consecutive words of item 0
             " ".join(f"w{i}" for i in range(12)),  # only 12: no 13-gram
             "One, two: three four five six seven eight nine!",  # item 1 whole, punctuation/case ignored
             "one two three four five six seven eight", "too short to check", None]
    found = find_contamination(texts, idx)
    assert sorted(found) == [0, 2]
    assert found[0][0].item == 0 and found[0][0].shared == 1 and found[0][0].ngram.startswith("w3 w4")
    assert found[2][0].item == 1


@pytest.mark.skipif(not (ALPACA_EN.exists() and BENCH.exists()), reason="shared data not present")
def test_planted_arc_and_gsm8k_items_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(BENCH))
    from tunelab.evaluate.tasks import arc, gsm8k

    rng = random.Random(13)
    arc_t, gsm = arc("challenge"), gsm8k()
    arc_pool = [i for i, it in enumerate(arc_t.items) if len(it.context.split()) >= 16]
    planted = []  # (task, item index, rewording every k words or 0 = verbatim)
    for k, i in enumerate(rng.sample(arc_pool, 10)):
        planted.append(("arc_challenge", i, [0, 0, 0, 0, 0, 30, 14, 13, 8, 4][k]))
    for k, i in enumerate(rng.sample(range(len(gsm.items)), 10)):
        planted.append(("gsm8k", i, [0, 0, 0, 0, 0, 30, 14, 13, 8, 4][k]))
    rows = json.loads(ALPACA_EN.read_text())
    positions = sorted(rng.sample(range(len(rows) + len(planted)), len(planted)))
    data, order = list(rows), []
    for pos, (task, i, every) in zip(positions, planted):
        it = (arc_t if task.startswith("arc") else gsm).items[i]
        q = it.context.removeprefix("Question: ").removesuffix("\nAnswer:")
        a = it.choices[it.gold] if task.startswith("arc") else it.response
        if every:
            q, a = reword(q, a, every)
        data.insert(pos, {"instruction": q, "input": "", "output": a})
    for pos, p in zip(positions, planted):
        order.append((pos + 1, *p))  # line of a .json row = its 1-based position
    train = tmp_path / "alpaca_planted.json"
    train.write_text(json.dumps(data, ensure_ascii=False))
    out = tmp_path / "clean.jsonl"
    r = run_cli("decontaminate", train, "--against", "arc_challenge,gsm8k", "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "clean.jsonl.contamination.json").read_text())
    from tunelab.datatools.decontaminate import _item_text

    def report_item_text(task, i):
        t = arc_t if task.startswith("arc") else gsm
        return _item_text(t, t.items[i])

    hits = {int(c["where"].rsplit(":", 1)[1]): c["matches"] for c in report["contaminated"]}
    outcome = []
    for line, task, i, every in order:
        found = line in hits
        if found:  # a found row names the item it was made from
            assert (hits[line][0]["task"], hits[line][0]["item"]) == (task, i)
        outcome.append((task, i, every, found))
        if every == 0 or every >= 14:  # verbatim, or 13+ words verbatim between changes: a 13-gram is left
            assert found, (task, i, every)
        if every and every <= 13:  # no 13 consecutive original words survive in place; found only where the
            # edited text happens to equal another stretch of the item (GSM8K repeats its numbers): brute force says
            row_w = words(data[line - 1]["instruction"] + " " + data[line - 1]["output"])
            item_w = " " + " ".join(words(report_item_text(task, i))) + " "
            oracle = any(f" {' '.join(row_w[j:j + 13])} " in item_w for j in range(len(row_w) - 12))
            assert found == oracle, (task, i, every)
    # nothing in the original demo rows is flagged: exactly the found planted ones
    assert set(hits) == {line for (line, *_), o in zip(order, outcome) if o[3]}
    print("\nplanted item -> found:", *[f"{t}:{i} {'verbatim' if e == 0 else f'reworded every {e}th word'}: "
                                        f"{'found' if f else 'NOT found'}" for t, i, e, f in outcome], sep="\n  ")
    clean = out.read_text().splitlines()
    assert len(clean) == len(data) - len(hits)
    prov = json.loads((tmp_path / "clean.jsonl.provenance.json").read_text())
    assert prov["per_task"] == {"arc_challenge": sum(1 for o in outcome if o[0] == "arc_challenge" and o[3]),
                                "gsm8k": sum(1 for o in outcome if o[0] == "gsm8k" and o[3])}


def test_unknown_task_and_data_file_against(tmp_path, alpaca_file):
    r = run_cli("decontaminate", alpaca_file, "--against", "arc_medium")
    assert r.returncode == 2 and "unknown task 'arc_medium'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("decontaminate", alpaca_file, "--against", "gsm8k", "--ngram", "5", "--min-ngram", "6")
    assert r.returncode == 2 and "--min-ngram" in r.stderr
    # any data file as the benchmark: its rows' text fields are the items
    first = json.loads(alpaca_file.read_text().splitlines()[0])
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"q": first["instruction"] + " " + first["output"] + " and some more words here"}) + "\n")
    items, sources = load_bench_items(str(bench))
    assert len(items) == 1 and sources == [str(bench)]
    r = run_cli("decontaminate", alpaca_file, "--against", str(bench), "--ngram", "6", "--min-ngram", "3",
                "--report", tmp_path / "rep.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert f"{alpaca_file}:1" in [c["where"] for c in rep["contaminated"]]


@pytest.mark.skipif(not BENCH.exists(), reason="shared data not present")
def test_check_warns_when_training_data_overlaps_eval_tasks(tmp_path, tiny_config, alpaca_file, monkeypatch):
    import contextlib
    import io

    from tunelab.cli import main

    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(BENCH))
    from tunelab.evaluate.tasks import gsm8k

    it = gsm8k().items[5]
    lines = alpaca_file.read_text().splitlines()
    lines.insert(3, json.dumps({"instruction": it.context.removeprefix("Question: ").removesuffix("\nAnswer:"),
                                "input": "", "output": it.response}))
    alpaca_file.write_text("\n".join(lines) + "\n")

    def check(*extra):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["check", str(tiny_config), *extra])
        return code, " ".join(err.getvalue().split())

    extra_set = ("--set", "data.max_seq_length=512")

    code, err = check(*extra_set, "--set", "eval.tasks=[gsm8k, arc_easy]")
    assert code == 0, err
    assert "training data overlaps eval.tasks: 1 rows" in err and f"{alpaca_file}:4 ~ gsm8k item 5" in err
    code, err = check(*extra_set)  # no eval.tasks: nothing to compare with
    assert code == 0 and "overlaps" not in err
