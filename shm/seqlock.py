"""Records in shared memory that one process writes and others read, never torn.

`struct.pack_into` is not atomic: it zeroes the record, then stores the fields one by one (byte
by byte for "<" formats), so a reader in another process can see (0, 0, 0) or (2, 5, 0) while
(2, 5, 7) is being written. A seqlock fixes that without locks:

    offset      sequence u64    even: stable; odd: a write is in progress
    offset + 8  the fields      (a struct format)

    writer: seq = s + 1 (odd) -> store the fields -> seq = s + 2 (even)
    reader: s1 = seq (retry while odd) -> load the fields -> s2 = seq; s1 == s2: no write
            overlapped the load, else retry

What it relies on:
- Exactly one writer process per record (each caller documents which), so the writer can read
  the sequence back from shared memory.
- Words (the sequence, and the single-word records of `load_word`/`store_word`) are 8-byte
  aligned and accessed through a memoryview cast to "Q": CPython copies such an item with one
  8-byte machine load or store, which x86-64 performs atomically.
- Order: every access is its own C call from the interpreter loop (no compiler reordering across
  them), and x86-64 (TSO) makes stores visible in program order and performs loads in program
  order. A weakly ordered CPU (aarch64) would need fences here; ringllm runs on x86-64.
"""
from __future__ import annotations

import os
import struct
import time

READ_TIMEOUT_S = 5.0     # a sequence that stays odd this long: the writer died mid-write
SPINS_BEFORE_YIELD = 64


class TornRecord(RuntimeError):
    """A record stayed mid-write (odd sequence) past the read timeout."""


class SeqlockBuffer:
    """Seqlocked records and atomic words at fixed offsets of one shared buffer (mmap)."""

    def __init__(self, buf):
        self.buf = buf
        self.words = memoryview(buf).cast("Q")   # 8-byte items: one machine load/store each

    def release(self) -> None:
        """Drop the memoryview (an mmap cannot close while one exists)."""
        self.words.release()

    # single words ------------------------------------------------------------------------------
    def load_word(self, offset: int) -> int:
        return self.words[offset // 8]

    def store_word(self, offset: int, value: int) -> None:
        self.words[offset // 8] = value

    # seqlocked records -------------------------------------------------------------------------
    def write(self, offset: int, fmt: str, *values) -> None:     # [P11]
        """Write the record at `offset` (its sequence word) from its one writer process."""
        i = offset // 8
        seq = self.words[i]
        self.words[i] = seq + 1                        # odd: readers retry from here on
        struct.pack_into(fmt, self.buf, offset + 8, *values)
        self.words[i] = seq + 2                        # even again: the fields are complete

    def read(self, offset: int, fmt: str, timeout_s: float = READ_TIMEOUT_S) -> tuple:
        """The record's fields as one write left them (never a mix of two writes)."""
        i = offset // 8
        spins, deadline = 0, None
        while True:
            before = self.words[i]                     # the sequence first ...
            if not before & 1:
                values = struct.unpack_from(fmt, self.buf, offset + 8)
                if self.words[i] == before:            # ... and again after the fields
                    return values
            spins += 1
            if spins % SPINS_BEFORE_YIELD == 0:
                # the writer may be descheduled mid-write, maybe on this very core
                deadline = deadline or time.monotonic() + timeout_s
                if time.monotonic() > deadline:
                    raise TornRecord(f"shared record at offset {offset} stayed mid-write for {timeout_s:.0f} s "
                                     "(its writer died while writing)")
                os.sched_yield()
