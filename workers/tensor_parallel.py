"""The ranks of one tensor parallel model put their activation slices together.

Each rank computes a block of the last dimension of every Linear's output (checkpoint.sharding);
`TensorParallel.gather` all_gathers the blocks so that every rank holds the full activation
(gloo on cpu, NCCL on GPUs). Blocks may differ by one row per rank (uneven splits): collectives
want equal sizes, so each block is padded to the largest, gathered, trimmed and concatenated.

Every gather is a collective: all ranks must make the same calls in the same order with the same
shapes (they do: they run the same model code on the same tokens, and sample the same token from
identical full logits with identical generators, so no broadcast is needed).
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.sharding import ShardPlan


class TensorParallel:
    """Rank `rank` of `world`; `group` None is the default process group (init_distributed)."""

    def __init__(self, rank: int, world: int, plan: ShardPlan, group=None):
        if plan.world != world or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} does not fit a plan for {plan.world} ranks")
        self.rank, self.world, self.plan, self.group = rank, world, plan, group

    def gather(self, x: torch.Tensor, sizes) -> torch.Tensor:
        """x [..., sizes[rank]] -> [..., sum(sizes)]: every rank's block in rank order."""
        if self.world == 1:
            return x
        if x.shape[-1] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {x.shape[-1]} columns, its share is {sizes[self.rank]}")
        largest = max(sizes)
        block = F.pad(x, (0, largest - x.shape[-1])) if x.shape[-1] < largest else x.contiguous()
        blocks = [torch.empty_like(block) for _ in range(self.world)]
        dist.all_gather(blocks, block, group=self.group)
        return torch.cat([b[..., :n] for b, n in zip(blocks, sizes)], dim=-1)

    def gather_part(self, x: torch.Tensor, part: str) -> torch.Tensor:
        """gather by the plan's sizes of `part`: "attn_out", "hidden", "intermediate" or "vocab"."""
        return self.gather(x, getattr(self.plan, part))

    def disagreeing(self, digest: int, device: torch.device) -> list[int]:
        """The ranks whose `digest` (a 63-bit int: what they sampled) differs from rank 0's; the
        same list on every rank (a collective)."""
        if self.world == 1:
            return []
        mine = torch.tensor([digest], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        values = [int(v.item()) for v in every]
        return [r for r, v in enumerate(values) if v != values[0]]

    def from_rank_0(self, obj, device: torch.device):
        """Rank 0's `obj` (picklable) on every rank, over the gathers' group (a collective). For
        what the ranks would otherwise each work out alone and must not differ in: a draft tree
        (a draft model's forward may round differently on each GPU), serve's requests."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group, device=device if device.type == "cuda" else None)
        return box[0]


def init_distributed(rank: int, world: int, master_addr: str, master_port: int, backend: str,
                     timeout_s: float, gather_timeout_s: float | None = None):
    """Join the default process group: rank 0 serves a TCPStore at master_addr:master_port, the
    others connect to it; the rendezvous and the default group's collectives give up after
    timeout_s. Returns a group of all ranks whose collectives give up after gather_timeout_s
    (default timeout_s): the model's gathers run on it. NCCL's own settings are left to the
    environment (NVLink multicast stays as set there)."""
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(master_addr, master_port, world_size=world, is_master=rank == 0,
                              timeout=timeout, wait_for_workers=True)
    except (RuntimeError, OSError) as err:    # DistStoreError / DistNetworkError are RuntimeErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RingllmError(f"tensor parallel rank {rank} of {world}: no rendezvous at {master_addr}:{master_port} "
                           f"within {timeout_s:g} s ({first})") from None
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return dist.new_group(list(range(world)), timeout=timedelta(seconds=gather_timeout_s or timeout_s))


def close_distributed() -> None:
    """Leave the default process group (a no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
