"""Data parallelism across processes (torchrun): rollouts sharded by rank, gradients all-reduced.

Under torchrun (WORLD_SIZE > 1 in the environment) the process group starts with gloo on a CPU
and NCCL on CUDA. Each rank plays whole groups of the step's batch (a group's baseline needs all
its episodes on one rank) and backpropagates its episodes' losses, which are already divided by
the global number of episodes; one all-reduce (a sum) of the flattened gradients after the last
micro-batch then leaves every rank with the gradient of the whole batch, exactly what DDP
computes (its no_sync over accumulation, then an averaged all-reduce of losses averaged per rank),
and every rank applies the same update. One flat collective per optimizer step rather than DDP's
per-bucket hooks: the adapters are a few MB, and the step's backward passes are many micro-batches
of which only the last would communicate anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device_type: str) -> World:
    """The process group from torchrun's environment (none when WORLD_SIZE is unset or 1)."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), started_here=True)


def close_world(world: World) -> None:
    import torch.distributed as dist

    if world.started_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum every parameter's gradient over the ranks (missing gradients count as zeros)."""
    if not world.active:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def gather_objects(obj, world: World) -> list:
    """Every rank's obj, in rank order (on every rank)."""
    if not world.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()
