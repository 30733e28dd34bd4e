import json

import pytest
import torch

from conftest import SHARED
from tunelab.cli import main
from tunelab.evaluate import scoring
from tunelab.evaluate.stats import bootstrap_ci, paired_diff_ci
from tunelab.evaluate.tasks import TaskError, load_task, load_task_file
from tunelab.models import load_for_inference


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_inference(str(tiny_model))


def test_shared_context_logliks_equal_full_sequence(loaded):
    ctx = "Question: Add 2 and 3.\nAnswer:"
    choices = ["The answer is 5.", "7", "the number of the country"]
    shared = scoring.choice_logliks(loaded, ctx, choices)
    for c, ll in zip(choices, shared):
        cids, cont = scoring.encode_pair(loaded.tokenizer, ctx, " " + c)
        ids = torch.tensor([cids + cont])
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0], -1)
        full = sum(float(logp[len(cids) - 1 + j, t]) for j, t in enumerate(cont))
        assert abs(full - ll) < 1e-4


def test_batched_scoring_equals_one_item_at_a_time(loaded):
    """Left-padded batches of mixed lengths, one-token answers from a single forward, multi-token ones per choice:
    the same log-likelihoods as scoring each item alone."""
    reqs = [("Question: Add 2 and 3.\nAnswer:", ["The answer is 5.", "7", "the number of the country"], " "),
            ("Q: capital?\nA:", ["the", "and", "capital"], " "),
            ("Add 10 and 20 and then tell me about the capital city. Answer: ", ["yes", "no"], " "),
            ("", ["Add", "the city"], " ")]
    one = [scoring.choice_logliks(loaded, c, ch, d) for c, ch, d in reqs]
    for bs in (1, 3, 16):
        got = scoring.batch_choice_logliks(loaded, reqs, bs)
        for a, b in zip(one, got):
            assert b == pytest.approx(a, abs=1e-4)
    assert all(len(loaded.tokenizer(" " + c, add_special_tokens=False)["input_ids"]) == 1
               for c in reqs[1][1])  # the one-token shortcut was exercised


def test_encode_pair_moves_trailing_space(loaded):
    a = scoring.encode_pair(loaded.tokenizer, "Answer: ", "yes")
    b = scoring.encode_pair(loaded.tokenizer, "Answer:", " yes")
    assert a == b


def test_score_choice_acc_and_acc_norm():
    s = scoring.score_choice([-4.0, -5.0], ["ab", "abcdefgh"], gold=1)
    assert s == {"acc": 0.0, "acc_norm": 1.0}


def test_exact_match_extraction():
    assert scoring.exact_match("so 3 + 4 = 7 apples.", "7", r"(-?[$0-9.,]{2,})|(-?[0-9]+)") == 1.0
    assert scoring.exact_match("it costs $1,200.", "1200", r"(-?[$0-9.,]{2,})|(-?[0-9]+)") == 1.0
    assert scoring.exact_match("no idea", "7", r"(-?[0-9]+)") == 0.0


def test_bootstrap_ci_brackets_the_mean_and_pairs():
    m, lo, hi = bootstrap_ci([1, 0, 1, 1, 0, 1, 0, 1, 1, 1])
    assert lo < m < hi and m == 0.7
    d, dlo, dhi = paired_diff_ci([0, 0, 1, 1], [1, 1, 1, 1])
    assert d == 0.5 and dlo <= d <= dhi
    assert paired_diff_ci([1, 0, 1], [1, 0, 1])[1:] == (0.0, 0.0)


def _task_files(tmp_path):
    rows = [{"q": f"Add {i} and {i}.", "opts": [str(2 * i), str(2 * i + 1)], "a": 0} for i in range(12)]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "mc.yaml").write_text("name: add\nkind: multiple_choice\npath: mc.jsonl\ncontext: \"Question: {q}\\nAnswer:\"\n"
                                      "choices: \"{opts}\"\ngold: \"{a}\"\n")
    (tmp_path / "gen.yaml").write_text("name: addgen\nkind: generate\npath: mc.jsonl\ncontext: \"Question: {q}\\nAnswer:\"\n"
                                       "target: \"{a}\"\nmax_new_tokens: 4\n")
    return tmp_path / "mc.yaml", tmp_path / "gen.yaml"


def test_task_file_and_fewshot_are_deterministic(tmp_path):
    mc, _ = _task_files(tmp_path)
    t = load_task_file(mc)
    assert len(t.items) == 12 and t.items[3].choices == ["6", "7"] and t.items[3].gold == 0
    a, b = t.with_fewshot(2, seed=5), t.with_fewshot(2, seed=5)
    assert [i.context for i in a] == [i.context for i in b]
    assert a[0].context.count("Question:") == 3 and a[0].context.endswith(t.items[0].context)
    assert t.items[0].context not in a[0].context[: -len(t.items[0].context)]  # never its own answer


def test_bad_task_inputs(tmp_path):
    with pytest.raises(TaskError, match="unknown task 'arc_esy' .*arc_easy"):
        load_task("arc_esy")
    (tmp_path / "bad.yaml").write_text("name: x\nkind: multiple_choice\npath: d.jsonl\ncontxt: a\n")
    with pytest.raises(TaskError, match=r"bad.yaml:4: unknown key 'contxt'"):
        load_task_file(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("name: x\n  kind: [\n")
    with pytest.raises(TaskError, match=r"bad2.yaml:2: malformed YAML"):
        load_task_file(tmp_path / "bad2.yaml")


def test_generate_task_template_key(tmp_path, loaded, monkeypatch):
    """`template: model` sends each question through the model's prompt template; default plain sends it as is."""
    from rich.progress import Progress

    from tunelab.evaluate import harness
    from tunelab.generate import build_prompt

    _, gen = _task_files(tmp_path)
    assert load_task_file(gen).template == "plain"
    gen.write_text(gen.read_text() + "template: model\n")
    t = load_task_file(gen)
    seen = []
    real = harness.generate

    def spy(loaded_, prompts, params, **kw):
        seen.append(build_prompt(loaded_, prompts[0], kw["template"]))
        return real(loaded_, prompts, params, **kw)

    monkeypatch.setattr(harness, "generate", spy)
    with Progress(disable=True) as progress:
        per = harness.score_task(loaded, t, t.items[:2], None, 2, progress)
    assert len(per["exact_match"]) == 2
    assert seen[0].startswith("Below is an instruction") and t.items[0].context in seen[0]
    gen.write_text(gen.read_text().replace("template: model", "template: chat"))
    with pytest.raises(TaskError, match=r"gen.yaml:7: template must be plain .* or model"):
        load_task_file(gen)


def test_eval_two_models_table_and_cache(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    mc, gen = _task_files(tmp_path)
    other = tmp_path / "other"
    from tiny import build_tiny_model

    build_tiny_model(other, seed=1)
    out = tmp_path / "ev"
    args = ["eval", str(tiny_model), str(other), "--tasks", f"{mc},{gen}", "--out", str(out)]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    acc = r["models"][str(tiny_model)]["add"]["metrics"]["acc"]
    assert 0 <= acc[1] <= acc[0] <= acc[2] <= 1 and r["tasks"]["add"]["items"] == 12
    assert r["diffs"][str(other)]["add"]["metric"] == "acc"
    per_a = r["models"][str(tiny_model)]["add"]["per_item"]["acc"]
    per_b = r["models"][str(other)]["add"]["per_item"]["acc"]
    assert abs(r["diffs"][str(other)]["add"]["diff"][0] - (sum(per_b) - sum(per_a)) / 12) < 1e-9
    assert "Δ" in capsys.readouterr().out  # the table is a result: stdout
    # second run: everything from the cache, same numbers
    (out / "results.json").unlink()
    assert main(args) == 0
    r2 = json.loads((out / "results.json").read_text())
    assert r2["models"] == r["models"]


@pytest.mark.parametrize("task", ["arc_easy", "mmlu:val", "mmlu_continuation:val", "kobest_copa", "kobest_boolq",
                                  "kobest_hellaswag", "kobest_sentineg", "kobest_wic", "gsm8k"])
def test_builtin_loaders_on_shared_data(task, monkeypatch):
    if not (SHARED / "bench").is_dir():
        pytest.skip("../shared/data/bench is not beside this checkout")
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(SHARED / "bench"))
    t = load_task(task)
    assert len(t.items) > 50
    if t.kind == "multiple_choice":
        assert all(0 <= it.gold < len(it.choices) for it in t.items)
        assert len({it.gold for it in t.items}) > 1
    else:
        assert all(it.target.lstrip("-").replace(".", "").isdigit() for it in t.items)


def _mmlu_dir(tmp_path, monkeypatch):
    """A two-subject MMLU folder in hendrycks/test's layout (headerless CSV), with a stray-space question."""
    for split, n in (("dev", 5), ("test", 3)):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        for s in ("anatomy", "virology"):
            rows = [f'" {s} {split} q{i}? ",a{i},b{i},"c, {i}",d{i},{"ABCD"[i % 4]}' for i in range(n)]
            (tmp_path / "mmlu" / split / f"{s}_{split}.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(tmp_path))


def test_mmlu_scores_test_with_first_n_dev_shots_per_subject(tmp_path, monkeypatch):
    _mmlu_dir(tmp_path, monkeypatch)
    t = load_task("mmlu")
    assert len(t.items) == 6 and t.sampler == "first_n"
    assert t.items[0].context == "anatomy test q0?\nA. a0\nB. b0\nC. c, 0\nD. d0\nAnswer:"  # question stripped
    shot = t.with_fewshot(2)
    desc = "The following are multiple choice questions (with answers) about virology.\n\n"
    assert shot[4].context == (desc + "virology dev q0?\nA. a0\nB. b0\nC. c, 0\nD. d0\nAnswer: A\n\n"
                               "virology dev q1?\nA. a1\nB. b1\nC. c, 1\nD. d1\nAnswer: B\n\n" + t.items[4].context)
    cloze = load_task("mmlu_anatomy_continuation")
    assert cloze.items[1].context == "Question: anatomy test q1?\nAnswer:" and cloze.items[1].choices == \
        ["a1", "b1", "c, 1", "d1"] and cloze.items[1].gold == 1
    assert cloze.with_fewshot(1)[0].context == ("The following are questions (with answers) about anatomy.\n\n"
                                                "Question: anatomy dev q0?\nAnswer: a0\n\n"
                                                "Question: anatomy test q0?\nAnswer:")
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").unlink()
    (tmp_path / "mmlu" / "test" / "virology_test.csv").unlink()
    (tmp_path / "mmlu" / "test").rmdir()
    with pytest.raises(TaskError, match=r"test split not found.*'mmlu:val'"):
        load_task("mmlu")


def test_kobest_prompts_are_lm_evals(tmp_path, monkeypatch):
    """The strings lm-eval's kobest yaml/utils.py build from the same rows (HF field names -> TSV columns)."""
    k = tmp_path / "kobest"
    rows = {"COPA": "ID\tsentence\tquestion\t1\t2\tAnswer\n1\t전쟁이 시작되었다.\t결과\t돌아왔다.\t파견되었다.\t2\n",
            "BoolQ": "ID\tText\tQuestion\tAnswer\n1\t본문.\t질문인가?\tTrue\n",
            "HellaSwag": "context\tchoice1\tchoice2\tchoice3\tchoice4\tlabel\n맥락.\ta\tb\tc\td\t3\n"}
    for d, text in rows.items():
        (k / d).mkdir(parents=True)
        (k / d / "dev.tsv").write_text(text)
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(tmp_path))
    copa = load_task("kobest_copa")
    assert copa.items[0].context == "전쟁이 시작되었다.  그래서" and copa.items[0].gold == 1
    assert copa.metrics == ["acc", "acc_norm", "f1"]
    assert load_task("kobest_boolq").items[0].context == "본문. 질문: 질문인가? 답변: "
    assert load_task("kobest_hellaswag").items[0].context == "문장: 맥락." and load_task("kobest_hellaswag").items[0].gold == 3


def test_macro_f1_is_sklearns():
    # sklearn.metrics.f1_score([0, 0, 1, 1, 1], [0, 1, 1, 1, 1], average="macro") == 0.7619047619047619
    assert abs(scoring.macro_f1([0, 0, 1, 1, 1], [0, 1, 1, 1, 1]) - 0.7619047619047619) < 1e-12
    assert scoring.macro_f1([0, 1], [1, 1]) == pytest.approx((0 + 2 / 3) / 2)


def test_gsm8k_shots_never_from_the_test_set(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    test = [{"question": f"T{i}?", "answer": f"work\n#### {i}"} for i in range(4)]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(tmp_path))
    t = load_task("gsm8k")
    assert t.num_fewshot == 0
    with pytest.raises(TaskError, match="train split"):
        t.with_fewshot(2)
    train = [{"question": f"R{i}?", "answer": f"steps\n#### 1{i}"} for i in range(6)]
    (tmp_path / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    t = load_task("gsm8k")
    assert t.num_fewshot == 5
    for it in t.with_fewshot(None):
        assert it.context.count("Question: R") == 5 and "Question: T" not in it.context[: -len("Question: T0?\nAnswer:")]


def test_text_nll_plain_and_rolling_windows(loaded):
    tok, model = loaded.tokenizer, loaded.model
    text = "Add 10 and 20 and then tell me about the capital city."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([[tok.eos_token_id] + ids])).logits[0], -1)
    whole = -sum(float(logp[j, t]) for j, t in enumerate(ids))
    nll, n = scoring.text_nll(loaded, text)
    assert n == len(ids) and abs(nll - whole) < 1e-4
    # windows of one token: each token predicted from the single token before it (a bigram model)
    prev = [tok.eos_token_id] + ids[:-1]
    with torch.no_grad():
        bigram = -sum(float(torch.log_softmax(model(input_ids=torch.tensor([[p]])).logits[0, -1], -1)[t])
                      for p, t in zip(prev, ids))
    nll1, n1 = scoring.text_nll(loaded, text, max_len=1)
    assert n1 == n and abs(nll1 - bigram) < 1e-4 and abs(nll1 - whole) > 1e-3


def test_eval_text_perplexity(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text("Add 1 and 2.\nThe answer is 3.\n\n\nthe capital city\n\nHi there\n")
    assert main(["eval", str(tiny_model), "--tasks", f"ppl:{tmp_path / 't.txt'}", "--out", str(tmp_path / "ev")]) == 0
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["tasks"]["ppl:t.txt"]["items"] == 3
    m = r["models"][str(tiny_model)]["ppl:t.txt"]
    import math

    loss = sum(m["per_item"]["nll"]) / sum(m["per_item"]["tokens"])
    assert abs(m["metrics"]["loss"][0] - loss) < 1e-9 and abs(m["metrics"]["perplexity"][0] - math.exp(loss)) < 1e-6
    assert loss > 0
    assert main(["eval", str(tiny_model), "--tasks", f"ppl:{tmp_path / 'missing.txt'}"]) == 2


def test_interrupted_eval_keeps_the_cache_and_resumes(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    mc, _ = _task_files(tmp_path)
    real, calls = scoring.batch_choice_logliks, []

    def interrupt_at_third_batch(loaded, requests, batch_size):
        calls.append(len(requests))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(loaded, requests, batch_size)

    monkeypatch.setattr(scoring, "batch_choice_logliks", interrupt_at_third_batch)
    out = tmp_path / "ev"
    args = ["eval", str(tiny_model), "--tasks", str(mc), "--out", str(out), "--batch-size", "2"]
    assert main(args) == 130
    assert not (out / "results.json").exists()  # no half-written result
    calls.clear()
    monkeypatch.setattr(scoring, "batch_choice_logliks", lambda *a: (calls.append(len(a[1])), real(*a))[1])
    assert main(args) == 0
    assert sum(calls) == 12 - 4  # the 2 batches of 2 items scored before Ctrl-C came from the cache
    assert json.loads((out / "results.json").read_text())["tasks"]["add"]["items"] == 12


def test_bench_eval_smoke(tmp_path, tiny_model, monkeypatch):
    """bench/bench_eval.py must not rot: both arms on the tiny model agree."""
    from conftest import REPO

    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(SHARED / "bench"))  # the script's setdefault must not leak
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_eval

    mc, _ = _task_files(tmp_path)
    out = tmp_path / "eval.json"
    assert bench_eval.main(["--model", str(tiny_model), "--task", str(mc), "--limit", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["items"] == 3 and r["choices"] == 6 and r["max_loglik_diff"] < 1e-3 and r["same_prediction"] == 3


@pytest.mark.parametrize("field, message", [
    ('context: "{q.strip()}"', r"mc.yaml:4: field 'context': '\{q.strip\(\)\}' is not a field name"),
    ("context: {q}", r"mc.yaml:4: field 'context' is a YAML mapping .*quote the template"),
    ('context: "Question: {{q}}"', r"mc.yaml:4: field 'context' has \{\{...\}\}"),
    ('context: "{q!r}"', r"mc.yaml:4: field 'context': '\{q!r\}' is not a field name"),
    ('context: "{q:>10}"', r"mc.yaml:4: field 'context': '\{q:>10\}' is not a field name"),
])
def test_silent_template_mistakes_exit_2(tmp_path, tiny_model, capsys, field, message):
    """Each of these rendered garbage into every prompt and scored it; now one line naming file, line and field."""
    import re

    mc, _ = _task_files(tmp_path)
    lines = mc.read_text().splitlines()
    assert lines[3].startswith("context:")
    lines[3] = field
    mc.write_text("\n".join(lines) + "\n")
    assert main(["eval", str(tiny_model), "--tasks", str(mc)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_multiple_choice_template_model_wraps_the_context(tmp_path, loaded):
    """`template: model` in a multiple-choice file used to be accepted and ignored; now the context is sent
    through the run's prompt template, and the scores are those of the wrapped context."""
    from rich.progress import Progress

    from tunelab.evaluate import harness
    from tunelab.generate import build_prompt

    mc, _ = _task_files(tmp_path)
    plain = load_task_file(mc)
    mc.write_text(mc.read_text() + "template: model\n")
    t = load_task_file(mc)
    assert t.template == "model"
    with Progress(disable=True) as progress:
        per = harness.score_task(loaded, t, t.items[:2], None, 2, progress)
        per_plain = harness.score_task(loaded, plain, plain.items[:2], None, 2, progress)
    wrapped = build_prompt(loaded, t.items[0].context, None)
    assert wrapped.startswith("Below is an instruction") and wrapped != t.items[0].context
    assert per["logliks"][0] == pytest.approx(scoring.choice_logliks(loaded, wrapped, t.items[0].choices), abs=1e-5)
    assert per["logliks"][0] != pytest.approx(per_plain["logliks"][0], abs=1e-3)


def test_perplexity_paired_difference_is_the_difference_of_the_cells(tmp_path, tiny_model, monkeypatch):
    """The Δ under a loss cell is B's token-weighted loss minus A's (not a difference of per-item means)."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=3)
    (tmp_path / "t.txt").write_text("Add 1 and 2.\n\nThe answer is 3 and the capital city is far away from here.\n\nHi\n")
    out = tmp_path / "ev"
    assert main(["eval", str(tiny_model), str(other), "--tasks", f"ppl:{tmp_path / 't.txt'}", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    a, b = (r["models"][m]["ppl:t.txt"] for m in (str(tiny_model), str(other)))
    d = r["diffs"][str(other)]["ppl:t.txt"]["diff"]
    assert d[0] == pytest.approx(b["metrics"]["loss"][0] - a["metrics"]["loss"][0], abs=1e-9)
    per_item_means = (sum(n / k for n, k in zip(b["per_item"]["nll"], b["per_item"]["tokens"]))
                      - sum(n / k for n, k in zip(a["per_item"]["nll"], a["per_item"]["tokens"]))) / 3
    assert abs(d[0] - per_item_means) > 1e-6 and d[1] <= d[0] <= d[2]
    lm = r["lm_eval"][str(tiny_model)]["ppl:t.txt"]
    assert lm["token_perplexity,none"] == pytest.approx(a["metrics"]["perplexity"][0])


def test_list_tasks_limit_fraction_and_lm_eval_metrics(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(SHARED / "bench"))
    assert main(["eval", "--list-tasks"]) == 0
    listed = capsys.readouterr().err
    assert "kobest_copa" in listed and "lm-eval kobest_copa" in listed and "mmlu_continuation" in listed
    mc, _ = _task_files(tmp_path)
    out = tmp_path / "ev"
    assert main(["eval", str(tiny_model), "--tasks", str(mc), "--limit", "0.25", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["tasks"]["add"]["items"] == 3  # ceil(12 * 0.25), as lm-eval
    lm = r["lm_eval"][str(tiny_model)]["add"]
    acc = r["models"][str(tiny_model)]["add"]["per_item"]["acc"]
    import statistics

    assert lm["acc,none"] == pytest.approx(sum(acc) / 3)
    assert lm["acc_stderr,none"] == pytest.approx(statistics.stdev(acc) / 3 ** 0.5)
    assert main(["eval", str(tiny_model), "--tasks", str(mc), "--limit", "2.5"]) == 2
