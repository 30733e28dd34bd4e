"""Every private (underscore) symbol of transformers/peft/torch that tunelab still relies on, checked
against the installed versions, so that an upgrade that drops one fails here and not at a user's.

A scan of tunelab/ keeps the list honest: a new `._name` access, `getattr(x, "_name")` or
`import _name` that is not listed below (with the reason it is needed) fails the first test.
"""

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "tunelab"

# name -> (where it lives, why tunelab needs it, a check that it still exists)
PRIVATE = {
    "_attn_implementation": (
        "transformers PretrainedConfig", "data/packing.py switches attention to the packed kernel for one step "
        "and back (set_attn_implementation reloads kernels; the config attribute is what the layers read)",
        lambda: _config_has("_attn_implementation")),
    "_name_or_path": (
        "transformers PretrainedConfig", "export.py names the GGUF after the model it came from",
        lambda: _config_has("_name_or_path")),
    "_is_mkldnn_bf16_supported": (
        "torch.ops.mkldnn", "precision.py torch_native: will torch run bf16 natively here (no public API says so)",
        lambda: _mkldnn_has("_is_mkldnn_bf16_supported")),
    "_is_mkldnn_fp16_supported": (
        "torch.ops.mkldnn", "precision.py torch_native: will torch run fp16 natively here (no public API says so)",
        lambda: _mkldnn_has("_is_mkldnn_fp16_supported")),
    "_version": (
        "torch.Tensor", "fastlora.py serves a kept sibling output only for the very input it was computed from: the "
        "tensor's in-place version counter tells an input changed in place since (no public API reads it)",
        lambda: isinstance(__import__("torch").zeros(1)._version, int)),
}
# tunelab's own underscore attributes on its own objects
OWN = {"_fingerprint"}

# internal (non-underscore) module paths and the public override points TunelabTrainer and the
# callbacks rely on, with the arguments they pass
INTERNAL = [
    ("transformers.integrations.sdpa_attention", "sdpa_attention_forward"),
    ("transformers.trainer_callback", "PrinterCallback"),
    ("transformers.trainer_callback", "ProgressCallback"),
]
SIGNATURES = [
    ("transformers", "Trainer", "training_step", {"model", "inputs", "num_items_in_batch"}),
    ("transformers", "Trainer", "compute_loss", {"model", "inputs", "return_outputs", "num_items_in_batch"}),
    ("transformers", "Trainer", "log", {"logs", "start_time"}),
    ("transformers", "TrainerCallback", "on_pre_optimizer_step", {"args", "state", "control"}),
    ("transformers", "TrainerCallback", "on_save", {"args", "state", "control"}),
    ("accelerate", "Accelerator", "no_sync", {"model"}),
    ("transformers", "Trainer", "create_accelerator_and_postprocess", {"self"}),  # tunelab/distributed.py
]


def _config_has(name):
    from transformers import LlamaConfig

    return hasattr(LlamaConfig(), name)


def _mkldnn_has(name):
    import torch

    return hasattr(torch.ops.mkldnn, name)


_PATTERNS = [
    re.compile(r"(?<![\w.])(?!self\.)\w+(?:\.\w+)*\.(_[a-z]\w*)"),  # x._name (not self._name)
    re.compile(r"\b(?:get|has|set)attr\(\s*[\w.]+,\s*[\"'](_[a-z]\w*)[\"']"),  # getattr(x, "_name")
    re.compile(r"^\s*from\s+[\w.]+\s+import\s+.*?\b(_[a-z]\w*)", re.M),  # from x import _name
]


def private_uses() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in sorted(SRC.rglob("*.py")):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pat in _PATTERNS:
                for m in pat.finditer(code):
                    if m.group(0).startswith("self."):
                        continue
                    found.setdefault(m.group(1), []).append(f"{f.relative_to(SRC.parent)}:{i}")
    return found


def test_every_private_symbol_in_use_is_listed():
    unlisted = {k: v for k, v in private_uses().items() if k not in PRIVATE and k not in OWN}
    assert not unlisted, (f"tunelab uses private symbols not listed in tests/test_private_api.py: {unlisted}; "
                          f"use a public API, or list the symbol with why")


def test_listed_private_symbols_are_still_used():
    stale = set(PRIVATE) - set(private_uses())
    assert not stale, f"listed but no longer used (remove from PRIVATE): {stale}"


@pytest.mark.parametrize("name", sorted(PRIVATE))
def test_private_symbol_exists_in_installed_version(name):
    where, why, check = PRIVATE[name]
    assert check(), f"{where} no longer has {name} (tunelab needs it: {why})"


@pytest.mark.parametrize("module,name", INTERNAL)
def test_internal_path_exists(module, name):
    import importlib

    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone"


@pytest.mark.parametrize("module,cls,method,params", SIGNATURES)
def test_override_points_keep_their_arguments(module, cls, method, params):
    import importlib
    import inspect

    fn = getattr(getattr(importlib.import_module(module), cls), method)
    assert params <= set(inspect.signature(fn).parameters), f"{cls}.{method} changed its arguments"


def test_scanner_sees_private_uses(tmp_path, monkeypatch):
    """The scan itself can fail: it finds each form of private access."""
    (tmp_path / "tunelab").mkdir()
    (tmp_path / "tunelab" / "m.py").write_text(
        "from transformers.x import _hidden\nmodel.config._secret = 1\ngetattr(cfg, \"_other\", None)\n"
        "self._mine = 2  # own\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "tunelab")
    assert set(private_uses()) == {"_hidden", "_secret", "_other"}


def test_no_test_runner_checks_in_production_code():
    hits = [f"{f.name}:{i}" for f in SRC.rglob("*.py")
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if "pytest" in line]
    assert not hits, f"production code looks at the test runner: {hits}"
