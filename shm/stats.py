"""The stats page: one small shared-memory segment per run that every process updates and that
`ringllm top` (and the supervisor's progress bar) reads from another process. Counters only
grow; each record has one writer process, and each record is seqlocked (shm.seqlock), so a
reader gets the fields of one write, never a mix of two.

    0    magic "RLSTATS1" | version u32 | layers u32 | loaders u32 | slots u32 | status u64 (one word)
    64   supervisor : seq | start time f64 (epoch) | tokens u64 | pid u32
    128  coordinator: seq | compute step u64 | window first i32 | window last i32 | ring hits u64 |
                      ring misses u64 | disk bytes u64 | cap u32 | offset u32
    192  gpu process: seq | tokens u64 | h2d bytes u64 | copies in flight u32 | groups used u32 |
                      groups total u32 | resident layers u32 | wait seconds f64 | compute step u64
    256 + 32 k      : loader k: seq | bytes u64 | busy seconds f64 | chunks u64
"""
from __future__ import annotations

import mmap
import struct
import time

import posix_ipc

from ringllm.shm.seqlock import SeqlockBuffer

SIZE = 4096
MAGIC = b"RLSTATS1"
VERSION = 2
STARTING, RUNNING, DONE = 0, 1, 2
HEAD = "<8sIIII"
STATUS_AT = 24                # an 8-byte word of its own: written by the supervisor
SUP = "<dQI"                  # the field formats of each record, after its sequence word
COORD = "<QiiQQQII"
GPU = "<QQIIIIdQ"
LOADER = "<QdQ"
AT_SUP, AT_COORD, AT_GPU, AT_LOADERS = 64, 128, 192, 256
LOADER_RECORD = 32
MAX_LOADERS = (SIZE - AT_LOADERS) // LOADER_RECORD


class StatsPage:
    def __init__(self, name: str, create: bool = False, layers: int = 0, loaders: int = 0, slots: int = 0):
        self.name = name
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=SIZE if create else 0)
        self.map = mmap.mmap(shm.fd, SIZE)
        shm.close_fd()
        if create:
            struct.pack_into(HEAD, self.map, 0, MAGIC, VERSION, layers, loaders, slots)
        elif struct.unpack_from("<8sI", self.map, 0) != (MAGIC, VERSION):
            self.map.close()
            raise RuntimeError(f"{name} is not a ringllm stats page of version {VERSION}")
        self.records = SeqlockBuffer(self.map)
        if create:
            self.start = time.time()
            self.records.write(AT_SUP, SUP, self.start, 0, 0)

    def close(self) -> None:
        self.records.release()
        self.map.close()

    # writers (one process each) ------------------------------------------------------------------
    def set_status(self, status: int) -> None:
        self.records.store_word(STATUS_AT, status)

    def supervisor(self, tokens: int, pid: int) -> None:
        self.records.write(AT_SUP, SUP, self.start, tokens, pid)

    def coordinator(self, step, first, last, hits, misses, disk_bytes, cap, offset) -> None:
        self.records.write(AT_COORD, COORD, step, first, last, hits, misses, disk_bytes, cap, offset)

    def gpu(self, tokens, h2d, in_flight, used, total, resident, wait_s, step) -> None:
        self.records.write(AT_GPU, GPU, tokens, h2d, in_flight, used, total, resident, wait_s, step)

    def loader(self, index: int, nbytes: int, busy_s: float, chunks: int) -> None:
        if index < MAX_LOADERS:
            self.records.write(AT_LOADERS + LOADER_RECORD * index, LOADER, nbytes, busy_s, chunks)

    # reader -------------------------------------------------------------------------------------
    def read(self) -> dict:
        _, _, layers, loaders, slots = struct.unpack_from(HEAD, self.map, 0)   # written once, at creation
        start, sup_tokens, pid = self.records.read(AT_SUP, SUP)
        c = self.records.read(AT_COORD, COORD)
        g = self.records.read(AT_GPU, GPU)
        return {
            "layers": layers, "loaders": loaders, "slots": slots, "status": self.records.load_word(STATUS_AT),
            "start": start, "pid": pid, "tokens": sup_tokens,
            "coord": dict(zip(("step", "first", "last", "hits", "misses", "disk_bytes", "cap", "offset"), c)),
            "gpu": dict(zip(("tokens", "h2d_bytes", "in_flight", "used", "total", "resident", "wait_s", "step"), g)),
            "loader": [dict(zip(("bytes", "busy_s", "chunks"),
                                self.records.read(AT_LOADERS + LOADER_RECORD * k, LOADER)))
                       for k in range(min(loaders, MAX_LOADERS))],
        }
