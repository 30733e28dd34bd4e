"""lm-evaluation-harness task YAMLs read as they are (issue 19 items 2 and 4): each key on small local files."""

import json
import math

import pytest

from tunelab.cli import main
from tunelab.evaluate import lmeval, scoring
from tunelab.evaluate.tasks import TaskError, load_task_file


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def _jsonl(tmp_path, name, rows):
    (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


BOOLQ = """task: tiny_boolq
dataset_path: json
dataset_kwargs:
  data_files:
    test: boolq_test.jsonl
    train: boolq_train.jsonl
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "Answer about {{topic}}.\\n\\n"
doc_to_text: "{{passage.strip()}}\\nQuestion: {{question}}?\\nAnswer:"
doc_to_choice: ["no", "yes"]
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
num_fewshot: 2
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _boolq(tmp_path):
    _jsonl(tmp_path, "boolq_test.jsonl", [{"passage": f"  P{i}. ", "question": f"is {i} even", "label": int(i % 2 == 0),
                                           "topic": "numbers"} for i in range(5)])
    _jsonl(tmp_path, "boolq_train.jsonl", [{"passage": f"T{i}.", "question": f"q{i}", "label": i % 2, "topic": "x"}
                                           for i in range(4)])
    return _write(tmp_path, "boolq.yaml", BOOLQ)


def test_multiple_choice_yaml_jinja_splits_first_n_and_description(tmp_path):
    t = load_task_file(_boolq(tmp_path))
    assert t.name == "tiny_boolq" and t.kind == "multiple_choice" and t.metrics == ["acc", "acc_norm"]
    assert t.items[0].context == "P0.\nQuestion: is 0 even?\nAnswer:" and t.items[0].choices == ["no", "yes"]
    assert [it.gold for it in t.items] == [1, 0, 1, 0, 1] and t.num_fewshot == 2
    shot = t.with_fewshot(None)[3]  # num_fewshot from the file, the first 2 of the train split
    assert shot.context == ("Answer about numbers.\n\nT0.\nQuestion: q0?\nAnswer: no\n\n"
                            "T1.\nQuestion: q1?\nAnswer: yes\n\nP3.\nQuestion: is 3 even?\nAnswer:")


def test_kobest_tsv_and_mmlu_headerless_csv(tmp_path):
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "test.tsv").write_text(
        'ID\tsentence\tquestion\t1\t2\tAnswer\n1\t그가 "안녕이라고 말했다.\t결과\t웃었다.\t울었다.\t2\n'
        '2\t비가 왔다.\t원인\t구름.\t해.\t1\n')
    # TSV columns named 1 and 2 aren't Jinja identifiers: column_names renames them (header: 0 drops the old row)
    copa = _write(tmp_path, "copa.yaml", """task: copa_tsv
dataset_path: csv
dataset_kwargs: {data_files: {test: copa/test.tsv}, column_names: [ID, sentence, question, alt1, alt2, Answer], header: 0}
test_split: test
output_type: multiple_choice
doc_to_text: "{{sentence}} {{ {'원인': ' 왜냐하면', '결과': ' 그래서'}[question] }}"
doc_to_choice: "{{[alt1, alt2]}}"
doc_to_target: "{{Answer - 1}}"
""")
    t = load_task_file(copa)
    assert t.items[0].context == '그가 "안녕이라고 말했다.  그래서' and t.items[0].choices == ["웃었다.", "울었다."]
    assert [it.gold for it in t.items] == [1, 0]
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "anatomy_test.csv").write_text(' What is 1+1? ,1,2,"3, really",4,B\nWhy?,a,b,c,d,D\n')
    mm = _write(tmp_path, "mmlu.yaml", """task: mmlu_csv
dataset_path: csv
dataset_kwargs:
  data_files: {test: mmlu/anatomy_test.csv}
  column_names: [question, A, B, C, D, answer]
test_split: test
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
""")
    t = load_task_file(mm)
    assert t.items[0].context == "What is 1+1?\nA. 1\nB. 2\nC. 3, really\nD. 4\nAnswer:"
    assert [it.gold for it in t.items] == [1, 3]


def test_gold_as_bool_index_text_and_choice_columns(tmp_path):
    _jsonl(tmp_path, "d.jsonl", [{"q": "a", "ok": True, "c1": "x", "c2": "y", "ans": "y", "one": 2},
                                 {"q": "b", "ok": False, "c1": "z", "c2": "w", "ans": "z", "one": 1}])
    base = ("dataset_path: json\ndataset_kwargs: {data_files: d.jsonl}\ntest_split: train\n"
            "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{[c1, c2]}}'\n")
    for target, golds in (("ok", [1, 0]), ("ans", [1, 0]), ("'{{one - 1}}'", [1, 0]), ("'{{ans}}'", [1, 0])):
        t = load_task_file(_write(tmp_path, "g.yaml", base + f"doc_to_target: {target}\n"))
        assert [it.gold for it in t.items] == golds and t.items[0].choices == ["x", "y"], target
    with pytest.raises(TaskError, match=r"gold index 2 out of range .*1-based"):
        load_task_file(_write(tmp_path, "g.yaml", base + "doc_to_target: one\n"))


@pytest.mark.parametrize("extra, message", [
    ("process_docs: !function utils.process\n", r"g.yaml:7: lm-eval key 'process_docs' is not supported"),
    ("doc_to_decontamination_query: x\n", r"g.yaml:7: lm-eval key 'doc_to_decontamination_query' is not supported"),
    ("metric_list:\n  - metric: bleu\n", r"g.yaml:7: metric 'bleu' is not supported"),
    ("metric_list:\n  - metric: acc\n    aggregation: median\n", r"g.yaml:7: aggregation 'median'"),
    ("fewshot_config:\n  sampler: first_n\n  samples: []\n", r"g.yaml:7: fewshot_config supports only sampler"),
    ("include: _default.yaml\n", r"g.yaml:7: lm-eval key 'include' is not supported"),
    ("metric_list:\n  - metric: f1\n", r"g.yaml:7: metric f1 is supported as macro-F1"),
])
def test_unsupported_keys_are_one_line_errors(tmp_path, tiny_model, capsys, extra, message):
    import re

    _jsonl(tmp_path, "d.jsonl", [{"q": "a", "label": 0}])
    f = _write(tmp_path, "g.yaml", "task: g\ndataset_path: json\ndataset_kwargs: {data_files: d.jsonl}\n"
               "test_split: train\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n" + extra
               + "doc_to_choice: [a, b]\ndoc_to_target: label\n")
    assert main(["eval", str(tiny_model), "--tasks", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_function_tag_in_doc_to_text_is_named(tmp_path):
    f = _write(tmp_path, "g.yaml", "task: g\ndataset_path: json\noutput_type: multiple_choice\n"
               "doc_to_text: !function utils.doc_to_text\n")
    with pytest.raises(TaskError, match=r"g.yaml:4: doc_to_text: !function utils.doc_to_text \(Python code\)"):
        load_task_file(f)


def test_filters_and_exact_match_as_lm_eval():
    steps = [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}]
    assert lmeval.apply_filter("so 3+4 = 7\n#### 7", steps) == "7"
    assert lmeval.apply_filter("no number", steps) == "[invalid]"
    flexible = [{"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"}]
    assert lmeval.apply_filter("4 apples then $1,200.", flexible) == "$1,200."
    opts = {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### "]}
    assert lmeval.exact_match("1,200", "work\n#### 1200", **opts) == 1.0
    assert lmeval.exact_match("Yes", "yes", ignore_case=False) == 0.0
    assert lmeval.exact_match("yes!", "Yes", ignore_case=True, ignore_punctuation=True) == 1.0


def test_generate_until_loglikelihood_and_rolling_end_to_end(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    _jsonl(tmp_path, "g.jsonl", [{"question": f"Add {i} and {i}.", "answer": f"It is {2 * i}.\n#### {2 * i}"}
                                 for i in range(4)])
    gen = _write(tmp_path, "gen.yaml", """task: tiny_gsm
dataset_path: json
dataset_kwargs: {data_files: {test: g.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n\\n", "Question:"], max_gen_toks: 5, do_sample: false}
filter_list:
  - name: strict-match
    filter: [{function: regex, regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"}, {function: take_first}]
  - name: flexible-extract
    filter: [{function: regex, group_select: -1, regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"}, {function: take_first}]
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### "]
""")
    t = load_task_file(gen)
    assert t.kind == "generate" and t.stop == ["\n\n", "Question:"] and t.max_new_tokens == 5
    assert [n for n, _ in t.lm_eval["filters"]] == ["strict-match", "flexible-extract"]
    _jsonl(tmp_path, "t.jsonl", [{"text": "Add 1 and 2. The answer is 3."}, {"text": "the capital city"}])
    roll = _write(tmp_path, "roll.yaml", "task: tiny_roll\ndataset_path: json\ndataset_kwargs: {data_files: t.jsonl}\n"
                  "test_split: train\noutput_type: loglikelihood_rolling\ndoc_to_target: text\n")
    ll = _write(tmp_path, "ll.yaml", "task: tiny_ll\ndataset_path: json\ndataset_kwargs: {data_files: g.jsonl}\n"
                "test_split: train\noutput_type: loglikelihood\ndoc_to_text: '{{question}}'\n"
                "doc_to_target: \"{{answer.split('#### ')[-1]}}\"\n")
    out = tmp_path / "ev"
    assert main(["eval", str(tiny_model), "--tasks", f"{gen},{roll},{ll}", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    lm = r["lm_eval"][str(tiny_model)]
    assert set(lm["tiny_gsm"]) >= {"exact_match,strict-match", "exact_match,flexible-extract",
                                   "exact_match_stderr,strict-match"}
    outs = r["models"][str(tiny_model)]["tiny_gsm"]["per_item"]["outputs"]
    opts = {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### "]}
    want = sum(lmeval.exact_match(lmeval.apply_filter(o, [{"regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)",
                                                         "group_select": -1}]), t.items[i].target, **opts)
               for i, o in enumerate(outs)) / 4
    assert lm["tiny_gsm"]["exact_match,flexible-extract"] == want
    from tunelab.models import load_for_inference

    loaded = load_for_inference(str(tiny_model))
    nll = sum(scoring.text_nll(loaded, s)[0] for s in ("Add 1 and 2. The answer is 3.", "the capital city"))
    assert lm["tiny_roll"]["word_perplexity,none"] == pytest.approx(math.exp(nll / (8 + 3)), rel=1e-5)
    assert lm["tiny_roll"]["bits_per_byte,none"] == pytest.approx(nll / (29 + 16) / math.log(2), rel=1e-5)
    lls = [scoring.loglik_greedy(loaded, f"Add {i} and {i}.", f" {2 * i}") for i in range(4)]
    assert lm["tiny_ll"]["perplexity,none"] == pytest.approx(math.exp(-sum(a for a, _ in lls) / 4), rel=1e-5)
    assert lm["tiny_ll"]["acc,none"] == sum(g for _, g in lls) / 4


def test_local_folder_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    rows = [{"q": f"q{i}", "label": i % 2} for i in range(3)]
    _jsonl(tmp_path / "data", "test.jsonl", rows)
    _jsonl(tmp_path / "data", "train.jsonl", rows[:2])
    body = "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: [a, b]\ndoc_to_target: label\n"
    t = load_task_file(_write(tmp_path, "f.yaml", "task: f\ndataset_path: data\ntest_split: test\n"
                              "training_split: train\n" + body))
    assert [it.context for it in t.items] == ["q0", "q1", "q2"] and len(t.fewshot_pool) == 2  # shots from train
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    t = load_task_file(_write(tmp_path, "p.yaml", "task: p\ndataset_path: parquet\ndataset_kwargs: {data_files: "
                              "{test: d.parquet}}\ntest_split: test\n" + body))
    assert [it.gold for it in t.items] == [0, 1, 0]
    with pytest.raises(TaskError, match=r"p.yaml:3: test_split 'validation' is not in the data \(splits: test\)"):
        load_task_file(_write(tmp_path, "p.yaml", "task: p\ndataset_path: parquet\ntest_split: validation\n"
                              "dataset_kwargs: {data_files: {test: d.parquet}}\n" + body))


def test_validation_split_delimiters_and_sampling(tmp_path):
    _jsonl(tmp_path, "v.jsonl", [{"q": f"q{i}", "a": f"A{i}"} for i in range(3)])
    t = load_task_file(_write(tmp_path, "v.yaml", """task: v
dataset_path: json
dataset_kwargs: {data_files: {validation: v.jsonl}}
validation_split: validation
output_type: generate_until
doc_to_text: "Q: {{q}}"
doc_to_target: "{{a}}"
target_delimiter: " => "
fewshot_delimiter: " ## "
fewshot_config: {sampler: first_n}
generation_kwargs: {until: "END", do_sample: true, temperature: 0.5}
"""))
    assert t.with_fewshot(1)[2].context == "Q: q0 => A0 ## Q: q2"  # shots from the scored split, never the item
    assert t.stop == ["END"] and t.lm_eval["sampling"] == {"do_sample": True, "temperature": 0.5}
    assert t.metrics == ["exact_match"] and t.items[1].target == "A1"
