"""`tunelab export RUN[/checkpoint-N] --to DIR [--gguf f16|q8_0]`

Merges the LoRA adapter into its base and saves safetensors + tokenizer + generation config. A
QLoRA run is merged into its base de-quantised from the same 4-bit weights it was trained on,
in 16 bit (merging into the original full-precision weights instead is the "quality drops after
merge" complaint). After saving, the export is reloaded and its greedy generations must equal the
adapter model's on a few prompts (rendered with the run's template and system prompt, as
`tunelab generate` renders them), or the export is removed and the command fails.

`--gguf` also writes a GGUF file with the gguf package's GGUFWriter (that package ships no HF
converter): Llama-architecture tensors named by gguf's own TensorNameMap, q/k rows permuted as
llama.cpp expects, a GPT-2-style BPE vocabulary, f16 or q8_0. It is checked by loading it back
with transformers' GGUF loader, and, when llama-cpp-python is installed, run in llama.cpp itself
(tunelab/llamacpp.py: its tokenizer, kernels and greedy decoding in the parity table).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import llamacpp
from .config import ConfigError
from .data.templates import TemplateError
from .fsutil import atomic_dir
from .models import find_run
from .parity import (
    THRESHOLDS,
    compare,
    measure,
    model_exact_match,
    probe_set,
    report,
    serve_step,
    table,
    task_probes,
)
from .shiptemplate import jinja_template, modelfile
from .ui import console

VERIFY_PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.", "Add 12 and 30."]


class ExportError(ConfigError):
    pass


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge a run's adapter into its base and save safetensors (and GGUF)")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--to", required=True, help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--gguf", choices=["f16", "q8_0"], help="also write a GGUF file of this type")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="saved dtype (auto: 16-bit for a QLoRA run, else the compute dtype)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --to")
    p.add_argument("--verify-tokens", type=int, default=16, help="greedy tokens compared per verify prompt")
    p.add_argument("--probe-rows", type=int, default=32, help="held-out rows in the parity report (parity.json)")
    p.add_argument("--verify-only", action="store_true",
                   help="write nothing but parity.json: compare the existing export in --to with the run's adapter")
    p.add_argument("--task", action="append", default=[], metavar="FILE",
                   help="a generation task (as `tunelab eval --tasks`) whose exact match every step must keep "
                        "(repeatable; the run's eval.tasks are used too); its first --probe-rows items")
    p.add_argument("--no-serve", action="store_true", help="leave `tunelab serve` of the export out of the report")


def _load_merged(run_path: Path, dtype_name: str):
    """(adapter model for reference, merged model, tokenizer, note)."""
    from peft import PeftModel

    from .config import RunConfig
    from .models import ModelError, check_adapter_base, find_run, load_model, load_tokenizer, resolve_model
    from .rundir import run_config

    run, weights = find_run(run_path)
    if weights is None:
        raise ExportError(f"{run_path}: not a tunelab run folder or checkpoint")
    if not (weights / "adapter_config.json").is_file():
        raise ExportError(f"{weights} holds full weights (a full fine-tune), not an adapter: use it as is")
    cfg = run_config(run) if run else RunConfig()  # no run folder: the config defaults
    base_spec = (cfg.model.name if run else None) or json.loads((weights / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    try:
        base = resolve_model(base_spec)
    except ModelError as e:
        raise ExportError(f"the adapter in {weights} needs its base model '{base_spec}', "
                          f"which is not available: {e}") from None
    check_adapter_base(weights, base)
    tok, _ = load_tokenizer(weights if (weights / "tokenizer_config.json").is_file() else base,
                            cfg.model.pad_token)
    q = cfg.quantization
    qlora = q.load_in_4bit
    if dtype_name == "auto":
        dtype = torch.bfloat16 if qlora else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    if qlora:
        kw = dict(load_in_4bit=True, quant_type=q.quant_type, double_quant=q.double_quant,
                  compute_dtype=torch.float32)
        ref_base = load_model(base, tok, dtype=torch.float32, device="cpu", **kw)
        merged_base = load_model(base, tok, dtype=torch.float32, device="cpu", **kw)
        merged_base = merged_base.dequantize()  # the same 4-bit weights training saw, de-quantised
        merged_base.to(dtype)
        note = (f"QLoRA run: merged into the base de-quantised from its 4-bit {kw['quant_type']} weights, "
                f"saved in {str(dtype).replace('torch.', '')}")
    else:
        ref_base = load_model(base, tok, dtype=torch.float32, device="cpu")
        merged_base = load_model(base, tok, dtype=dtype, device="cpu")
        note = f"LoRA run: merged into {base_spec}, saved in {str(dtype).replace('torch.', '')}"
    ref = PeftModel.from_pretrained(ref_base, str(weights)).eval()
    merged = PeftModel.from_pretrained(merged_base, str(weights)).merge_and_unload().eval()
    merged.generation_config.pad_token_id = tok.pad_token_id
    merged.generation_config.eos_token_id = tok.eos_token_id
    template = cfg.data.template
    return ref, merged, tok, note, template, cfg


def verify_prompt_ids(tok, template: str, system_prompt: str | None, prompts=VERIFY_PROMPTS) -> list[list[int]]:
    """The ids the verification prompts are sent as: the run's template and system prompt, through
    the same path as `tunelab generate` (generate.prompt_ids)."""
    from types import SimpleNamespace

    from .generate import prompt_ids

    run = SimpleNamespace(tokenizer=tok, template=template, system_prompt=system_prompt)
    return [prompt_ids(run, p) for p in prompts]


@torch.inference_mode()
def greedy(model, tok, template: str, n_tokens: int, system_prompt: str | None = None) -> list[list[int]]:
    outs = []
    for x in verify_prompt_ids(tok, template, system_prompt):
        ids = torch.tensor([x])
        out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
        outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def save_tokenizer_with_template(tok, folder: Path, chat_template: str) -> None:
    """Save the tokenizer with the run's training template as its chat template (apply_chat_template
    on the export then renders what training rendered); `tok` itself keeps its own template."""
    own = tok.chat_template
    tok.chat_template = chat_template
    try:
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = own


def stop_strings(tok, gen_config) -> list[str]:
    """The texts of the tokens generation stops at: the EOS training appended, and any other
    end-of-sequence id the generation config lists."""
    ids = gen_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return list(dict.fromkeys([tok.eos_token] + [tok.convert_ids_to_tokens(i) for i in ids]))


def ollama_modelfile(gguf_name: str, template: str, tok, system_prompt: str | None, gen_config) -> str:
    """The Modelfile beside the GGUF: the training template in Go-template syntax, a stop for every
    stop token, and the export's generation defaults (greedy unless its generation config samples)."""
    params = {"temperature": 0}
    if getattr(gen_config, "do_sample", False):
        params = {k: getattr(gen_config, k) for k in ("temperature", "top_p", "top_k")
                  if getattr(gen_config, k, None) is not None}
    if getattr(gen_config, "repetition_penalty", None) not in (None, 1.0):
        params["repeat_penalty"] = gen_config.repetition_penalty
    return modelfile(gguf_name, template, tok, system_prompt, stop_strings(tok, gen_config), params)


def cmd_export(args) -> int:
    from transformers import AutoModelForCausalLM

    out = Path(args.to)
    if args.probe_rows <= 0 or args.verify_tokens <= 0:
        raise ExportError("--probe-rows and --verify-tokens must be > 0")
    if args.verify_only:
        return verify_only(args, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ExportError(f"--to {out} exists and is not empty; choose another folder or pass --force")
    ref, merged, tok, note, template, cfg = _load_merged(Path(args.run), args.dtype)
    console.print(note)
    system_prompt = cfg.data.system_prompt
    try:
        chat_template = jinja_template(template, tok, system_prompt)
    except TemplateError as e:
        raise ExportError(f"the run's template can't be exported: {e}") from None
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer_with_template(tok, tmp, chat_template)
        merged.generation_config.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=merged.dtype).eval()
        want = greedy(ref, tok, template, args.verify_tokens, system_prompt)
        got = greedy(reloaded, tok, template, args.verify_tokens, system_prompt)
        same = sum(a == b for a, b in zip(want, got))
        if same != len(want):
            raise ExportError(f"verification failed: the exported model's greedy output differs from the adapter "
                              f"model's on {len(want) - same} of {len(want)} prompts; nothing was written")
        console.print(f"verified: greedy outputs of the export equal the adapter model's on {same}/{len(want)} prompts")
        probes, source = probe_set(find_run(Path(args.run))[0], cfg, tok, args.probe_rows)
        tps, notes = task_probes(cfg.eval.tasks, args.task, args.probe_rows)
        ref_m = measure(ref, tok, probes, args.verify_tokens)
        ref_em = model_exact_match(ref, tok, template, system_prompt, tps)

        def em(model):
            return model_exact_match(model, tok, template, system_prompt, tps)

        results = [compare(merged_step(reloaded), ref_m, measure(reloaded, tok, probes, args.verify_tokens),
                           ref_em, em(reloaded))]
        if not results[0].passed:
            console.print(table(results, source, ref_em, notes), markup=False)
            raise ExportError("parity check failed: the merged model differs from the adapter model beyond the "
                              "bounds above; nothing was written")
        gguf_failed, cpp_notes = None, []
        if args.gguf:
            gguf_path = tmp / f"model-{args.gguf}.gguf"
            write_gguf(merged, tok, gguf_path, args.gguf, chat_template=chat_template)
            agree = check_gguf(reloaded, tok, gguf_path, template, system_prompt)
            console.print(f"GGUF {gguf_path.name}: loads back in transformers; next-token argmax agrees with the "
                          f"safetensors export on {100 * agree:.1f}% of positions")
            if agree < (0.95 if args.gguf == "f16" else 0.85):
                raise ExportError(f"GGUF check failed: only {100 * agree:.1f}% next-token agreement; "
                                  f"nothing was written")
            g = load_gguf(gguf_path)
            gguf_steps = [compare(f"gguf {args.gguf}", ref_m, measure(g, tok, probes, args.verify_tokens),
                                  ref_em, em(g))]
            del g
            more, cpp_note = llamacpp.steps(gguf_path, args.gguf, ref_m, probes, args.verify_tokens, tok)
            gguf_steps += more
            cpp_notes.append(cpp_note)
            results += gguf_steps
            if not all(r.passed for r in gguf_steps):  # its own output goes; the verified safetensors export stays
                gguf_path.unlink()
                gguf_failed = gguf_path.name
        serve_failed = False
        if not args.no_serve:  # `tunelab serve` of the export, as a user would run it (it has no output to remove)
            results.append(serve_step(tmp, tok, probes, ref_m[1], args.verify_tokens, template, system_prompt,
                                      tps, ref_em))
            serve_failed = not results[-1].passed
        if args.gguf and not gguf_failed:
            try:
                (tmp / "Modelfile").write_text(ollama_modelfile(gguf_path.name, template, tok, system_prompt,
                                                                merged.generation_config))
                console.print(f"Ollama: ollama create NAME -f {out}/Modelfile (template {template}, stop "
                              f"{stop_strings(tok, merged.generation_config)})")
            except TemplateError as e:  # the GGUF still carries the Jinja template; only Ollama's copy is missing
                console.print(f"[yellow]no Ollama Modelfile: {e}[/yellow]")
        console.print(table(results, source, ref_em, notes), markup=False)
        for line in cpp_notes:
            console.print(line, markup=False)
        (tmp / "parity.json").write_text(json.dumps({**report(results, source, args.verify_tokens, ref_em, tps, notes),
                                                     "llama_cpp": cpp_notes}, indent=2))
        (tmp / "tunelab_export.json").write_text(json.dumps(
            {"source": str(args.run), "note": note, "template": template, "gguf": args.gguf,
             "verified_prompts": len(want), "system_prompt": system_prompt,
             "eos_token_id": merged.generation_config.eos_token_id}, indent=2))
    if gguf_failed:
        raise ExportError(f"parity check failed for {gguf_failed} (table above): it was removed; the safetensors "
                          f"export in {out} passed and is kept")
    if serve_failed:
        raise ExportError(f"parity check failed for `tunelab serve` of the export (table above): the server's "
                          f"answers differ from the adapter model's; the export in {out} is kept")
    console.print(f"exported to {out}")
    return 0


def merged_step(model) -> str:
    return "merged (float32)" if model.dtype == torch.float32 else "merged (16-bit)"


def verify_only(args, out: Path) -> int:
    """`export --verify-only`: the parity report of an existing export (its safetensors and every GGUF in it)."""
    from transformers import AutoModelForCausalLM

    from .fsutil import atomic_write_text
    from .models import find_run

    if not (out / "config.json").is_file():
        raise ExportError(f"--verify-only: {out} is not an export folder (no config.json)")
    ref, _, tok, _, template, cfg = _load_merged(Path(args.run), "float32")
    system_prompt = cfg.data.system_prompt
    probes, source = probe_set(find_run(Path(args.run))[0], cfg, tok, args.probe_rows)
    tps, notes = task_probes(cfg.eval.tasks, args.task, args.probe_rows)
    ref_m = measure(ref, tok, probes, args.verify_tokens)
    ref_em = model_exact_match(ref, tok, template, system_prompt, tps)

    def em(model):
        return model_exact_match(model, tok, template, system_prompt, tps)

    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").eval()
    results = [compare(merged_step(exported), ref_m, measure(exported, tok, probes, args.verify_tokens),
                       ref_em, em(exported))]
    cpp_notes = []
    for g in sorted(out.glob("model-*.gguf")):
        kind = g.stem.split("-", 1)[1]
        if f"gguf {kind}" in THRESHOLDS:
            m = load_gguf(g)
            results.append(compare(f"gguf {kind}", ref_m, measure(m, tok, probes, args.verify_tokens), ref_em, em(m)))
            del m
            more, cpp_note = llamacpp.steps(g, kind, ref_m, probes, args.verify_tokens, tok)
            results += more
            cpp_notes.append(cpp_note)
    if not args.no_serve:
        results.append(serve_step(out, tok, probes, ref_m[1], args.verify_tokens, template, system_prompt, tps,
                                  ref_em))
    console.print(table(results, source, ref_em, notes), markup=False)
    for line in cpp_notes:
        console.print(line, markup=False)
    parity = {**report(results, source, args.verify_tokens, ref_em, tps, notes), "llama_cpp": cpp_notes}
    atomic_write_text(out / "parity.json", json.dumps(parity, indent=2))
    failed = [r.step for r in results if not r.passed]
    if failed:
        raise ExportError(f"parity check failed for {', '.join(failed)} (table above; {out / 'parity.json'})")
    return 0


# ---------------------------------------------------------------------------------------------
# GGUF


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary embeddings (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Llama-3's split regex (its tokenizer.json; llama.cpp calls this pre-tokenizer "llama-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the way this vocabulary splits text before BPE (tokenizer.ggml.pre), read
    from the tokenizer's own pre-tokenizer, so llama.cpp splits text as transformers does. Families:
    Llama-3 (llama-bpe), SmolLM/SmolLM2 (smollm: single digits, then byte-level), GPT-2 style byte-level."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["Split", "ByteLevel"] and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise ExportError(f"--gguf: this tokenizer's pre-tokenizer ({' + '.join(map(str, types)) or 'none'}) has no "
                      f"llama.cpp name tunelab knows (supported: Llama-3, SmolLM2, GPT-2 style byte-level BPE)")


def write_gguf(model, tok, path: Path, kind: str, chat_template: str | None = None) -> None:
    import gguf

    cfg = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise ExportError(f"--gguf supports Llama-architecture models (llama, mistral); this one is "
                          f"'{cfg.model_type}' ({', '.join(getattr(cfg, 'architectures', None) or [])})")
    tok_json = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    if tok_json.get("model", {}).get("type") != "BPE":
        raise ExportError("--gguf supports BPE (GPT-2 style) tokenizers only")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(getattr(cfg, "_name_or_path", "") or "tunelab export")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    w.add_vocab_size(vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    # vocabulary
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(gguf_pre_tokenizer(tok_json))
    specials = set(tok.all_special_ids)
    added = {t.content for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = tok.convert_ids_to_tokens(i) if i < len(tok) else f"[PAD{i}]"
        tokens.append(t)
        types.append(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.USER_DEFINED if t in added
                     else gguf.TokenType.UNUSED if i >= len(tok) else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    if tok.unk_token_id is not None:
        w.add_unk_token_id(tok.unk_token_id)
    w.add_add_bos_token(False)
    chat_template = chat_template or getattr(tok, "chat_template", None)
    if chat_template:  # the run's training template (shiptemplate.jinja_template), as llama.cpp/Ollama read it
        w.add_chat_template(chat_template)
    # tensors
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"--gguf: no GGUF name for tensor {hf_name}")
        data = t.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        if data.ndim == 1:
            w.add_tensor(name, data.astype(np.float32))
        elif kind == "f16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_gguf(path: Path):
    """A written GGUF back in transformers (fp32), without transformers' own conversion bar."""
    from transformers import AutoModelForCausalLM

    from .quiet import gguf_progress_off

    with gguf_progress_off():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()


@torch.inference_mode()
def check_gguf(reference, tok, path: Path, template: str, system_prompt: str | None = None) -> float:
    """Load the GGUF back with transformers and compare next-token argmax with the reference model."""
    from transformers import AutoTokenizer

    from .data.templates import Example, render_prompt
    from .quiet import gguf_progress_off

    try:
        with gguf_progress_off():
            g = load_gguf(path)
            gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ExportError(f"the GGUF written to {path.name} does not load back in transformers "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    agree = total = 0
    for p, ids in zip(VERIFY_PROMPTS, verify_prompt_ids(tok, template, system_prompt)):
        text = render_prompt(template, Example(instruction=p), tok, system_prompt)
        if gtok(text, add_special_tokens=False)["input_ids"] != tok(text, add_special_tokens=False)["input_ids"]:
            raise ExportError("the GGUF's tokenizer splits text differently from the original tokenizer")
        x = torch.tensor([ids])
        a = reference(input_ids=x).logits[0].argmax(-1)
        b = g(input_ids=x).logits[0].argmax(-1)
        agree += int((a == b).sum())
        total += len(ids)
    return agree / total
