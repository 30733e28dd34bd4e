"""GPU check: torch's varlen flash path == per-example SDPA (outputs and grads), bf16, GQA."""
import sys, torch
sys.path.insert(0, ".")
from tunelab.data import packing
torch.manual_seed(0)
lens = [300, 1024, 77, 2048, 647]
T = sum(lens); H, KV, D = 32, 8, 128
cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
class M: pass
m = M(); m.is_causal = True; m.num_key_value_groups = H // KV; m.training = True
def make():
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return q, k, v
q, k, v = make()
print("flash varlen available:", packing._flash_varlen() is not None)
out_f = packing._flash_varlen_forward(q, k, v, cu, max(lens), D ** -0.5)
g = torch.randn_like(out_f)
(out_f * g).sum().backward()
gf = [t.grad.clone() for t in (q, k, v)]
for t in (q, k, v): t.grad = None
real = packing._flash_varlen
packing._flash_varlen = lambda: None
out_s, _ = packing.varlen_sdpa(m, q, k, v, None, scaling=D ** -0.5, cu_seq_lens_q=cu, max_length_q=max(lens))
(out_s * g).sum().backward()
gs = [t.grad.clone() for t in (q, k, v)]
print("out max abs diff", (out_f.float() - out_s.float()).abs().max().item(), "shape", tuple(out_f.shape), tuple(out_s.shape))
for n, a, b in zip("qkv", gf, gs):
    print(f"grad {n} max abs diff", (a.float() - b.float()).abs().max().item(), "ref scale", b.float().abs().max().item())
import time
for name, fn in (("flash", real), ("sdpa-loop", lambda: None)):
    packing._flash_varlen = fn
    for i in range(13):
        if i == 3: torch.cuda.synchronize(); t0 = time.perf_counter()
        o, _ = packing.varlen_sdpa(m, q, k, v, None, scaling=D ** -0.5, cu_seq_lens_q=cu, max_length_q=max(lens))
        (o * g).sum().backward()
    torch.cuda.synchronize(); print(name, "fwd+bwd ms", round((time.perf_counter() - t0) / 10 * 1000, 2))
