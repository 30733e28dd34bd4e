"""The GPU path of packed attention (torch's FlashAttention varlen kernel) is CUDA-only; this checks tunelab's
glue around it (layout, GQA, causal flag, cu_seqlens) on CPU against the per-example SDPA loop, with a stand-in
kernel of the same signature. The kernel itself was checked on an H200: bench/gpu_varlen_check.py."""

import torch
import torch.nn.functional as F

from tunelab.data import packing


def _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    assert window_size == (-1, 0) and cu_q.dtype == torch.int32 and q.shape[1] == k.shape[1]
    outs = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        outs.append(F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                   v[s:e].transpose(0, 1), is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs)


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def test_flash_varlen_glue_matches_per_example_sdpa(monkeypatch):
    torch.manual_seed(0)
    lens = [5, 17, 1, 9]
    T = sum(lens)
    q, k, v = torch.randn(1, 4, T, 8), torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    cu = torch.tensor([0, 5, 22, 23, 32])
    ref, _ = packing.varlen_sdpa(_Attn(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=17)
    monkeypatch.setattr(packing, "_flash_varlen", lambda: _reference_varlen_attn)
    out = packing._flash_varlen_forward(q, k, v, cu, 17, 0.3)
    assert out.shape == ref.shape == (1, T, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
