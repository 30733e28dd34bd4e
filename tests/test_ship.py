"""Issue 17: the training template travels with the export (HF chat template, GGUF metadata, Ollama Modelfile)."""

import re

import pytest
from transformers import AutoTokenizer

from tunelab.data.templates import Example, TemplateError, conversation, render_prompt
from tunelab.export import ollama_modelfile, save_tokenizer_with_template
from tunelab.shiptemplate import go_template, jinja_template

EXAMPLES = [Example(instruction="Add 12 and 30."), Example(instruction="Add the two numbers.", input="4 5"),
            Example(messages=[{"role": "user", "content": "What is {{ 2 }}?"}])]


def hf_messages(template: str, ex: Example) -> list[dict]:
    """The conversation a client sends: alpaca/plain rows keep their `input` as a key of the user message."""
    if template == "chat_template" or ex.messages is not None:
        return conversation(ex)
    return [{"role": "user", "content": ex.instruction, "input": ex.input}]


@pytest.mark.parametrize("template,system", [("alpaca", None), ("plain", None), ("chat_template", None),
                                             ("chat_template", "You are a careful calculator.")])
def test_exported_tokenizer_renders_what_training_rendered(tiny_model, tmp_path, template, system):
    from tunelab.models import load_tokenizer

    tok, _ = load_tokenizer(tiny_model)
    save_tokenizer_with_template(tok, tmp_path, jinja_template(template, tok, system))
    assert tok.chat_template and "im_start" in tok.chat_template  # the in-memory tokenizer keeps its own
    exported = AutoTokenizer.from_pretrained(str(tmp_path))
    for ex in EXAMPLES:
        want = render_prompt(template, ex, tok, system)
        got = exported.apply_chat_template(hf_messages(template, ex), tokenize=False, add_generation_prompt=True)
        assert got == want, (template, ex)
    if template != "chat_template":
        # the whole training sequence (prompt + reply + EOS) renders too, and what render_prompt refuses is refused
        ex = EXAMPLES[0]
        full = exported.apply_chat_template(hf_messages(template, ex) + [{"role": "assistant", "content": "42."}],
                                            tokenize=False)
        assert full == render_prompt(template, ex, tok) + "42." + tok.eos_token
        for bad in ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}]):
            with pytest.raises(Exception, match="system message|one instruction"):
                exported.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)
    else:  # a request's own system message wins over the run's, as in render_prompt
        msgs = [{"role": "system", "content": "Be long."}, {"role": "user", "content": "hi"}]
        got = exported.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert got == render_prompt(template, Example(messages=msgs), tok, system)


def go_render(tpl: str, system: str, prompt: str) -> str:
    """The subset of Go's text/template our Modelfile TEMPLATEs use: {{ .System }}, {{ .Prompt }},
    {{ if .System }}...{{ else }}...{{ end }} and quoted literals {{ "..." }} (no nesting needed)."""
    def cond(m):
        return m.group(1) if system else (m.group(2) or "")

    tpl = re.sub(r"\{\{ if \.System \}\}(.*?)(?:\{\{ else \}\}(.*?))?\{\{ end \}\}", cond, tpl, flags=re.S)
    assert "{{ if" not in tpl
    parts = re.split(r"(\{\{.*?\}\})", tpl, flags=re.S)
    out = []
    for p in parts:
        if p == "{{ .System }}":
            out.append(system)
        elif p == "{{ .Prompt }}":
            out.append(prompt)
        elif p.startswith('{{ "'):
            out.append(p[4:-4])
        else:
            assert not p.startswith("{{"), p
            out.append(p)
    return "".join(out)


@pytest.mark.parametrize("template,system", [("alpaca", None), ("plain", None), ("chat_template", None),
                                             ("chat_template", "Be brief.")])
def test_ollama_template_fills_to_render_prompt(tiny_model, template, system):
    from transformers import GenerationConfig

    from tunelab.models import load_tokenizer

    tok, _ = load_tokenizer(tiny_model)
    go, sys_line = go_template(template, tok, system)
    assert sys_line == (system if template == "chat_template" else None)
    for prompt in ("Add 12 and 30.", "Use {{ braces }} and\nlines"):
        ex = Example(instruction=prompt)
        assert go_render(go, sys_line or "", prompt) == render_prompt(template, ex, tok, system)
    if template == "chat_template":  # a request's own system message
        msgs = [{"role": "system", "content": "Other."}, {"role": "user", "content": "hi"}]
        assert go_render(go, "Other.", "hi") == render_prompt(template, Example(messages=msgs), tok)
    mf = ollama_modelfile("model-f16.gguf", template, tok, system, GenerationConfig(eos_token_id=tok.eos_token_id))
    assert mf.startswith("FROM ./model-f16.gguf\n") and f'TEMPLATE """{go}"""' in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf and "PARAMETER temperature 0" in mf
    assert ('SYSTEM """Be brief."""' in mf) == bool(system)


def test_a_chat_run_without_a_chat_template_is_refused(tiny_model):
    from types import SimpleNamespace

    with pytest.raises(TemplateError, match="no \\(single\\) chat template"):
        jinja_template("chat_template", SimpleNamespace(chat_template=None))


# ---- issue 17.7: adapters only load on the base they were trained on ---------------------------


def test_adapter_records_its_base_and_a_same_shape_other_architecture_is_refused(tmp_path, tiny_config, tiny_model,
                                                                                 capsys, monkeypatch):
    import json
    import shutil

    from tunelab.cli import main

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--output", str(run), "--set", "train.max_steps=2",
                 "--set", "train.save_steps=2", "--set", "train.eval_steps=2"]) == 0
    for folder in (run / "final", run / "checkpoint-2"):
        rec = json.loads((folder / "tunelab_base.json").read_text())
        assert rec["fingerprint"]["architectures"] == ["LlamaForCausalLM"] and rec["fingerprint"]["hidden_size"] == 64
        assert rec["fingerprint"]["num_hidden_layers"] == 2 and rec["fingerprint"]["vocab_size"] > 0
    # the same shapes under another architecture (a Llama adapter on a Mistral base, in small)
    other = tmp_path / "mistral"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["generate", str(other), "--adapter", str(run / "final"), "-p", "hi", "--no-cache"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trained on a different base" in err and "LlamaForCausalLM" in err and "MistralForCausalLM" in err
    assert "differs in architectures, model_type" in err
    # an adapter saved before fingerprints existed: today's shape check (same hidden size: accepted)
    (run / "final" / "tunelab_base.json").unlink()
    assert main(["generate", str(other), "--adapter", str(run / "final"), "-p", "hi", "--no-cache",
                 "--max-new-tokens", "2"]) == 0
    # and its own base is accepted with the fingerprint
    assert main(["generate", str(tiny_model), "--adapter", str(run / "checkpoint-2"), "-p", "hi", "--no-cache",
                 "--max-new-tokens", "2"]) == 0


# ---- issue 17.3: GGUF pre-tokenizer names; unsupported architectures refused -------------------------


def _tokenizer_json(pre) -> dict:
    import json

    from tokenizers import Tokenizer, models

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre
    return json.loads(tk.to_str())


def test_gguf_pre_tokenizer_names_follow_the_vocabulary(tiny_model):
    from tokenizers import Regex, pre_tokenizers

    from tunelab.export import ExportError, LLAMA3_SPLIT, gguf_pre_tokenizer
    from tunelab.models import load_tokenizer

    llama3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert gguf_pre_tokenizer(_tokenizer_json(llama3)) == "llama-bpe"
    assert gguf_pre_tokenizer(_tokenizer_json(smollm)) == "smollm"
    import json

    tok, _ = load_tokenizer(tiny_model)
    assert gguf_pre_tokenizer(json.loads(tok.backend_tokenizer.to_str())) == "gpt-2"
    with pytest.raises(ExportError, match="Metaspace"):
        gguf_pre_tokenizer(_tokenizer_json(pre_tokenizers.Metaspace()))
    # transformers' GGUF reader splits a llama-bpe vocabulary with Llama-3's regex: the same text as ours
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"] == LLAMA3_SPLIT


def test_gguf_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    from types import SimpleNamespace

    from tunelab.export import ExportError, write_gguf

    model = SimpleNamespace(config=SimpleNamespace(model_type="qwen2", architectures=["Qwen2ForCausalLM"]))
    with pytest.raises(ExportError, match=r"this one is 'qwen2' \(Qwen2ForCausalLM\)") as e:
        write_gguf(model, None, tmp_path / "x.gguf", "f16")
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()
