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


@pytest.mark.parametrize("task", ["arc_easy", "mmlu", "kobest_copa", "kobest_boolq",
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


def test_mmlu_subject_fewshot_layout(monkeypatch):
    if not (SHARED / "bench").is_dir():
        pytest.skip("../shared/data/bench is not beside this checkout")
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(SHARED / "bench"))
    t = load_task("mmlu_abstract_algebra")
    it = t.with_fewshot(2)[0]
    assert it.context.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert it.context.count("Answer:") == 3 and it.context.count("The following") == 1
    with pytest.raises(TaskError, match="per-subject"):
        load_task("mmlu").with_fewshot(1)


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
    real, calls = scoring.choice_logliks, []

    def interrupt_at_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(scoring, "choice_logliks", interrupt_at_fifth)
    out = tmp_path / "ev"
    assert main(["eval", str(tiny_model), "--tasks", str(mc), "--out", str(out)]) == 130
    assert not (out / "results.json").exists()  # no half-written result
    calls.clear()
    monkeypatch.setattr(scoring, "choice_logliks", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(["eval", str(tiny_model), "--tasks", str(mc), "--out", str(out)]) == 0
    assert len(calls) == 12 - 4  # the 4 items scored before Ctrl-C came from the cache
    assert json.loads((out / "results.json").read_text())["tasks"]["add"]["items"] == 12


def test_gsm8k_fewshot_shows_worked_answers(monkeypatch):
    if not (SHARED / "bench").is_dir():
        pytest.skip("../shared/data/bench is not beside this checkout")
    monkeypatch.setenv("TUNELAB_BENCH_DIR", str(SHARED / "bench"))
    t = load_task("gsm8k")
    it = t.with_fewshot(2, seed=7)[0]
    assert it.context.count("####") == 2 and it.context.endswith(t.items[0].context)
    assert it.target == t.items[0].target and "####" not in t.items[0].context


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
