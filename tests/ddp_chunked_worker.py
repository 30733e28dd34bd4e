"""Run by tests/test_distributed.py under `torch.distributed.run --nproc_per_node 2` (gloo): one DDP
step of a full fine-tune of the tiny model with the chunked loss (tunelab/loss.py), each rank on its own
rows. Writes what the test checks to OUT (rank 0):

- "wrapper": the forward goes through the DDP wrapper (what TunelabTrainer does): the gradients, the tied
  embedding/head's included, equal one process's stock-loss gradients on all the rows, and after an
  optimizer step every rank holds the same parameters;
- "direct": the control, the same loss with the forward run on the bare model beside its DDP wrapper
  (why tunelab used to keep the chunked loss out of DDP training): DDP's reducer is never armed, the
  gradients stay per-rank and the ranks drift apart.

usage: ddp_chunked_worker.py MODEL_DIR OUT_JSON
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from tunelab.loss import chunked_causal_lm_loss


def batch(vocab: int):
    """4 rows (2 per rank) with different numbers of trained tokens, so the token normalisation matters."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (4, 24), generator=g)
    labels = ids.clone()
    for i, start in enumerate((4, 9, 15, 20)):
        labels[i, :start] = -100
    return ids, labels


def one_step(model_dir: str, rank: int, world: int, through_wrapper: bool) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one parameter, two uses
    ids, labels = batch(model.config.vocab_size)
    n_items = (labels[:, 1:] != -100).sum()  # over all ranks, as the Trainer passes num_items_in_batch
    mine = slice(rank * 2, rank * 2 + 2)
    ddp = DistributedDataParallel(model)
    # x world: DDP averages the gradients over the ranks (the Trainer scales the same way)
    loss = chunked_causal_lm_loss(model, {"input_ids": ids[mine], "labels": labels[mine]}, n_items, chunk_size=5,
                                  wrapper=ddp if through_wrapper else None) * world
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # one process, stock loss, all rows
    ref(input_ids=ids, labels=labels).loss.backward()
    to_ref = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    head_to_ref = (grads["model.embed_tokens.weight"] - ref.model.embed_tokens.weight.grad).abs().max().item()

    torch.optim.SGD(model.parameters(), lr=0.5).step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    return {"grad_max_diff_to_one_process": to_ref, "head_grad_max_diff_to_one_process": head_to_ref,
            "param_max_diff_between_ranks": max((e - every[0]).abs().max().item() for e in every)}


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": world, "wrapper": one_step(model_dir, rank, world, True),
              "direct": one_step(model_dir, rank, world, False)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
