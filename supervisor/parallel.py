"""Tensor parallel as the supervisor sees it: how many GPU processes (ranks) share the run's one
ring, which device each takes, and where they meet (torch.distributed's TCP store).

Every rank copies and computes its share of every layer (checkpoint.sharding): a 1/N row block
of each Linear, over its own PCIe link, from the same ring slots, in lock-step with the others.
The coordinator offers each slot to every rank and frees it when all have released it. Torch-free:
the command never imports torch for a streaming run. A rank's failure is named here too: the rank
that died or stopped, not the rank that lost it in a collective (`blame_dead_rank`, `stopped_ranks`).
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import psutil

from ringllm.checkpoint.errors import RingllmError


@dataclass(frozen=True)
class TensorParallelPlan:
    world: int = 1                       # GPU processes (ranks)
    devices: tuple[int, ...] = ()        # CUDA device index per rank (default 0..world-1)
    addr: str = "127.0.0.1"              # where rank 0 hosts the store; other hosts: a later step
    port: int = 0                        # 0: a free port chosen at start
    # the collectives' backend; None: NCCL between GPUs, gloo on cpu. gloo on cuda lets ranks share
    # one GPU (NCCL refuses that): the CUDA path checked on a one-GPU machine, at no speed-up
    backend: str | None = None

    def backend_for(self, device: str) -> str:
        return self.backend or ("nccl" if device == "cuda" else "gloo")

    def device_of(self, device: str, rank: int) -> str:
        """The torch device string of `rank` for a run on `device` ("cuda" | "cpu")."""
        if device != "cuda" or self.world == 1 and not self.devices:
            return device
        return f"cuda:{self.devices[rank] if self.devices else rank}"

    def sharers(self, device: str, rank: int) -> int:
        """How many ranks run on `rank`'s GPU (several only with --devices 0,0 over gloo)."""
        if device != "cuda" or not self.devices:
            return 1
        return self.devices.count(self.devices[rank])

    def planned_layout(self, layout):
        """The layout whose bytes one GPU holds: rank 0's share (the largest) with ranks, else the
        whole model."""
        if self.world == 1:
            return layout
        from ringllm.checkpoint.sharding import shard_layout
        return shard_layout(layout, 0, self.world)


def free_tcp_port(addr: str) -> int:
    """A port free on `addr` now, for the ranks' store (rank 0 binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


RANK_DEATH_GRACE_S = 1.0    # how long a rank's error waits for another rank's death to show (its exit is reaped)


def gpu_key(rank: int) -> str:
    """The GPU process of tensor-parallel rank `rank` in the supervisor's procs/ready: "gpu" for
    rank 0 (the one that reports tokens), "gpu1", "gpu2"... for the others."""
    return "gpu" if rank == 0 else f"gpu{rank}"


def stopped_ranks(procs: dict, world: int, reporter: int) -> str:
    """A suffix naming the other ranks that are alive but not running (SIGSTOP, a debugger),
    e.g. "; gpu1 is stopped (not running)": why a collective of `reporter` waited in vain."""
    if world == 1:
        return ""
    stopped = []
    for rank in range(world):
        proc = procs.get(gpu_key(rank))
        if rank == reporter or proc is None or proc.poll() is not None:
            continue
        try:
            if psutil.Process(proc.pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                stopped.append(gpu_key(rank))
        except psutil.Error:
            continue
    return f"; {', '.join(stopped)} {'is' if len(stopped) == 1 else 'are'} stopped (not running)" if stopped else ""


def blame_dead_rank(procs: dict, world: int, reporter: int, text: str, from_gpu: bool) -> None:
    """A rank reporting an error may only have lost another rank in a collective (gloo:
    "Connection reset by peer"): raise naming the rank that died instead, as for any dead child."""
    if not from_gpu or world == 1:
        return
    deadline = time.monotonic() + RANK_DEATH_GRACE_S
    while True:
        for rank in range(world):
            proc = procs.get(gpu_key(rank))
            if rank != reporter and proc is not None and proc.poll() is not None:
                raise RingllmError(f"the {gpu_key(rank)} process exited unexpectedly (exit code "
                                   f"{proc.returncode}); gpu{reporter or ''} then lost it: {text}")
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
