"""Real FSDP on CPU processes (gloo) through accelerate and transformers' Trainer.

`accelerate launch` with an FSDP config (distributed_type: FSDP) sets ACCELERATE_USE_FSDP and the FSDP_*
variables in every rank; accelerate 1.15 then builds its FullyShardedDataParallelPlugin, but
AcceleratorState turns FSDP on only when the process group's device type is GPU-like (state.py: the
`distributed_type in [MULTI_GPU, MULTI_XPU, ...]` branch); on a CPU-only machine the state stays MULTI_CPU
and `prepare` wraps the model in plain DDP, silently. torch's FSDP2 (`fully_shard`) itself runs on CPU
with gloo (parameters become DTensors whose local shard is 1/world of each tensor; all-gather and
reduce-scatter go over gloo), and accelerate's FSDP2 code path (fsdp2_prepare_model, the FSDP
state-dict save/load the Trainer uses for checkpoints) is device-agnostic.

So `FsdpOnCpu.create_accelerator_and_postprocess` (a public Trainer method, called once from
Trainer.__init__) finishes what AcceleratorState would have done on a GPU, through public attributes
only: the plugin built from the same FSDP_* variables, `distributed_type = FSDP` on the accelerator state
and on the process state they share, and the Trainer's own `is_fsdp_enabled` flag. Nothing else is
patched; from there every step is accelerate's and the Trainer's FSDP2 code. Only FSDP2
(fsdp_version: 2) is enabled this way. torch's FSDP1 runs on CPU too, but accelerate's FSDP1 path does
not: its plugin looks up a GPU-like device for sync_module_states ("There are currently no available
devices found"), and without that its prepare passes device_id=cpu:N, which torch rejects
("Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0"; seen with accelerate 1.15).
tests/test_distributed.py goes red if accelerate starts doing this itself (the override becomes
unnecessary) or stops accepting it (sharding no longer happens).
"""

from __future__ import annotations

import os

from transformers import TrainerCallback


def fsdp_requested() -> bool:
    """This rank was started by `accelerate launch` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version() -> int:
    return int(os.environ.get("FSDP_VERSION", "1"))


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Turn an accelerator that accelerate left at MULTI_CPU (FSDP requested, no GPU) into an FSDP2 one.
    Returns True when it did; False (nothing changed) when FSDP is not requested, FSDP is already on
    (a GPU machine), the processes are not CPU gloo ones, or the config asks for FSDP1."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU or fsdp_version() != 2:
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerator() built it
    if state.mixed_precision != "no":  # AcceleratorState's GPU branch does the same
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # the shared process state accelerate also reads
    return True


class FsdpOnCpu:
    """Trainer mixin: real FSDP2 on CPU processes (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled and self.accelerator.is_fsdp2:  # on GPUs too: say (and record) what each holds
            self.add_callback(ShardReport())

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True


def shard_counts(model) -> tuple[int, int]:
    """(elements of the parameters this process stores, elements of the whole model). FSDP2 parameters
    are DTensors: their local shard is what this process holds; plain tensors are held whole."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in model.parameters():
        full += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, full


def shard_report(model) -> dict:
    """Every process's share of the parameters (a collective: all ranks call it)."""
    import torch.distributed as dist

    local, full = shard_counts(model)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local)
    return {"processes": len(counts), "param_elements": full, "local_param_elements": counts}


class ShardReport(TrainerCallback):
    """At the start of training (the model is sharded by then): how much of the model each process holds,
    printed once and kept (`report`) for summary.json."""

    def __init__(self):
        self.report: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .ui import console

        self.report = r = shard_report(model)
        shares = ", ".join(f"{100 * n / r['param_elements']:.1f}%" for n in r["local_param_elements"])
        console.print(f"FSDP: parameters sharded over {r['processes']} processes; each holds {shares} of "
                      f"{r['param_elements']:,} elements")
