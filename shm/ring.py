"""The ring: one POSIX shared-memory segment of layer slots in pinned DRAM.

Layout (all integers little-endian; every word 8-byte aligned):

    0      magic "RINGLLM1" (8 B) | layout version u32 | slot count u32 | slot size u64 |
           data offset u64 | loader count u32                                      (64 B)
    64     slot record 0:  sequence u64 | state u32 | layer i32 | generation u64 | tainted u64
    96     slot record 1 ...                                                      (32 B each)
    W      loader record 0: writing u64 = slot << 48 | generation, 0 = idle         (8 B each)
    W + 8  loader record 1 ...          (W = 64 + 32 * slot count)
    ...    (header padded to a multiple of 4096)
    data_offset + i * slot_size: slot i (slot_size is a multiple of 4096, so every slot start
           is O_DIRECT-aligned)

Writers: state, layer and generation only the coordinator (a seqlock, shm.seqlock: readers in
other processes never see half a record); `tainted` only loaders; loader record k only loader k
(the supervisor clears it between a dead loader and its replacement). One-word stores are atomic.

Slot state machine (the coordinator's):

    FREE --assign(layer), gen += 1--> LOADING --all chunks read--> READY --evict--> FREE
                                                                     |
                             GPU told "layer L ready in slot s, gen g" while READY; the slot is
                             neither evicted nor reassigned until the GPU releases it

The generation is bumped *before* any loader is sent a job for the reassigned slot, so the GPU
process, after its copy out of the slot completes, can compare the header's generation with the
one it was told: equal means the coordinator did not give the slot away meanwhile.

Late writes. That check cannot see a loader that writes after the slot was given away: a
duplicate or stale job (the policy never evicts a LOADING slot, so nothing else can write late).
So loaders write only under this protocol, in program order, for a job (slot s, generation g):

    1. record[k] = (s, g)                   "loader k is writing slot s for generation g"
    2. before-check: s is (LOADING, g)?     no: record[k] = 0, skip the read, report it skipped
    3. read the bytes into slot s
    4. after-check:  s is (LOADING, g)?     no: tainted[s] = (k, g), then Fatal (slot, layer, gens)
    5. record[k] = 0

and the GPU process, after its copy of slot s told as generation G completed, before compute:

    a. s is (READY, layer, G)
    b. no loader record names s with a generation other than G   (read the records first ...)
    c. tainted[s] == 0                                           (... then the taint word)

Why the GPU cannot miss a late write that reached its copy: the record (1) is stored before any
byte of the read (3), and stores become visible in program order (x86-64), so a late byte in
the copy means the record was visible before the GPU's check. At (b) the write is either still
in progress (its record names s with g != G: fail) or finished; then its after-check (4) found
the slot gone from (LOADING, g) (generations only grow: a slot never returns to a generation),
so the taint was stored before the record was cleared (5), and the GPU, loading (b) before
(c), sees it: fail. A record naming s with G itself is a duplicate of a job for these very
bytes: harmless to the copy, and its after-check ends the run anyway.
"""
from __future__ import annotations

import mmap
import struct

import posix_ipc

from ringllm.checkpoint.layout import align_up
from ringllm.shm.seqlock import SeqlockBuffer

MAGIC = b"RINGLLM1"
LAYOUT_VERSION = 2
HEADER_FMT = "<8sIIQQI"
SLOT_FIELDS = "<IiQ"          # state, layer, generation: after the record's sequence word
SLOT_RECORD = 32              # sequence u64 | fields 16 B | tainted u64
TAINT_AT = 24                 # within a slot record
LOADER_RECORD = 8
SLOTS_AT = 64
PAGE = 4096
SLOT_BITS = 48                # a loader record: slot << 48 | generation
MAX_SLOTS = 1 << (64 - SLOT_BITS)

FREE, LOADING, READY = 0, 1, 2
STATE_NAMES = {FREE: "free", LOADING: "loading", READY: "ready"}


def header_bytes(slot_count: int, loaders: int) -> int:
    return align_up(SLOTS_AT + slot_count * SLOT_RECORD + loaders * LOADER_RECORD, PAGE)


def ring_bytes(slot_count: int, slot_size: int, loaders: int) -> int:
    return header_bytes(slot_count, loaders) + slot_count * slot_size


class SlotTable:
    """The header's records over any mapping of the header (the ring's own, or `top`'s read-only
    one): the seqlocked slot records, taint words and loader records."""

    def __init__(self, buf):
        magic, version, self.slot_count, self.slot_size, self.data_offset, self.loaders = \
            struct.unpack_from(HEADER_FMT, buf, 0)
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise RuntimeError(f"not a ringllm ring of layout {LAYOUT_VERSION}")
        self.seq = SeqlockBuffer(buf)
        self.loaders_at = SLOTS_AT + self.slot_count * SLOT_RECORD

    def release(self) -> None:
        self.seq.release()

    # slot records (writer: the coordinator) ----------------------------------------------------
    def read_slot(self, slot: int) -> tuple[int, int, int]:
        """(state, layer, generation) of a slot, as one write left them."""
        return self.seq.read(SLOTS_AT + slot * SLOT_RECORD, SLOT_FIELDS)

    def write_slot(self, slot: int, state: int, layer: int, generation: int) -> None:
        self.seq.write(SLOTS_AT + slot * SLOT_RECORD, SLOT_FIELDS, state, layer, generation)

    def generation(self, slot: int) -> int:
        return self.read_slot(slot)[2]

    # loader records and taint words (writers: loaders) -----------------------------------------
    def begin_write(self, loader: int, slot: int, generation: int) -> None:
        """Step 1: loader `loader` is about to write `slot` for `generation` (>= 1)."""
        self.seq.store_word(self.loaders_at + loader * LOADER_RECORD, slot << SLOT_BITS | generation)

    def end_write(self, loader: int) -> None:
        """Step 5 (and the supervisor, for a dead loader): no write in progress."""
        self.seq.store_word(self.loaders_at + loader * LOADER_RECORD, 0)

    def writing(self, loader: int) -> tuple[int, int] | None:
        """(slot, generation) loader `loader` is writing, or None."""
        word = self.seq.load_word(self.loaders_at + loader * LOADER_RECORD)
        return (word >> SLOT_BITS, word & ((1 << SLOT_BITS) - 1)) if word else None

    def taint(self, slot: int, loader: int, generation: int) -> None:
        """Step 4: a write for `generation` may have landed after the slot left it."""
        self.seq.store_word(SLOTS_AT + slot * SLOT_RECORD + TAINT_AT, loader << SLOT_BITS | generation)

    def tainted(self, slot: int) -> tuple[int, int] | None:
        """(loader, generation) of a late write into `slot`, or None."""
        word = self.seq.load_word(SLOTS_AT + slot * SLOT_RECORD + TAINT_AT)
        return (word >> SLOT_BITS, word & ((1 << SLOT_BITS) - 1)) if word else None

    def late_write(self, slot: int, generation: int) -> str | None:     # [P7] steps b, c
        """Steps b and c for a copy of `slot` told as `generation`: what is wrong, or None."""
        for k in range(self.loaders):              # the records first ...
            w = self.writing(k)
            if w is not None and w[0] == slot and w[1] != generation:
                return f"loader{k} is writing into it for generation {w[1]}"
        t = self.tainted(slot)                     # ... then the taint word (see the docstring)
        if t is not None:
            return f"loader{t[0]} wrote into it late, for generation {t[1]}"
        return None


class Ring(SlotTable):
    """A mapped ring segment. `create` is for the supervisor (the owner); `attach` for the others."""

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, owner: bool):
        self.name, self.owner = name, owner
        self.map = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        try:
            super().__init__(self.map)
        except RuntimeError:
            self.map.close()
            raise RuntimeError(f"shared memory {name} is not a ringllm ring of layout {LAYOUT_VERSION}") from None

    @classmethod
    def create(cls, name: str, slot_count: int, slot_size: int, loaders: int) -> "Ring":
        if slot_size % PAGE or not 0 < slot_count < MAX_SLOTS:
            raise ValueError(f"ring of {slot_count} slots of {slot_size} bytes: need 1..{MAX_SLOTS - 1} "
                             f"slots of a multiple of {PAGE} bytes")
        size = ring_bytes(slot_count, slot_size, loaders)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        with mmap.mmap(shm.fd, size) as m:   # a new segment is all zeros: sequences even, no taint
            struct.pack_into(HEADER_FMT, m, 0, MAGIC, LAYOUT_VERSION, slot_count, slot_size,
                             header_bytes(slot_count, loaders), loaders)
        ring = cls(name, shm, owner=True)
        for i in range(slot_count):
            ring.write_slot(i, FREE, -1, 0)
        return ring

    @classmethod
    def attach(cls, name: str) -> "Ring":
        return cls(name, posix_ipc.SharedMemory(name), owner=False)

    @property
    def nbytes(self) -> int:
        return len(self.map)

    def slot_base(self, slot: int) -> int:
        return self.data_offset + slot * self.slot_size

    def view(self) -> memoryview:
        return memoryview(self.map)

    def close(self) -> None:
        self.release()
        try:
            self.map.close()
        except BufferError:
            # A torch tensor still exports the buffer; the mapping goes with the process.
            pass


MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python's mmap module does not name it


def prefault(ring: Ring) -> None:
    """Fault in every page of a ring (the disk probe's scratch ring: its reads then time the disk,
    not the first touch of fresh memory)."""
    try:
        ring.map.madvise(MADV_POPULATE_WRITE)
        return
    except (OSError, ValueError):
        pass
    mv = ring.view()
    for off in range(0, ring.nbytes, PAGE):   # older kernels: touch one byte a page
        mv[off] = mv[off]
    mv.release()
