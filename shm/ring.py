"""The ring: one POSIX shared-memory segment of layer slots in pinned DRAM.

Layout (all integers little-endian):

    0      magic "RINGLLM1" (8 B) | layout version u32 | slot count u32 | slot size u64 | data offset u64
    64     slot record 0: state u32 | layer i32 | generation u64 | reserved 16 B     (32 B each)
    96     slot record 1 ...
    ...    (header padded to a multiple of 4096)
    data_offset + i * slot_size: slot i (slot_size is a multiple of 4096, so every slot start
           is O_DIRECT-aligned)

Slot state machine (only the coordinator writes state, layer and generation):

    FREE --assign(layer), gen += 1--> LOADING --all chunks read--> READY --evict--> FREE
                                                                     |
                             GPU told "layer L ready in slot s, gen g" while READY; the slot is
                             neither evicted nor reassigned until the GPU releases it

The generation is bumped *before* any loader writes into a reassigned slot, so the GPU process,
after its copy out of the slot completes, can compare the header's generation with the one it
was told: equal means no byte of the copy came from a later layer.
"""
from __future__ import annotations

import mmap
import struct

import posix_ipc

MAGIC = b"RINGLLM1"
LAYOUT_VERSION = 1
HEADER_FMT = "<8sIIQQ"
SLOT_FMT = "<IiQ16x"
SLOT_RECORD = struct.calcsize(SLOT_FMT)  # 32
SLOTS_AT = 64
PAGE = 4096

FREE, LOADING, READY = 0, 1, 2
STATE_NAMES = {FREE: "free", LOADING: "loading", READY: "ready"}


def header_bytes(slot_count: int) -> int:
    return (SLOTS_AT + slot_count * SLOT_RECORD + PAGE - 1) // PAGE * PAGE


def ring_bytes(slot_count: int, slot_size: int) -> int:
    return header_bytes(slot_count) + slot_count * slot_size


class Ring:
    """A mapped ring segment. `create` is for the supervisor (the owner); `attach` for the others."""

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, owner: bool):
        self.name, self.owner = name, owner
        self.map = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        magic, version, self.slot_count, self.slot_size, self.data_offset = struct.unpack_from(
            HEADER_FMT, self.map, 0)
        if magic != MAGIC or version != LAYOUT_VERSION:
            self.map.close()
            raise RuntimeError(f"shared memory {name} is not a ringllm ring of layout {LAYOUT_VERSION}")

    @classmethod
    def create(cls, name: str, slot_count: int, slot_size: int) -> "Ring":
        assert slot_size % PAGE == 0
        size = ring_bytes(slot_count, slot_size)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        with mmap.mmap(shm.fd, size) as m:
            struct.pack_into(HEADER_FMT, m, 0, MAGIC, LAYOUT_VERSION, slot_count, slot_size,
                             header_bytes(slot_count))
            for i in range(slot_count):
                struct.pack_into(SLOT_FMT, m, SLOTS_AT + i * SLOT_RECORD, FREE, -1, 0)
        return cls(name, shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "Ring":
        return cls(name, posix_ipc.SharedMemory(name), owner=False)

    @property
    def nbytes(self) -> int:
        return len(self.map)

    def slot_base(self, slot: int) -> int:
        return self.data_offset + slot * self.slot_size

    def read_slot(self, slot: int) -> tuple[int, int, int]:
        """(state, layer, generation) of a slot."""
        return struct.unpack_from(SLOT_FMT, self.map, SLOTS_AT + slot * SLOT_RECORD)

    def write_slot(self, slot: int, state: int, layer: int, generation: int) -> None:
        struct.pack_into(SLOT_FMT, self.map, SLOTS_AT + slot * SLOT_RECORD, state, layer, generation)

    def generation(self, slot: int) -> int:
        return self.read_slot(slot)[2]

    def view(self) -> memoryview:
        return memoryview(self.map)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            # A torch tensor still exports the buffer; the mapping goes with the process.
            pass


MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python's mmap module does not name it


def prefault(ring: Ring) -> None:
    """Fault in every page of the ring before cudaHostRegister (registering cold pages is slow)."""
    try:
        ring.map.madvise(MADV_POPULATE_WRITE)
        return
    except (OSError, ValueError):
        pass
    mv = ring.view()
    for off in range(0, ring.nbytes, PAGE):   # older kernels: touch one byte a page
        mv[off] = mv[off]
    mv.release()
