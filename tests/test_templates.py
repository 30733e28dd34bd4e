"""One template everywhere (issue 11.1): the same row, with an `input` and a system prompt, is
rendered to the same token ids by training, generate -f, ppl: eval, compare, serve and export
verification; and multi-turn chat trains every assistant turn (issue 18.1)."""

import json

import pytest

from tunelab.cli import main
from tunelab.config import DataConfig
from tunelab.data.pipeline import IGNORE_INDEX, prepare, tokenize_example
from tunelab.data.preflight import show_tokens, trained_spans
from tunelab.data.templates import Example, TemplateError, render_prompt
from tunelab.models import load_for_inference

SYSTEM = "You answer in one short sentence."
ROW = {"instruction": "Add the two numbers.", "input": "12 30", "output": "The answer is 42."}


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [ROW] * 8))
    return p


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model, rows_file):
    """A tiny LoRA run trained with the chat template and a system prompt on rows that have an input."""
    d = tmp_path_factory.mktemp("chatrun")
    cfg = d / "run.yaml"
    cfg.write_text(f"model: {{name: {tiny_model}}}\n"
                   f"data: {{path: {rows_file}, template: chat_template, system_prompt: '{SYSTEM}', "
                   f"max_seq_length: 128, shuffle: false}}\n"
                   "train: {per_device_train_batch_size: 4, gradient_accumulation_steps: 1, warmup_steps: 0,\n"
                   "        max_steps: 1, save_steps: 1, learning_rate: 1.0e-3}\n")
    assert main(["train", str(cfg), "--output", str(d / "run")]) == 0
    return d / "run"


def _spy(monkeypatch, module, name):
    """Wrap module.name so every ids list it returns is recorded."""
    seen = []
    inner = getattr(module, name)

    def wrapper(*a, **k):
        out = inner(*a, **k)
        seen.append(out)
        return out

    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("template", ["alpaca", "chat_template"])
def test_same_row_same_prompt_in_train_generate_eval_compare_serve_export(
        template, request, tiny_model, rows_file, tmp_path, monkeypatch, capsys):
    import tunelab.generate as gen
    from tunelab import export
    from tunelab.evaluate import harness, scoring
    from tunelab.serve import Server

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    spec = str(request.getfixturevalue("chat_run")) if template == "chat_template" else str(tiny_model)
    system = SYSTEM if template == "chat_template" else None
    loaded = load_for_inference(spec)
    assert (loaded.template, loaded.system_prompt) == (template, system)  # from the run's config
    tok = loaded.tokenizer

    # training: the masked prefix the Trainer gets
    train, _, _, _ = prepare(DataConfig(path=str(rows_file), template=template, system_prompt=system,
                                        max_seq_length=128, shuffle=False), tok)
    trained = train[0].input_ids[: train[0].prompt_len]
    text = show_tokens(tok, trained)
    if template == "alpaca":
        assert "### Input:\n12 30\n\n### Response:\n" in text
    else:
        assert text.startswith(f"⟦<|im_start|>⟧system\n{SYSTEM}⟦<|im_end|>⟧")
        assert "Add the two numbers.\n\n12 30" in text

    # generate -f rows.jsonl
    (ex,) = gen.read_prompts([], str(rows_file))[:1]
    assert gen.prompt_ids(loaded, ex) == trained

    # ppl: eval, through score_task and the scorer
    seen = []
    monkeypatch.setattr(scoring, "_full_loglik", lambda model, ctx, cont, dev: seen.append(ctx) or -1.0)
    task = harness._ppl_task(str(rows_file))

    class Progress:
        def add_task(self, *a, **k):
            return 0

        def advance(self, *a):
            pass

    harness.score_task(loaded, task, task.items[:1], None, 1, Progress())
    assert seen == [trained]

    # compare A B --prompts rows.jsonl (both sides send the row whole)
    sent = _spy(monkeypatch, gen, "prompt_ids")
    assert main(["compare", spec, spec, "--prompts", str(rows_file), "--limit", "1", "--out", str(tmp_path / "cmp"),
                 "--max-new-tokens", "1"]) == 0
    assert sent and all(ids == trained for ids in sent)
    first = json.loads((tmp_path / "cmp" / "compare.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == "Add the two numbers.\n\n12 30"

    # export verification renders with the run's template and system prompt, through the same path
    assert export.verify_prompt_ids(tok, loaded.template, loaded.system_prompt, [ex]) == [trained]

    # serve: a chat request carries the row as one user message (a chat template joins instruction
    # and input that way too); the alpaca template has no chat form of an input
    if template == "chat_template":
        srv = Server(loaded, "m", 8, 512, None, 1, 0.0)
        try:
            body = {"messages": [{"role": "user", "content": "Add the two numbers.\n\n12 30"}]}
            assert srv.chat_prompt(body) == trained
        finally:
            srv.engine.stopped = True


def test_export_verification_sends_the_run_system_prompt(chat_run, tmp_path, monkeypatch):
    from tunelab import export

    seen = []
    inner = export.verify_prompt_ids
    monkeypatch.setattr(export, "verify_prompt_ids",
                        lambda tok, t, sp, *a: seen.append((t, sp)) or inner(tok, t, sp, *a))
    assert main(["export", str(chat_run), "--to", str(tmp_path / "out")]) == 0
    assert seen and all(x == ("chat_template", SYSTEM) for x in seen)


def test_generate_show_prompt_prints_what_the_model_is_sent(chat_run, rows_file, tmp_path, monkeypatch, capsys):
    import tunelab.generate as gen

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    loaded = load_for_inference(str(chat_run))
    (ex,) = gen.read_prompts([], str(rows_file))[:1]
    capsys.readouterr()
    assert main(["generate", str(chat_run), "-p", "Name a color.", "-f", str(rows_file), "--max-new-tokens", "2",
                 "--show-prompt", "--no-cache"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_index = {r["index"]: r for r in rows}
    assert by_index[1]["rendered_prompt"] == show_tokens(loaded.tokenizer, gen.prompt_ids(loaded, ex))
    assert by_index[1]["rendered_prompt"].startswith(f"⟦<|im_start|>⟧system\n{SYSTEM}⟦<|im_end|>⟧")
    assert by_index[0]["rendered_prompt"].endswith("Name a color.⟦<|im_end|>⟧\n⟦<|im_start|>⟧assistant\n")
    assert list(by_index[1]) == ["index", "prompt", "rendered_prompt", "completion"]


def test_read_prompts_keeps_the_row_whole(tmp_path):
    from tunelab.generate import read_prompts

    p = tmp_path / "q.jsonl"
    p.write_text('{"turns": ["mt bench q"]}\n{"instruction": "do", "instances": [{"input": "x"}]}\n'
                 '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, '
                 '{"role": "assistant", "content": "ref"}]}\n')
    got = read_prompts(["cli"], str(p))
    assert got == [Example(instruction="cli"), Example(instruction="mt bench q"), Example(instruction="do", input="x"),
                   Example(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                           response="ref")]


def test_templates_without_turns_refuse_what_they_cannot_show():
    with pytest.raises(TemplateError, match="not a conversation of 3 turns"):
        render_prompt("alpaca", Example(messages=[{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"},
                                                  {"role": "user", "content": "c"}]))
    with pytest.raises(TemplateError, match="no place for a system message"):
        render_prompt("alpaca", Example(messages=[{"role": "system", "content": "s"},
                                                  {"role": "user", "content": "a"}]))
    one = render_prompt("alpaca", Example(messages=[{"role": "user", "content": "a"}]))
    assert one == render_prompt("alpaca", Example(instruction="a"))


# ---- issue 18.1: every assistant turn is trained ----------------------------------------------------

CONV = [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "The answer is 3."},
        {"role": "user", "content": "And 2 and 2?"}, {"role": "assistant", "content": "The answer is 4."},
        {"role": "user", "content": "Add 5 and 5."}, {"role": "assistant", "content": "The answer is 10."}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from tunelab.models import load_tokenizer

    return load_tokenizer(tiny_model)[0]


def test_all_assistant_turns_are_trained_and_nothing_else(tok):
    ex = Example(messages=CONV[:-1], response=CONV[-1]["content"])
    t = tokenize_example(tok, "chat_template", ex, 512, SYSTEM, "all_assistant")
    spans = trained_spans(t.labels)
    assert [tok.decode(t.labels[a:b]) for a, b in spans] == [
        "The answer is 3.<|im_end|>", "The answer is 4.<|im_end|>", "The answer is 10.<|im_end|>"]
    assert [a for a, _ in spans] == t.turn_starts
    # every label is either masked or the input id at that position; the masked text is the rest
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(t.labels, t.input_ids))
    full = tok.apply_chat_template([{"role": "system", "content": SYSTEM}] + CONV, tokenize=False)
    assert tok.decode(t.input_ids) + "\n" == full
    # each turn's prefix is what inference sends for the conversation up to that turn
    for (a, _), k in zip(spans, (1, 3, 5)):
        want = render_prompt("chat_template", Example(messages=CONV[:k]), tok, SYSTEM)
        assert tok.decode(t.input_ids[:a]) == want


def test_last_assistant_trains_only_the_final_turn(tok):
    ex = Example(messages=CONV[:-1], response=CONV[-1]["content"])
    t = tokenize_example(tok, "chat_template", ex, 512, None, "last_assistant")
    assert [tok.decode(t.labels[a:b]) for a, b in trained_spans(t.labels)] == ["The answer is 10.<|im_end|>"]
    assert t.input_ids == tokenize_example(tok, "chat_template", ex, 512, None, "all_assistant").input_ids


def test_chat_data_check_marks_every_trained_span(tmp_path, tiny_model, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(4)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {tiny_model}}}\ndata: {{path: {data}, format: chat, template: chat_template, "
                   f"max_seq_length: 256}}\n")
    assert main(["check", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert err.count("<|im_end|>⟧◀") == 3 and "in 3 turns" in err and "every assistant turn" in err
    assert main(["check", str(cfg), "--set", "data.train_on=last_assistant"]) == 0
    assert capsys.readouterr().err.count("<|im_end|>⟧◀") == 1
    assert main(["check", str(cfg), "--set", "data.train_on=every"]) == 2
    assert "data.train_on" in capsys.readouterr().err


def test_a_chat_template_that_refuses_a_conversation_is_one_line(tok):
    from copy import deepcopy

    strict = deepcopy(tok)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}" + tok.chat_template)
    with pytest.raises(TemplateError, match="refuses a conversation system/user: System role not supported"):
        render_prompt("chat_template", Example(instruction="hi"), strict, "Be brief.")
    assert render_prompt("chat_template", Example(instruction="hi"), strict) == \
        render_prompt("chat_template", Example(instruction="hi"), tok)
