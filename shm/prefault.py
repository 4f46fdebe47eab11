"""SlotPrefaulter: a supervisor thread that faults the ring's pages in, slot by slot in the order
the first pass fills them, ahead of the loaders.

A fresh shared-memory page is allocated and zeroed by whoever touches it first; left to the
loaders, that happens inside their O_DIRECT reads, one page at a time, on the critical path of the
first token. On the 4-GPU H200 host the loaders filled a fresh 112 GiB ring at 1.32 GB/s while
they read a faulted scratch ring at 1.70 GB/s (docs/benchmarks.md). Faulting the slots from
another thread takes that work off the reads; a loader that catches up with the thread faults
its pages itself, as before. The policy hands the lowest FREE slot to a load, so the first pass
fills slots 0, 1, 2, ... and this thread walks them in the same order.

madvise(MADV_POPULATE_WRITE) (Linux 5.14+) through ctypes releases the GIL while the kernel
works; where the kernel refuses it the thread does nothing.
"""
from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger("ringllm")
MADV_POPULATE_WRITE = 23


class SlotPrefaulter(threading.Thread):
    def __init__(self, ring, slots: int | None = None):
        super().__init__(name="ringllm-prefault", daemon=True)
        self.ring = ring
        # the slots the run will fill (one per streamed layer, when the supervisor knows them)
        self.slots = ring.slot_count if slots is None else max(0, min(ring.slot_count, slots))
        self.stop = threading.Event()
        self.slots_done = 0
        # the mapping never moves while the ring is open; the temporary export is released at once
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(ring.map))
        libc = ctypes.CDLL(None, use_errno=True)
        self.madvise = libc.madvise
        self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def run(self) -> None:
        for slot in range(self.slots):
            if self.stop.is_set():
                return
            if self.madvise(self.base + self.ring.slot_base(slot), self.ring.slot_size, MADV_POPULATE_WRITE) != 0:
                log.debug("prefaulting the ring stopped at slot %d (errno %d)", slot, ctypes.get_errno())
                return
            self.slots_done += 1

    def finish(self, timeout_s: float) -> bool:
        """Stop after the slot in progress and wait for that; False if it is still running (then
        the ring must stay mapped: the process's exit unmaps it)."""
        self.stop.set()
        if self.is_alive():
            self.join(timeout=timeout_s)
        return not self.is_alive()
