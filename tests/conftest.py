import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_tiny_model, write_alpaca  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def cpu_flags_decide(monkeypatch):
    """Tests that mock the CPU's flags mean them: torch's own check of this host (precision.torch_native, which
    vetoes native bf16 where oneDNN won't run it) would turn a mocked native CPU into an emulating one on an
    AVX2-only host. The tests of that veto set torch_native themselves."""
    from tunelab import precision

    monkeypatch.setattr(precision, "torch_native", lambda dtype: None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder with a 2-layer random Llama (hidden 64) and a 400-token BPE tokenizer (pad == eos)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_alpaca(tmp_path / "data.jsonl")


@pytest.fixture
def tiny_config(tmp_path, tiny_model, alpaca_file):
    """A run YAML for the tiny model; returns its path. Tests add --set overrides."""
    p = tmp_path / "run.yaml"
    p.write_text(f"""
model:
  name: {tiny_model}
  dtype: float32  # exact-arithmetic comparisons hold on every CPU; model.dtype=auto: tests/test_precision.py
data:
  path: {alpaca_file}
  test_size: 0.1
  max_seq_length: 128
train:
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 4
  gradient_accumulation_steps: 1
  warmup_steps: 1
  max_steps: 4
  eval_steps: 2
  save_steps: 2
  learning_rate: 1.0e-3
""")
    return p
