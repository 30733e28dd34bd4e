import json

import pytest

from tunelab.cache import Cache
from tunelab.cli import main
from tunelab.generate import GenerationError, GenParams, generate, generate_batch, read_prompts
from tunelab.models import load_for_inference


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_inference(str(tiny_model))


def test_batched_left_padded_equals_one_at_a_time(loaded):
    prompts = ["Add 1 and 2.", "Add 10 and 20 and then tell me about the capital city of the country.", "Hi"]
    params = GenParams(max_new_tokens=12)
    batched = generate_batch(loaded, prompts, params)
    single = [generate_batch(loaded, [p], params)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.tokens > 0 for c in batched)


def test_uses_the_run_template(loaded):
    from tunelab.data.templates import ALPACA_PROMPT
    from tunelab.generate import build_prompt

    assert loaded.template == "alpaca"
    assert build_prompt(loaded, "Name a color.") == ALPACA_PROMPT.format(instruction="Name a color.")


def test_sampling_knobs_without_sampling_are_an_error():
    with pytest.raises(GenerationError, match="only apply when sampling"):
        GenParams(temperature=0.05, top_p=0.95).validate()
    GenParams(temperature=0.05, top_p=0.95, do_sample=True).validate()


def test_sampling_is_seeded(loaded):
    p = GenParams(max_new_tokens=10, do_sample=True, temperature=1.0, seed=3)
    a = generate_batch(loaded, ["Add 1 and 2."], p)[0].text
    b = generate_batch(loaded, ["Add 1 and 2."], p)[0].text
    assert a == b


def test_stop_strings_cut_the_text(loaded):
    free = generate_batch(loaded, ["Add 1 and 2."], GenParams(max_new_tokens=20))[0]
    if len(free.text) < 4:
        pytest.skip("random tiny model produced too little text")
    stop = free.text[2:4]
    cut = generate_batch(loaded, ["Add 1 and 2."], GenParams(max_new_tokens=20, stop=[stop]))[0]
    assert stop not in cut.text and free.text.startswith(cut.text) and cut.finish_reason == "stop"


def test_cache_makes_rerun_instant_and_exact(tmp_path, loaded):
    cache = Cache(tmp_path / "c.sqlite")
    prompts = [f"Add {i} and {i}." for i in range(5)]
    first = generate(loaded, prompts, GenParams(max_new_tokens=6), cache=cache, batch_size=2)
    again = generate(loaded, prompts, GenParams(max_new_tokens=6), cache=cache, batch_size=2)
    assert [c.text for c in first] == [c.text for c in again]
    assert not any(c.cached for c in first) and all(c.cached for c in again)
    other = generate(loaded, prompts[:1], GenParams(max_new_tokens=7), cache=cache)
    assert not other[0].cached  # different parameters, different key


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "q.jsonl").write_text('{"turns": ["mt bench q"]}\n{"instruction": "do", "instances": [{"input": "x"}]}\n')
    assert [p.display() for p in read_prompts([], str(tmp_path / "p.txt"))] == ["one", "two"]
    got = read_prompts(["cli"], str(tmp_path / "q.jsonl"))  # the input stays its own field (test_templates.py)
    assert [(p.instruction, p.input) for p in got] == [("cli", ""), ("mt bench q", ""), ("do", "x")]
    (tmp_path / "bad.jsonl").write_text('{"turns": ["a"]}\n{oops\n')
    with pytest.raises(GenerationError, match="bad.jsonl:2: malformed JSON"):
        read_prompts([], str(tmp_path / "bad.jsonl"))


def test_cli_generate_writes_jsonl(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o.jsonl"
    assert main(["generate", str(tiny_model), "-p", "Add 1 and 2.", "-p", "Hi", "--max-new-tokens", "5",
                 "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Add 1 and 2.", "Hi"] and all("completion" in r for r in rows)
    assert main(["generate", str(tiny_model), "-p", "x", "--temperature", "0.05"]) == 2


def test_adapter_on_a_different_base_is_refused_naming_both(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--output", str(run), "--set", "train.max_steps=1",
                 "--set", "train.save_steps=1"]) == 0
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run / "final" / f, other / f)
    capsys.readouterr()
    assert main(["generate", str(other), "--adapter", str(run / "checkpoint-1"), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "trained on a different base" in err and "hidden size 64" in err and "hidden size 96" in err


# ---- issue 18.4 ---------------------------------------------------------------------------------

def test_prompt_longer_than_the_context_window_is_refused_before_generating(tmp_path, tiny_model, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    long = " ".join(["the capital city of the country"] * 120)  # > 512 tokens (the tiny model's window)
    assert main(["generate", str(tiny_model), "-p", "Hi", "-p", long, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "prompt 2" in err and "context window of 512 tokens" in err and len(err.strip().splitlines()) == 1
    # fits alone, but not with the new tokens
    mid = " ".join(["the capital city of the country"] * 60)
    assert main(["generate", str(tiny_model), "-p", mid, "--max-new-tokens", "400"]) == 2
    assert "max_new_tokens 400" in capsys.readouterr().err


def _force_hangul(loaded, char="한"):
    """Bias greedy decoding so the tiny model repeats `char`, whose 3 UTF-8 bytes are 3 byte-level tokens."""
    ids = loaded.tokenizer.encode(char, add_special_tokens=False)
    assert len(ids) == 3 and loaded.tokenizer.decode(ids[:2]).endswith("\ufffd")  # really split into bytes
    a, b, c = ids
    loaded.model.generation_config.sequence_bias = {(a,): 100.0, (a, b): 200.0, (b, c): 200.0}
    return ids


def test_a_reply_cut_inside_a_hangul_character_never_ends_in_replacement_char(tiny_model):
    loaded = load_for_inference(str(tiny_model))
    _force_hangul(loaded)
    for n in (3, 4, 5, 7):  # cut after 0, 1 and 2 bytes of the last character
        got = generate_batch(loaded, ["Hi"], GenParams(max_new_tokens=n))[0]
        assert got.text == "한" * (n // 3) and got.finish_reason == "length"
        pieces = []
        streamed = generate_batch(loaded, ["Hi"], GenParams(max_new_tokens=n), stream=pieces.append)[0]
        assert "".join(pieces) == streamed.text == got.text


def test_outputs_come_back_in_input_order(loaded):
    prompts = ["Add 10 and 20 and then tell me about the capital city of the country.", "Hi",
               "Add 1 and 2.", "Write a response about the number 7 and the city.", "a"]
    params = GenParams(max_new_tokens=6)
    got = generate(loaded, prompts, params, batch_size=2)  # batched by length: the order inside differs
    single = [generate_batch(loaded, [p], params)[0] for p in prompts]
    assert [c.prompt for c in got] == prompts
    assert [c.text for c in got] == [c.text for c in single]


def test_stop_escapes():
    from tunelab.generate import unescape

    assert unescape("\\n") == "\n" and unescape("\\t###") == "\t###" and unescape("a\\\\n") == "a\\n"
    assert unescape("\\u00e9") == "é" and unescape("한\\n") == "한\n" and unescape("plain") == "plain"
    with pytest.raises(GenerationError, match="bad escape"):
        unescape("oops\\")


def test_system_flag_reaches_the_prompt(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    assert main(["generate", str(tiny_model), "--template", "chat_template", "--system", "Answer in Korean.",
                 "-p", "Hi", "--max-new-tokens", "2", "--show-prompt"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["rendered_prompt"].startswith("⟦<|im_start|>⟧system\nAnswer in Korean.⟦<|im_end|>⟧\n")
    assert main(["generate", str(tiny_model), "--system", "x", "-p", "Hi"]) == 2  # alpaca has no system part
    assert "--system: the alpaca template has no system message" in capsys.readouterr().err


def test_a_seeded_sample_is_the_same_alone_and_in_any_batch(loaded):
    """decode.py draws each row from its own generator seeded with the row's seed (issue 17.6: the server
    batches requests as they arrive, and a seeded request must not depend on its neighbours)."""
    prompts = ["Add 1 and 2.", "Hi", "Add 10 and 20 and then tell me about the capital city of the country."]
    p = GenParams(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=50, seed=5)
    single = [generate_batch(loaded, [x], p)[0].text for x in prompts]
    assert [c.text for c in generate_batch(loaded, prompts, p)] == single
    assert [c.text for c in generate_batch(loaded, prompts[::-1], p)] == single[::-1]
    other = [generate_batch(loaded, [x], GenParams(**{**p.__dict__, "seed": 6}))[0].text for x in prompts]
    assert other != single
