import json

import pytest

from tunelab.config import DataConfig
from tunelab.data.pipeline import IGNORE_INDEX, Collator, prepare, tokenize_example
from tunelab.data.sources import DataError
from tunelab.data.templates import Example, encode_prompt, render_prompt
from tunelab.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)[0]


def test_alpaca_prompt_is_the_recipe_text_exactly():
    p = render_prompt("alpaca", Example(instruction="Name a color."))
    assert p == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
    assert not any(line.startswith((" ", "\t")) for line in p.splitlines())
    assert "### Response: \n" not in p and "### Instruction: \n" not in p


def test_labels_are_exactly_response_plus_eos(tok):
    ex = Example(instruction="Add 2 and 3.", response="The answer is 5.")
    t = tokenize_example(tok, "alpaca", ex, 512)
    prompt_ids = encode_prompt(tok, render_prompt("alpaca", ex))
    response_ids = tok("The answer is 5.", add_special_tokens=False)["input_ids"]
    assert t.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert t.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    trained = [x for x in t.labels if x != IGNORE_INDEX]
    assert tok.decode(trained) == "The answer is 5.<|im_end|>"


def test_truncation_and_untrainable(tok):
    ex = Example(instruction="word " * 200, response="ok")
    t = tokenize_example(tok, "alpaca", ex, 64)
    assert len(t.input_ids) == 64 and t.truncated and t.n_trained == 0


def test_pad_is_never_eos(tiny_model):
    tok, note = load_tokenizer(tiny_model)  # the tiny tokenizer ships pad == eos, like SmolLM2
    assert tok.pad_token_id != tok.eos_token_id
    assert "same as EOS" in note


def test_collator_masks_padding(tok):
    c = Collator(tok.pad_token_id)
    b = c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert b["input_ids"][1].tolist() == [5, tok.pad_token_id, tok.pad_token_id]
    assert b["labels"][1].tolist() == [5, -100, -100]
    assert b["attention_mask"][1].tolist() == [1, 0, 0]


def test_prepare_recipe_pipeline(tmp_path, tok):
    rows = [{"instruction": f"Q{i}", "input": "x" if i % 3 == 0 else "", "output": f"A{i}"} for i in range(30)]
    rows.append({"instruction": "Q", "input": "", "output": "   "})
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows))
    cfg = DataConfig(path=str(p), only_empty_input=True, test_size=0.1, max_seq_length=128)
    train, evals, stats, _ = prepare(cfg, tok)
    assert stats.rows_read == 31
    assert stats.dropped["empty response"] == 1
    assert stats.dropped["non-empty input (data.only_empty_input)"] == 10
    assert len(train) + len(evals) == 20 and len(evals) == 2
    # same seed, same split
    train2, evals2, _, _ = prepare(cfg, tok)
    assert [e.input_ids for e in evals] == [e.input_ids for e in evals2]


def test_field_mapping_csv(tmp_path, tok):
    p = tmp_path / "chat.csv"
    p.write_text("Q,A,label\n안녕하세요,반가워요,0\n뭐해?,공부해요,0\n", encoding="utf-8")
    cfg = DataConfig(path=str(p), fields={"instruction": "Q", "output": "A"}, max_seq_length=256)
    train, _, stats, _ = prepare(cfg, tok)
    assert stats.rows_read == 2 and len(train) == 2
    assert tok.decode([x for x in train[0].labels if x != -100]).endswith("<|im_end|>")


def test_missing_field_names_the_line(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_text("Q,A\nhi,there\n")
    with pytest.raises(DataError, match=r"d.csv:2: missing field 'instruction'.*data.fields"):
        prepare(DataConfig(path=str(p)), tok)


def test_malformed_jsonl_names_the_line(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        prepare(DataConfig(path=str(p)), tok)


def test_untrainable_is_refused_or_dropped(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    rows = [{"instruction": "word " * 100, "output": "x"}, {"instruction": "short", "output": "ok"}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    # kept out of training either way; refusing the run is the preflight's job (test_preflight.py)
    train, _, stats, _ = prepare(DataConfig(path=str(p), max_seq_length=64, shuffle=False), tok)
    assert len(train) == 1 and stats.response_cut_away == 1 and stats.untrainable[0].startswith(f"{p}:1 ")
    assert not stats.dropped
    train, _, stats, _ = prepare(DataConfig(path=str(p), max_seq_length=64, drop_untrainable=True), tok)
    assert len(train) == 1 and stats.response_cut_away == 1 and sum(stats.dropped.values()) == 1
    p.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1 \(prompt \d+ tokens\): .* so no response token is trained"):
        prepare(DataConfig(path=str(p), max_seq_length=64), tok)


def test_chat_format_uses_chat_template(tmp_path, tok):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]}) + "\n")
    train, _, _, _ = prepare(DataConfig(path=str(p), format="chat", template="chat_template"), tok)
    ex = train[0]
    assert tok.decode(ex.input_ids[: ex.prompt_len]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode([x for x in ex.labels if x != -100]) == "hello<|im_end|>"


def test_saved_datasets_folder_and_parquet(tmp_path, tok):
    import datasets

    rows = {"instruction": ["Add 1 and 2.", "Add 3 and 4."], "input": ["", ""], "output": ["3", "7"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "d.parquet"))
    for path in (tmp_path / "saved", tmp_path / "d.parquet"):
        train, _, stats, _ = prepare(DataConfig(path=str(path), shuffle=False), tok)
        assert stats.rows_read == 2 and tok.decode([x for x in train[1].labels if x != -100]) == "7<|im_end|>"


def test_num_proc_gives_the_same_tokens(alpaca_file, tok):
    one, _, _, _ = prepare(DataConfig(path=str(alpaca_file)), tok)
    two, _, _, _ = prepare(DataConfig(path=str(alpaca_file), num_proc=2), tok)
    assert [e.input_ids for e in one] == [e.input_ids for e in two]
    assert [e.labels for e in one] == [e.labels for e in two]
