"""Where a layer's bytes go inside a ring slot, and which aligned reads put them there.

A layer's tensors usually sit next to each other in one shard (safetensors orders names, so all
of `model.layers.7.*` is contiguous), or in two when the layer straddles shards. For each shard
we read the 4096-aligned superset of the layer's byte range with O_DIRECT straight into the slot,
and remember the shift, so every tensor is a view at a known offset in the slot:

    file:  ....|<-shift->[ layer 7 tensors ... ]<-pad->|....      (| = 4096 boundary)
    slot:  [ read 0 (aligned superset, shard A) ][ read 1 (shard B) ]  ... unused tail

A read is split into chunks of at most `chunk_bytes` so that K loaders share one layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from ringllm.checkpoint.layout import GROUP_ALIGN, GROUP_KINDS, GroupLayout, ModelLayout, align_down, align_up

ALIGN = 4096
DEFAULT_CHUNK_BYTES = 16 << 20
MERGE_GAP = 1 << 20   # EngineConfig.merge_gap's default: tensors closer than this in one file are read in one go


@dataclass(frozen=True)
class SlotRead:
    path: str
    file_offset: int   # aligned
    length: int        # aligned; may run past the end of the file (the read is then short)
    slot_offset: int   # aligned
    needed: int        # bytes of this read that hold tensor data (the read must reach them)


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str
    file_offset: int
    length: int
    slot_offset: int
    needed: int


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    reads: tuple[SlotRead, ...]
    tensor_slot_offset: dict          # tensor name -> offset of its first byte in the slot
    nbytes: int                       # slot bytes used

    def slot_offset(self, path: str, file_offset: int, nbytes: int = 0) -> int:
        """Where byte `file_offset` of file `path` lands in the slot (and the `nbytes` after it,
        which the same read must hold): any sub-range of the layer's tensors, such as one tensor
        parallel rank's rows of a tensor (checkpoint.sharding), has a place in the whole layer's slot."""
        for r in self.reads:
            if r.path == path and r.file_offset <= file_offset and file_offset + nbytes <= r.file_offset + r.needed:
                return r.slot_offset + file_offset - r.file_offset
        raise KeyError(f"{path} bytes {file_offset}..{file_offset + nbytes} are not in layer {self.layer}'s reads")

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Chunk]:
        chunk_bytes = max(ALIGN, align_down(chunk_bytes, ALIGN))
        out = []
        for r in self.reads:
            for start in range(0, r.length, chunk_bytes):
                length = min(chunk_bytes, r.length - start)
                needed = max(0, min(length, r.needed - start))
                out.append(Chunk(len(out), r.path, r.file_offset + start, length, r.slot_offset + start, needed))
        return out


@dataclass(frozen=True)
class GroupViews:
    """How one group travels: (slot offset, buffer offset, bytes) per contiguous run of its
    tensors in the ring slot, and each tensor's offset in the group buffer. The slot plan is the
    whole layer's (loaders always read whole layers); the group may be a tensor parallel shard
    of it, whose extents are sub-ranges of the layer's tensors."""
    runs: tuple[tuple[int, int, int], ...]
    offsets: tuple[int, ...]                # per GroupLayout entry, in entry order
    nbytes: int

    @classmethod
    def plan(cls, group: GroupLayout, slot_plan: LayerPlan) -> "GroupViews":
        spans = sorted((slot_plan.slot_offset(e.extent.path, e.extent.offset, e.extent.nbytes), e.extent.nbytes, i)
                       for i, e in enumerate(group.entries))
        runs, offsets, cursor = [], [0] * len(spans), 0
        for start, nbytes, i in spans:
            if runs and start == runs[-1][0] + runs[-1][2]:       # continues the last run
                src, dst, length = runs[-1]
                runs[-1] = (src, dst, length + nbytes)
            else:
                cursor = align_up(cursor, GROUP_ALIGN)           # each run starts aligned for any dtype
                runs.append((start, cursor, nbytes))
            src, dst, _ = runs[-1]
            offsets[i] = dst + (start - src)
            cursor = offsets[i] + nbytes
        return cls(tuple(runs), tuple(offsets), cursor)


def plan_layer(layout: ModelLayout, layer: int, merge_gap: int = MERGE_GAP) -> LayerPlan:
    extents = [e.extent for kind in GROUP_KINDS for e in layout.group(layer, kind).entries]
    by_file: dict[str, list] = {}
    for ext in extents:
        by_file.setdefault(ext.path, []).append(ext)
    reads, offsets, cursor = [], {}, 0
    for path in sorted(by_file):
        group = sorted(by_file[path], key=lambda e: e.offset)
        runs = [[group[0]]]
        for ext in group[1:]:
            prev = runs[-1][-1]
            if ext.offset - (prev.offset + prev.nbytes) <= merge_gap:
                runs[-1].append(ext)
            else:
                runs.append([ext])
        for run in runs:
            start = align_down(run[0].offset, ALIGN)
            end = max(e.offset + e.nbytes for e in run)
            reads.append(SlotRead(path, start, align_up(end, ALIGN) - start, cursor, end - start))
            for e in run:
                offsets[e.name] = cursor + (e.offset - start)
            cursor += align_up(end, ALIGN) - start
    return LayerPlan(layer, tuple(reads), offsets, cursor)


def plan_model(layout: ModelLayout, merge_gap: int = MERGE_GAP) -> list[LayerPlan]:
    return [plan_layer(layout, i, merge_gap) for i in range(layout.config.num_layers)]


def slot_size(plans: list[LayerPlan]) -> int:
    """Bytes of one ring slot: the largest layer's reads, O_DIRECT-aligned."""
    return align_up(max(p.nbytes for p in plans), ALIGN)


def file_table(plans: list[LayerPlan]) -> list[str]:
    """Every shard a read touches, in a fixed order: read jobs name files by index into it."""
    return sorted({r.path for p in plans for r in p.reads})
