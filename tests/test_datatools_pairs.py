"""`tunelab data pairs`: DPO pairs from a model's own wrong answers (issue 12, item 8).

The tiny random model (tied embeddings) echoes the last prompt token, so with `template: plain` and
questions ending in different words its answers differ by row. Making some rows' reference equal to
its own (deterministic, greedy) answer turns exactly those rows correct, so the test knows which rows
must give a pair and which must not."""

import json

from test_datatools_dedup import run_cli

QUESTIONS = [f"add {a} plus {b} the answer {w}" for (a, b), w in
             zip(((3, 4), (10, 7), (21, 5), (8, 8), (40, 2), (9, 31)), "sum number city country input task".split())]


def write_task(tmp_path, rows, **extra):
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = {"name": "toy", "kind": "generate", "path": "test.jsonl", "context": "{instruction}",
            "target": "{output}", "template": "model", "regex": r"\A\s*([^\n]+)", "stop": ["\n"],
            "max_new_tokens": 6, **extra}
    p = tmp_path / "task.yaml"
    p.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items()))
    return p


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pairs_only_for_wrong_answers(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TUNELAB_GEN_CACHE", str(tmp_path / "cache.sqlite"))
    task = write_task(tmp_path, [{"instruction": "held out?", "input": "", "output": "1"}], template="plain")
    rows = [{"instruction": q, "input": "", "output": "zzz-never"} for q in QUESTIONS]
    train = write_rows(tmp_path / "train.jsonl", rows)
    first = tmp_path / "first.jsonl"
    r = run_cli("pairs", "--model", tiny_model, "--task", task, "--data", train, "--out", first)
    assert r.returncode == 0, r.stderr
    got = read_jsonl(first)
    prov = json.loads((tmp_path / "first.jsonl.provenance.json").read_text())
    assert prov["answered"] == 6 and prov["correct"] == 0 and prov["wrong"] == 6
    assert len(got) + sum(prov["dropped"].values()) == 6  # every row: a pair or a counted reason
    assert len(got) == 6
    answer = {p["prompt"]: p["rejected"] for p in got}
    for p in got:
        assert p["chosen"] == "zzz-never" and p["rejected"] and p["chosen"] != p["rejected"]
        assert p["prompt"] in QUESTIONS  # the task's context, as generation was asked

    # make the model right on half of the answered rows: its own greedy answer becomes their reference
    right = sorted(answer)[: max(1, len(answer) // 2)]
    rows2 = [{**r, "output": answer[r["instruction"]]} if r["instruction"] in right else r for r in rows]
    train2 = write_rows(tmp_path / "train2.jsonl", rows2)
    second = tmp_path / "second.jsonl"
    r = run_cli("pairs", "--model", tiny_model, "--task", task, "--data", train2, "--out", second, "--no-cache")
    assert r.returncode == 0, r.stderr
    got2 = read_jsonl(second)
    prov2 = json.loads((tmp_path / "second.jsonl.provenance.json").read_text())
    assert prov2["correct"] == len(right) and prov2["dropped"]["answered correctly"] == len(right)
    assert {p["prompt"] for p in got2} == set(answer) - set(right)
    assert f"answered 6, correct {len(right)}" in r.stderr and f"pairs written {len(got2)}" in r.stderr
    assert prov2["settings"]["template"] == "plain" and prov2["settings"]["decoding"] == "greedy"

    # --max-rows: only the first N rows are asked
    third = tmp_path / "third.jsonl"
    r = run_cli("pairs", "--model", tiny_model, "--task", task, "--data", train, "--out", third, "--max-rows", "2")
    assert r.returncode == 0, r.stderr
    prov3 = json.loads((tmp_path / "third.jsonl.provenance.json").read_text())
    assert prov3["answered"] == 2 and prov3["dropped"]["beyond --max-rows 2"] == 4 and prov3["rows_in"] == 6
    assert prov3["rows_out"] + sum(prov3["dropped"].values()) == 6
    assert prov["most_common_chosen"] == [["zzz-never", 6]]
    assert {p["prompt"] for p in read_jsonl(third)} <= set(QUESTIONS[:2])


def test_pair_prompt_is_what_generation_was_sent(tmp_path, tiny_model):
    """A DPO run with the run's template renders each pair's prompt exactly as the model was asked."""
    from tunelab.config import DataConfig
    from tunelab.data.preference import to_pair
    from tunelab.data.templates import render_prompt
    from tunelab.evaluate.harness import wrap_context
    from tunelab.models import load_for_inference

    loaded = load_for_inference(str(tiny_model))
    task = write_task(tmp_path, [{"instruction": "x", "output": "1"}])
    from tunelab.datatools.pairs import load_rows_as_task

    items = load_rows_as_task(str(task), str(write_rows(tmp_path / "t.jsonl", [
        {"instruction": q, "output": "7"} for q in QUESTIONS]))).with_fewshot(None)
    for it in items:
        pair = to_pair({"prompt": it.context, "chosen": "7", "rejected": "8"}, DataConfig(template="alpaca"), "x")
        assert render_prompt("alpaca", pair.prompt, loaded.tokenizer, None) == wrap_context(loaded, _Task(), it.context)


class _Task:
    template = "model"


def test_pairs_bad_input_one_line(tmp_path, tiny_model):
    task = write_task(tmp_path, [{"instruction": "q", "input": "", "output": "1"}])
    train = write_rows(tmp_path / "train.jsonl", [{"instruction": "q2", "input": "", "output": "2"}])
    out = tmp_path / "out.jsonl"

    def bad(*args, expect):
        r = run_cli("pairs", *args)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert expect in r.stderr and "Traceback" not in r.stderr
        assert not out.exists() and not (tmp_path / "out.jsonl.provenance.json").exists()

    base = ("--model", tiny_model, "--task", task, "--out", out)
    bad(*base, "--data", tmp_path / "test.jsonl", expect="is the task's own (held-out) file")
    bad(*base, "--data", tmp_path / "nope.jsonl", expect="--data")
    bad("--model", tiny_model, "--task", tmp_path / "nope.yaml", "--data", train, "--out", out, expect="file not found")
    bad(*base, "--data", train, "--max-rows", "0", expect="--max-rows must be >= 1")
    mc = tmp_path / "mc"
    mc.mkdir()
    (mc / "rows.jsonl").write_text(json.dumps({"q": "a?", "c": ["x", "y"], "g": 0}) + "\n")
    (mc / "task.yaml").write_text('kind: multiple_choice\npath: rows.jsonl\ncontext: "{q}"\n'
                                  'choices: "{c}"\ngold: "{g}"\n')
    (mc / "train.jsonl").write_text((mc / "rows.jsonl").read_text())
    bad("--model", tiny_model, "--task", mc / "task.yaml", "--data", mc / "train.jsonl", "--out", out,
        expect="pairs need a `kind: generate` task")
    bad(*base, "--data", write_rows(tmp_path / "other.jsonl", [{"question": "q"}]), expect="no field 'instruction'")
    lm = tmp_path / "lm.yaml"
    lm.write_text("task: t\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: '{{q}}'\n"
                  "doc_to_target: '{{a}}'\n")
    bad("--model", tiny_model, "--task", lm, "--data", train, "--out", out, expect="reads its own dataset")
    out.write_text("keep me\n")
    r = run_cli("pairs", *base, "--data", train)
    assert r.returncode == 2 and "already exists" in r.stderr and out.read_text() == "keep me\n"


def test_demo_dpo_config_matches_the_sft_demo(monkeypatch):
    """configs/smollm2-demo-dpo.yaml: DPO from the SFT demo run, its pairs' prompts rendered with the SFT run's
    template (the pairs hold the task's questions exactly as generation sent them through that template)."""
    from pathlib import Path

    from tunelab.config import load_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    dpo, _ = load_config(repo / "configs" / "smollm2-demo-dpo.yaml")
    sft, _ = load_config(repo / "configs" / "smollm2-demo.yaml")
    assert dpo.train.method == "dpo" and dpo.model.name == "runs/demo"
    assert dpo.data.template == sft.data.template and dpo.data.system_prompt == sft.data.system_prompt
    assert dpo.data.max_seq_length >= sft.data.max_seq_length


def test_one_sided_rejected_answer_is_flagged():
    """The demo's parity case: the SFT run says 'odd' to every even/odd question, so every parity pair rejects
    'odd' and chooses 'even'; DPO on them flipped it to 'even' everywhere (README, DPO after the demo)."""
    from tunelab.datatools.pairs import one_sided

    parity = [{"prompt": f"Is {n} even or odd?", "chosen": "even", "rejected": "odd"} for n in range(0, 40, 2)]
    sums = [{"prompt": f"{a}+1?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(40)]
    assert one_sided(parity + sums) == [("odd", 20, 0)]
    balanced = parity + [{"prompt": f"Is {n} even or odd?", "chosen": "odd", "rejected": "even"}
                         for n in range(1, 41, 2)]
    assert one_sided(balanced + sums) == []
    assert one_sided(sums) == []
