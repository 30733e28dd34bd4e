"""Third-party output a user can't act on, kept off the terminal (tunelab says what happens in its own words)."""

from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def gguf_progress_off():
    """transformers' GGUF loader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors...")
    that transformers.utils.logging.disable_progress_bar() does not reach; tunelab already prints one line
    for a conversion. The loader module is private, and patching its `tqdm` name is the only switch it has
    (TQDM_DISABLE would also hide the bars of real downloads)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support: nothing to quiet
        yield
        return
    saved = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = saved
