"""The stats page: one small shared-memory segment per run that every process updates and that
`ringllm top` reads from another terminal. Counters only grow; each field has one writer, so no
locks are needed (8-byte aligned stores are atomic on the platforms we run on).

    0    magic "RLSTATS1" | version u32 | layers u32 | loaders u32 | slots u32 | status u32
    64   supervisor : start time f64 (epoch) | tokens u64 | pid u32
    128  coordinator: compute step u64 | window first i32 | window last i32 | ring hits u64 |
                      ring misses u64 | disk bytes u64 | cap u32 | offset u32
    192  gpu process: tokens u64 | h2d bytes u64 | copies in flight u32 | groups used u32 |
                      groups total u32 | resident layers u32 | wait seconds f64 | compute step u64
    256 + 32 k      : loader k: bytes u64 | busy seconds f64 | chunks u64
"""
from __future__ import annotations

import mmap
import struct
import time

import posix_ipc

SIZE = 4096
MAGIC = b"RLSTATS1"
STARTING, RUNNING, DONE = 0, 1, 2
HEAD = "<8sIIIII"
SUP = "<dQI"
COORD = "<QiiQQQII"
GPU = "<QQIIIIdQ"
LOADER = "<QdQ"
AT_SUP, AT_COORD, AT_GPU, AT_LOADERS = 64, 128, 192, 256
MAX_LOADERS = (SIZE - AT_LOADERS) // 32


class StatsPage:
    def __init__(self, name: str, create: bool = False, layers: int = 0, loaders: int = 0, slots: int = 0):
        self.name = name
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=SIZE if create else 0)
        self.map = mmap.mmap(shm.fd, SIZE)
        shm.close_fd()
        if create:
            struct.pack_into(HEAD, self.map, 0, MAGIC, 1, layers, loaders, slots, STARTING)
            struct.pack_into(SUP, self.map, AT_SUP, time.time(), 0, 0)
        elif self.map[:8] != MAGIC:
            raise RuntimeError(f"{name} is not a ringllm stats page")

    def close(self) -> None:
        self.map.close()

    # writers ------------------------------------------------------------------------------------
    def set_status(self, status: int) -> None:
        struct.pack_into("<I", self.map, 24, status)

    def supervisor(self, tokens: int, pid: int) -> None:
        struct.pack_into("<QI", self.map, AT_SUP + 8, tokens, pid)

    def coordinator(self, step, first, last, hits, misses, disk_bytes, cap, offset) -> None:
        struct.pack_into(COORD, self.map, AT_COORD, step, first, last, hits, misses, disk_bytes, cap, offset)

    def gpu(self, tokens, h2d, in_flight, used, total, resident, wait_s, step) -> None:
        struct.pack_into(GPU, self.map, AT_GPU, tokens, h2d, in_flight, used, total, resident, wait_s, step)

    def loader(self, index: int, nbytes: int, busy_s: float, chunks: int) -> None:
        if index < MAX_LOADERS:
            struct.pack_into(LOADER, self.map, AT_LOADERS + 32 * index, nbytes, busy_s, chunks)

    # reader -------------------------------------------------------------------------------------
    def read(self) -> dict:
        _, _, layers, loaders, slots, status = struct.unpack_from(HEAD, self.map, 0)
        start, sup_tokens, pid = struct.unpack_from(SUP, self.map, AT_SUP)
        c = struct.unpack_from(COORD, self.map, AT_COORD)
        g = struct.unpack_from(GPU, self.map, AT_GPU)
        return {
            "layers": layers, "loaders": loaders, "slots": slots, "status": status, "start": start, "pid": pid,
            "tokens": sup_tokens,
            "coord": dict(zip(("step", "first", "last", "hits", "misses", "disk_bytes", "cap", "offset"), c)),
            "gpu": dict(zip(("tokens", "h2d_bytes", "in_flight", "used", "total", "resident", "wait_s", "step"), g)),
            "loader": [dict(zip(("bytes", "busy_s", "chunks"), struct.unpack_from(LOADER, self.map, AT_LOADERS + 32 * k)))
                       for k in range(min(loaders, MAX_LOADERS))],
        }
