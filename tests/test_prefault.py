"""shm.prefault: the supervisor's thread faults the ring's slots in ahead of the loaders. The
kernel (mincore) says which pages of the fresh segment are resident before and after."""
from __future__ import annotations

import ctypes
import mmap
import os

import posix_ipc

from ringllm.shm.prefault import SlotPrefaulter
from ringllm.shm.ring import Ring

PAGE = mmap.PAGESIZE


def resident_pages(ring: Ring, start: int, length: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    vec = ctypes.create_string_buffer(length // PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(ring.map))
    assert libc.mincore(base + start, length, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec.raw)


def test_every_slot_is_faulted_in_and_the_thread_stops():
    name = f"/ringllm-test-prefault-{os.getpid()}"
    ring = Ring.create(name, 3, 64 * PAGE, loaders=1)
    try:
        data = ring.data_offset
        assert resident_pages(ring, data, 3 * 64 * PAGE) == 0      # a fresh segment: nothing yet
        pre = SlotPrefaulter(ring)
        pre.start()
        pre.join(timeout=30)
        assert pre.slots_done == 3
        assert resident_pages(ring, data, 3 * 64 * PAGE) == 3 * 64
    finally:
        ring.close()
        posix_ipc.unlink_shared_memory(name)


def test_a_stopped_prefaulter_touches_nothing_more():
    name = f"/ringllm-test-prefault2-{os.getpid()}"
    ring = Ring.create(name, 4, 64 * PAGE, loaders=1)
    try:
        pre = SlotPrefaulter(ring)
        pre.finish(timeout_s=5)      # stopped before it ran
        pre.start()
        pre.join(timeout=30)
        assert pre.slots_done == 0
        assert resident_pages(ring, ring.data_offset, 4 * 64 * PAGE) == 0
    finally:
        ring.close()
        posix_ipc.unlink_shared_memory(name)
