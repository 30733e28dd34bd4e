"""`tunelab check` tests the real train/inference contract (issue 11.2): each test breaks the
tokenizer, the template, the truncation or the pipeline on purpose and expects exit 2 from
`check` (and from `train`, which runs the same checks). With check_examples emptied, every one
of them goes green -> red."""

import json
import shutil

import pytest

from tunelab.cli import main

CONV = [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "The answer is 3."},
        {"role": "user", "content": "And 2 and 2?"}, {"role": "assistant", "content": "The answer is 4."},
        {"role": "user", "content": "Add 5 and 5."}, {"role": "assistant", "content": "The answer is 10."}]


def _model_copy(tiny_model, tmp_path, tokenizer_json=None, tokenizer_config=None):
    m = tmp_path / "model"
    shutil.copytree(tiny_model, m)
    for name, change in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", tokenizer_config)):
        if change:
            obj = json.loads((m / name).read_text())
            change(obj)
            (m / name).write_text(json.dumps(obj))
    return m


def _config(tmp_path, model, data, **data_keys):
    keys = "".join(f", {k}: {json.dumps(v)}" for k, v in data_keys.items())
    p = tmp_path / "run.yaml"
    keys = keys if "max_seq_length" in data_keys else keys + ", max_seq_length: 128"
    p.write_text(f"model: {{name: {model}}}\ndata: {{path: {data}, test_size: 0.1{keys}}}\n"
                 "train: {per_device_train_batch_size: 4, gradient_accumulation_steps: 1, warmup_steps: 0, "
                 "max_steps: 1}\n")
    return p


def _chat_data(tmp_path, conv, n=12):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(n)))
    return p


def _check(cfg, capsys, *sets):
    capsys.readouterr()
    argv = ["check", str(cfg)] + [x for s in sets for x in ("--set", s)]
    code = main(argv)
    return code, " ".join(capsys.readouterr().err.split())


def test_tokenizer_that_appends_eos_to_every_text_fails(tiny_model, tmp_path, alpaca_file, capsys):
    def append_eos(tj):
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}}}

    cfg = _config(tmp_path, _model_copy(tiny_model, tmp_path, tokenizer_json=append_eos), alpaca_file)
    code, err = _check(cfg, capsys)
    assert code == 2 and "prompts end in the EOS token '<|im_end|>'" in err and "data.jsonl:" in err
    assert main(["train", str(cfg), "--output", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run" / "final").exists()


def test_template_with_a_thinking_block_only_in_the_generation_prompt_fails(tiny_model, tmp_path, capsys):
    from tiny import CHATML

    think = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n\n</think>\n\n'")
    assert think != CHATML

    def set_template(tc):
        tc["chat_template"] = think

    model = _model_copy(tiny_model, tmp_path, tokenizer_config=set_template)
    if (model / "chat_template.jinja").is_file():
        (model / "chat_template.jinja").write_text(think)
    cfg = _config(tmp_path, model, _chat_data(tmp_path, CONV[:2]), format="chat", template="chat_template")
    code, err = _check(cfg, capsys)
    assert code == 2
    assert "renders the generation prompt differently from the same turns in a finished conversation" in err


def test_turns_not_closed_by_eos_fail_multi_turn_parity(tiny_model, tmp_path, capsys):
    """The chat template closes turns with <|im_end|>, the tokenizer's EOS is <|endoftext|>: training
    all assistant turns in one sequence would show turn 2 a history inference never sends."""

    def eos_endoftext(tc):
        tc["eos_token"] = "<|endoftext|>"

    model = _model_copy(tiny_model, tmp_path, tokenizer_config=eos_endoftext)
    cfg = _config(tmp_path, model, _chat_data(tmp_path, CONV), format="chat", template="chat_template",
                  max_seq_length=256)
    code, err = _check(cfg, capsys)
    assert code == 2 and "train/inference mismatch at" in err and "assistant turn 2 of 3" in err
    assert "data.train_on=last_assistant" in err
    code, err = _check(cfg, capsys, "data.train_on=last_assistant")
    assert code == 0 and "preflight passed" in err


def test_truncation_that_leaves_no_response_token_fails(tiny_model, tmp_path, alpaca_file, capsys):
    rows = alpaca_file.read_text() + json.dumps({"instruction": "word " * 200, "input": "", "output": "x"}) + "\n"
    alpaca_file.write_text(rows)
    cfg = _config(tmp_path, tiny_model, alpaca_file, max_seq_length=128)
    code, err = _check(cfg, capsys)
    assert code == 2 and "1 rows have every response token cut away by data.max_seq_length=128" in err
    assert f"{alpaca_file}:41" in err
    assert main(["train", str(cfg), "--output", str(tmp_path / "run")]) == 2
    code, err = _check(cfg, capsys, "data.drop_untrainable=true")
    assert code == 0 and "1: response cut away by truncation" in err


def test_a_reply_that_does_not_end_in_eos_fails(tiny_config, capsys, monkeypatch):
    """A pipeline regression (the appended EOS lost) is caught on the tokenized rows themselves."""
    from tunelab.data import pipeline

    inner = pipeline.tokenize_example

    def lose_eos(*a, **k):
        t = inner(*a, **k)
        t.input_ids, t.labels, t.full_len = t.input_ids[:-1], t.labels[:-1], t.full_len - 1
        return t

    monkeypatch.setattr(pipeline, "tokenize_example", lose_eos)
    code, err = _check(tiny_config, capsys)
    assert code == 2 and "have a trained reply that does not end in the EOS token '<|im_end|>'" in err


def test_a_prompt_that_differs_from_what_generate_sends_fails(tiny_config, capsys, monkeypatch):
    """Training and `generate` must build the prompt ids the same way; a drift (here: training
    encodes the prompt with a trailing space) is caught by comparing with generate's own path."""
    from tunelab.data import pipeline

    inner = pipeline.encode_prompt
    monkeypatch.setattr(pipeline, "encode_prompt", lambda tok, text: inner(tok, text + " "))
    code, err = _check(tiny_config, capsys)
    assert code == 2 and "train/inference mismatch at" in err and "the prompt" in err


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_system_prompt_unused_by_the_template_is_said(tiny_config, capsys, template):
    code, err = _check(tiny_config, capsys, f"data.template={template}", "data.system_prompt=Be brief.")
    assert code == 0 and f"the {template} template has no system part" in err
