"""Fused LoRA layers for bf16-mixed training on a CPU: sibling projections in one matmul, LoRA's sum in fp32.

Why this exists (BENCHMARKS.md, issue 16): under bf16 autocast on a CPU, peft's LoRA layer spends more time
outside its matmuls than in them. For one SmolLM2 MLP at 3,691 tokens, 118 of 155 ms went to elementwise work
and dtype casts: autocast casts the same input to bf16 once per projection and once more for each adapter,
peft adds the adapter's bf16 output to the (upcast, precision.lora_sums_in_fp32) base output in a mixed-dtype
add that runs ~14x slower than an fp32 add, and every cast has its mirror in the backward pass; tensors of
[tokens, 1536] do not stay in cache, so each pass costs memory bandwidth. Neither peft nor torch fuses them on
CPU (torch.compile does, after minutes of compilation: the tunelab-compile bench arm).

`fuse_lora(model)` (train.build_model, for bf16-mixed LoRA on a CPU) gives each eligible peft `lora.Linear` a
forward that computes its whole group of siblings (q/k/v, gate/up: the projections a decoder layer applies to
the same input) as one autograd Function (`_LoraGroup`): one bf16 cast of the input, one bf16 matmul against
the concatenated frozen weights, the adapters' A and B products in fp32 added in place into each fp32 output
(addmm_), and a backward written out to match. The first sibling called with an input computes the group and
keeps the others' outputs for their own calls with the very same tensor (same object, same version); any
other call pattern computes a layer on its own. The frozen weights live in bf16 from then on (the base
layers' weights become views of the group's buffer; the fp32 copies are freed), so the fused path runs
whatever the autocast state. The arithmetic is autocast's for the base (bf16 matmul, fp32 sum) and fp32 for
the adapter (peft under autocast rounds it to bf16): tests/test_fastlora.py checks outputs and gradients
against peft's own layers in fp32 and under autocast. A LlamaMLP-shaped parent (gate/up/down fused, SiLU)
also gets `_SwiGLU`, which keeps its inputs for the backward pass in bf16 (18 -> 6 KiB per token and layer
for SmolLM2's MLP).

For anything but a vanilla single-adapter LoRA on a frozen nn.Linear (DoRA, dropout > 0, a LoRA bias,
fan_in_fan_out) fuse_lora leaves peft's layer alone; disabled or merged adapters and extra arguments
(adapter_names) run peft's forward, under bf16 autocast when the input is fp32 (the frozen weight is bf16).

This replaces the `forward` of peft layer instances and of the MLP (a private override: neither peft nor
transformers has a hook that changes how a layer computes); tests/test_fastlora.py goes red when peft's Linear
changes the attributes this module reads or its arithmetic, or LlamaMLP's forward stops being
down(silu(gate(x)) * up(x)).
"""

from __future__ import annotations

import torch
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


def _adapter(m: nn.Module) -> str | None:
    """The one active vanilla adapter of peft lora.Linear `m` in a state fuse_lora can compute; else None."""
    if m.disable_adapters or m.merged or len(m.active_adapters) != 1:
        return None
    name = m.active_adapters[0]
    if name not in m.lora_A or name in getattr(m, "lora_variant", {}) or getattr(m, "fan_in_fan_out", False):
        return None
    if not isinstance(m.lora_dropout[name], nn.Identity):
        return None
    a, b = m.lora_A[name], m.lora_B[name]
    if a.bias is not None or b.bias is not None or a.weight.dtype != torch.float32:
        return None
    if type(a.weight.data) is not torch.Tensor:  # a DTensor shard (FSDP): peft's forward
        return None
    base = m.get_base_layer()
    if type(base) is not nn.Linear or base.weight.requires_grad or base.weight.dtype not in (torch.float32,
                                                                                            torch.bfloat16):
        return None
    if base.bias is not None and base.bias.requires_grad:  # lora.bias=all/lora_only: the group's bias is a copy
        return None
    return name


def eligible(m: nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear

    return type(m) is Linear and _adapter(m) is not None


class _LoraGroup(torch.autograd.Function):
    """y_i = x W_i^T + s_i x A_i^T B_i^T for i = 1..n, with the W_i frozen (bf16, concatenated) and A_i, B_i
    trained (fp32). Forward: one bf16 matmul for all W_i, the adapters' products in fp32 added in place into
    each fp32 output. Backward: one bf16 matmul for the input's gradient of the frozen part, fp32 for LoRA.
    Each output is a tensor of its own (contiguous: a column slice would slow every elementwise op after it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta, *ab):
        outs, ranks, scalings = meta
        n = len(outs)
        a_list, b_list = ab[:n], ab[n:]
        shape = x.shape
        ctx.set_materialize_grads(False)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1])
            xb = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
            a = torch.cat(a_list) if n > 1 else a_list[0]  # [sum r, in], fp32
            xa = torch.mm(x2.float(), a.t())  # [N, sum r]: the adapters' input products, fp32
            y = torch.mm(xb, weight.t())  # [N, sum out]: the frozen products, bf16
            results = []
            o = r = 0
            for i in range(n):
                out = y[:, o:o + outs[i]].float()  # contiguous fp32
                if bias is not None:
                    out.add_(bias[o:o + outs[i]])
                out.addmm_(xa[:, r:r + ranks[i]], b_list[i].t(), alpha=scalings[i])
                results.append(out.view(*shape[:-1], outs[i]))
                o, r = o + outs[i], r + ranks[i]
        ctx.save_for_backward(xb, xa, weight, a, *b_list)
        ctx.meta, ctx.x_dtype, ctx.lead = meta, x.dtype, shape[:-1]
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        xb, xa, weight, a, *b_list = ctx.saved_tensors
        outs, ranks, scalings = ctx.meta
        n = len(outs)
        rows = xb.shape[0]
        with torch.autocast(xb.device.type, enabled=False):
            gb = torch.empty(rows, sum(outs), dtype=torch.bfloat16, device=xb.device)  # the grads, bf16, side by side
            gxa = torch.zeros(rows, sum(ranks), dtype=torch.float32, device=xb.device)
            grad_b = []
            o = r = 0
            for i in range(n):
                g = grads[i]
                if g is None:
                    gb[:, o:o + outs[i]].zero_()
                    grad_b.append(torch.zeros_like(b_list[i]))
                else:
                    g = g.reshape(rows, outs[i]).float()
                    gb[:, o:o + outs[i]].copy_(g)
                    grad_b.append(torch.mm(xa[:, r:r + ranks[i]].t(), g).t().mul_(scalings[i]))
                    gxa[:, r:r + ranks[i]].addmm_(g, b_list[i], alpha=scalings[i])
                o, r = o + outs[i], r + ranks[i]
            grad_a = torch.mm(gxa.t(), xb.float())  # [sum r, in]
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(gb, weight).float().addmm_(gxa, a)
                grad_x = grad_x.view(*ctx.lead, grad_x.shape[-1]).to(ctx.x_dtype)
        grad_a_list = grad_a.split(list(ranks)) if n > 1 else (grad_a,)
        return (grad_x, None, None, None, *grad_a_list, *grad_b)


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u in fp32, keeping g and u for the backward pass in bf16: 6 bytes a value less than autograd's
    own three fp32 tensors (g for silu, silu(g) and u for the product), the MLP's largest saved activations;
    the forward values are fp32 as before, only the gradient is computed from rounded inputs."""

    @staticmethod
    def forward(ctx, g, u):
        with torch.autocast(g.device.type, enabled=False):
            ctx.save_for_backward(g.to(torch.bfloat16), u.to(torch.bfloat16))
            return torch.nn.functional.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, grad):
        gb, ub = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = gb.float()
            grad_u = torch.nn.functional.silu(g).mul_(grad)
            grad_g = torch.ops.aten.silu_backward(ub.float().mul_(grad), g)
        return grad_g, grad_u


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, w * x / sqrt(mean(x^2) + eps), for fp32 x and w, with a hand-written backward.
    transformers' forward is six elementwise ops whose autograd backward is ~15 more, each a pass over
    [tokens, hidden] (29 ms forward + backward at 3,691 tokens x 576 here, twice per layer; torch's
    F.rms_norm decomposes the same way on CPU); this is 3 passes forward and 4 backward, and keeps x alone
    (not x and the normalised x)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow_(2).div_(d).add_(eps).rsqrt_()
            y = (x * rstd).mul_(weight)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        x, rstd, weight = ctx.saved_tensors
        with torch.autocast(g.device.type, enabled=False):
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (g * x).mul_(rstd).sum(dim=tuple(range(g.dim() - 1)))
            gw = g * weight
            # d/dx of w x r, r = (mean(x^2) + eps)^-1/2: r (g w) - r^3 x <g w, x> / d
            coef = torch.linalg.vecdot(gw, x, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
            grad_x = torch.addcmul(gw.mul_(rstd), x, coef)
        return grad_x, grad_w, None


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # w * x / rms(x), w not 1 + w


def _make_norm_forward(norm: nn.Module):
    plain = norm.forward

    def forward(x):
        if x.dtype != torch.float32 or norm.weight.dtype != torch.float32 or x.device.type != "cpu":
            return plain(x)
        return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)

    forward.tunelab_fused = "rms_norm"  # what fused_layers counts
    return forward


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation"
                                        and type(act).forward.__code__.co_names[-1:] == ("silu",))


def _make_mlp_forward(mlp: nn.Module):
    def forward(x):  # LlamaMLP's: down_proj(act_fn(gate_proj(x)) * up_proj(x)), with act_fn = silu
        return mlp.down_proj(_SwiGLU.apply(mlp.gate_proj(x), mlp.up_proj(x)))

    forward.tunelab_fused = "swiglu"  # what fused_layers counts
    return forward


class _Group:
    """Siblings that read the same input; computes them together (see the module docstring). At creation their
    frozen weights move into one bf16 buffer and each base layer's weight becomes a view of its rows (the fp32
    copies are freed: autocast would cast them to bf16 for every matmul anyway)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        bases = [m.get_base_layer() for m in members]
        self.outs = [b.out_features for b in bases]
        with torch.no_grad():
            self.weight = torch.cat([b.weight.detach() for b in bases]).to(torch.bfloat16).contiguous()
            self.bias = None
            if any(b.bias is not None for b in bases):
                self.bias = torch.cat([b.bias.detach().float() if b.bias is not None
                                       else torch.zeros(b.out_features) for b in bases])
            o = 0
            for b, n in zip(bases, self.outs):
                b.weight.data = self.weight[o:o + n]
                o += n
        self._key = None  # (input, its version) of the outputs kept for the siblings
        self._kept: list[torch.Tensor | None] = []

    def compute(self, members: list[nn.Module], names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = tuple(self.outs[self.members.index(m)] for m in members)
        ranks = tuple(m.lora_A[nm].weight.shape[0] for m, nm in zip(members, names))
        scal = tuple(float(m.scaling[nm]) for m, nm in zip(members, names))
        weight, bias = self.weight, self.bias
        if len(members) < len(self.members):  # one member on its own: its rows of the buffer
            i = self.members.index(members[0])
            o = sum(self.outs[:i])
            weight = weight[o:o + outs[0]]
            bias = None if bias is None else bias[o:o + outs[0]]
        ab = [m.lora_A[nm].weight for m, nm in zip(members, names)] + \
             [m.lora_B[nm].weight for m, nm in zip(members, names)]
        return _LoraGroup.apply(x, weight, bias, (outs, ranks, scal), *ab)

    def call(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output for x, or None where its adapter's state needs peft's own forward."""
        i = self.members.index(member)
        if self._key is not None and self._key[0] is x and self._key[1] == x._version and self._kept[i] is not None:
            out, self._kept[i] = self._kept[i], None
            if all(k is None for k in self._kept):
                self._key, self._kept = None, []
            return out
        names = [_adapter(m) for m in self.members]
        if names[i] is None:
            return None
        if len(self.members) == 1 or None in names:
            return self.compute([member], [names[i]], x)[0]
        parts = list(self.compute(self.members, names, x))
        out, parts[i] = parts[i], None
        self._key, self._kept = (x, x._version), parts
        return out


def _make_forward(m: nn.Module, group: _Group):
    peft_forward = m.forward  # the bound method of peft's class

    def forward(x, *args, **kwargs):
        # the fused path whatever the autocast state: it takes any input dtype and returns fp32; peft's own
        # forward for anything else (disabled or merged adapters, extra arguments)
        if not args and not kwargs and x.device.type == "cpu":
            out = group.call(m, x)
            if out is not None:
                return out
        if x.dtype != torch.bfloat16 and not torch.is_autocast_enabled(x.device.type):
            # the frozen weight is bf16 now: peft's path under bf16 autocast, as the run computes (DPO's
            # reference pass disables the adapter, outside autocast)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return peft_forward(x, *args, **kwargs).to(x.dtype)
        return peft_forward(x, *args, **kwargs)

    return forward


def fuse_lora(model: nn.Module) -> int:
    """Give every eligible peft LoRA layer of `model` the fused forward, grouped with its siblings (GROUPS), and
    its frozen weight in bf16. For bf16-mixed training on a CPU (train.build_model). Returns the number of layers
    given it; layers that have it already are skipped."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon") and "forward" not in vars(module):
            module.forward = _make_norm_forward(module)
    for parent in model.modules():
        layers = {k: v for k, v in parent.named_children() if eligible(v)
                  and v.get_base_layer().weight.device.type == "cpu" and not hasattr(v, "tunelab_group")}
        if not layers:
            continue
        sets = [names for names in GROUPS if all(k in layers for k in names)]
        sets += [(k,) for k in layers if not any(k in names for names in sets)]
        for names in sets:
            g = _Group([layers[k] for k in names])
            for k in names:
                layers[k].tunelab_group = g
                layers[k].forward = _make_forward(layers[k], g)
                n += 1
        mlp = all(k in layers for k in ("gate_proj", "up_proj", "down_proj")) and type(parent).__name__.endswith("MLP")
        if mlp and _is_silu(getattr(parent, "act_fn", None)):
            parent.forward = _make_mlp_forward(parent)
    if n:
        release_checkpoint_map(model)
    return n


def _checkpoint_maps() -> list[tuple[int, int]]:
    """Address ranges of the safetensors files mapped into this process (Linux /proc/self/maps; [] elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[-1].endswith(".safetensors"):
                    start, end = parts[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def release_checkpoint_map(model: nn.Module) -> int:
    """Copy the parameters and buffers that still live in the checkpoint's memory map into ordinary memory, so
    that the map is released. safetensors maps the checkpoint file and the tensors transformers loads on a CPU
    are views of it; once fusing has replaced the frozen projections by bf16 copies, the map still holds their
    fp32 pages, resident since fusing read them, for the embedding and norms that remain views of it (SmolLM2:
    0.55 GiB of file pages in RSS for 0.11 GiB of tensors still used). Returns the bytes copied."""
    ranges = _checkpoint_maps()
    copied = 0
    if not ranges:
        return copied
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            ptr = t.data_ptr()
            if t.device.type == "cpu" and any(a <= ptr < b for a, b in ranges):
                t.data = t.data.clone()
                copied += t.numel() * t.element_size()
    return copied


def fused_layers(model: nn.Module) -> dict:
    """What fuse_lora changed in `model`, counted from the model itself (for the run log and summary.json):
    sibling groups by their members' names ("q_proj+k_proj+v_proj": 30), LoRA layers computed by the fused
    path, SwiGLU MLPs and RMSNorms given the hand-written Functions."""
    members: dict[int, list[str]] = {}
    swiglu = norms = 0
    for name, m in model.named_modules():
        g = getattr(m, "tunelab_group", None)
        if isinstance(g, _Group):
            members.setdefault(id(g), []).append(name.rsplit(".", 1)[-1])
        kind = getattr(vars(m).get("forward"), "tunelab_fused", None)
        swiglu += kind == "swiglu"
        norms += kind == "rms_norm"
    groups: dict[str, int] = {}
    for names in members.values():
        key = "+".join(names)
        groups[key] = groups.get(key, 0) + 1
    return {"groups": groups, "layers": sum(len(v) for v in members.values()), "swiglu_mlps": swiglu,
            "rms_norms": norms}
