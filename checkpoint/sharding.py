"""Tensor parallel: one rank's share of every layer, as a ModelLayout of sub-extents.

Every Linear weight is split by OUTPUT rows only, so a rank's share of a tensor is one
contiguous byte range of the row-major safetensors tensor (no strided copies):

    q, k, v      the rank's block of kv heads (q head j uses kv head j // (heads // kv_heads),
                 so the q heads of a kv block are one block of q rows too)
    o, down      a block of hidden (output) rows
    gate, up     a block of intermediate rows
    lm_head      a block of vocab rows (tied: the embedding table's rows)
    norms, embed replicated (whole)
    FP8 scale    a per-channel scale [out, 1] is split with its weight's rows; a per-tensor
                 scale ([] / [1] / [1, 1]) is replicated

Blocks are as even as possible, larger first (`split_sizes`). Each rank's activations are then
a slice of the full last dimension; workers.tensor_parallel gathers them back (sizes: ShardPlan).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import GroupLayout, ModelLayout, _pack
from ringllm.checkpoint.llama_config import LlamaConfig
from ringllm.checkpoint.safetensors_index import TensorExtent


def split_sizes(total: int, world: int) -> list[int]:
    """`total` items in `world` contiguous blocks, as even as possible, the larger ones first."""
    base, extra = divmod(total, world)
    return [base + 1] * extra + [base] * (world - extra)


def _starts(sizes) -> list[int]:
    """Where each rank's block starts, given the blocks' sizes in rank order."""
    return [sum(sizes[:r]) for r in range(len(sizes))]


@dataclass(frozen=True)
class ShardPlan:
    """Per-rank sizes of the last dimension each gather puts together (rank order)."""
    world: int
    kv_heads: tuple[int, ...]
    attn_out: tuple[int, ...]       # local q heads * head_dim: attention output before o_proj
    hidden: tuple[int, ...]         # o_proj / down_proj output rows
    intermediate: tuple[int, ...]   # gate / up output rows
    vocab: tuple[int, ...]          # lm_head rows

    @classmethod
    def of(cls, cfg: LlamaConfig, world: int) -> "ShardPlan":
        if world < 1:
            raise RingllmError(f"--tensor-parallel {world}: the number of ranks must be at least 1")
        if world > cfg.num_kv_heads:
            raise RingllmError(f"--tensor-parallel {world}: the model has {cfg.num_kv_heads} key/value heads, "
                               f"so at most {cfg.num_kv_heads} ranks")
        rep = cfg.num_heads // cfg.num_kv_heads
        kv = split_sizes(cfg.num_kv_heads, world)
        return cls(world, tuple(kv), tuple(n * rep * cfg.head_dim for n in kv),
                   tuple(split_sizes(cfg.hidden_size, world)),
                   tuple(split_sizes(cfg.intermediate_size, world)),
                   tuple(split_sizes(cfg.vocab_size, world)))


def _rows(ext: TensorExtent, row0: int, rows: int) -> TensorExtent:
    """Rows row0..row0+rows-1 of a row-major tensor: one contiguous byte range of its file."""
    row_bytes = ext.nbytes // ext.shape[0]
    return TensorExtent(ext.name, ext.path, ext.offset + row0 * row_bytes, rows * row_bytes, ext.dtype,
                        (rows,) + tuple(ext.shape[1:]))


def _per_channel(scale: TensorExtent, weight_rows: int) -> bool:
    """A scale with one value per output row ([out] / [out, 1]), not one per tensor."""
    return weight_rows > 1 and len(scale.shape) >= 1 and scale.shape[0] == weight_rows \
        and math.prod(scale.shape) == weight_rows


def shard_layout(layout: ModelLayout, rank: int, world: int) -> ModelLayout:
    """Rank `rank` of `world`'s share of `layout` (world 1: the layout itself).

    The shard's config has the rank's num_heads, num_kv_heads and intermediate_size (so q_size,
    kv_size and the KV cache are local); hidden_size, head_dim and vocab_size stay the model's.
    Its extents point into the same files, so the resident loaders read them unchanged.
    """
    plan = ShardPlan.of(layout.config, world)    # refuses world > kv heads
    if not 0 <= rank < world:
        raise RingllmError(f"tensor parallel rank {rank} is outside 0..{world - 1}")
    if world == 1:
        return layout
    cfg, d = layout.config, layout.config.head_dim
    # (first row, rows) of each role's output dimension on this rank
    attn0, hidden0, inter0 = (_starts(s)[rank] for s in (plan.attn_out, plan.hidden, plan.intermediate))
    kv0 = _starts(plan.kv_heads)[rank] * d
    rows_of = {
        "q": (attn0, plan.attn_out[rank]),
        "k": (kv0, plan.kv_heads[rank] * d),
        "v": (kv0, plan.kv_heads[rank] * d),
        "o": (hidden0, plan.hidden[rank]),
        "gate": (inter0, plan.intermediate[rank]),
        "up": (inter0, plan.intermediate[rank]),
        "down": (hidden0, plan.hidden[rank]),
    }

    def shard_group(group: GroupLayout) -> GroupLayout:
        entries, weight_rows = [], {}
        for e in group.entries:
            ext = e.extent
            if e.role not in rows_of:                       # a norm: replicated
                entries.append((e.role, e.part, ext))
            elif e.part == "weight":
                weight_rows[e.role] = ext.shape[0]
                entries.append((e.role, e.part, _rows(ext, *rows_of[e.role])))
            elif _per_channel(ext, weight_rows[e.role]):   # a quantized weight's per-row scale
                entries.append((e.role, e.part, _rows(ext, *rows_of[e.role])))
            else:                                           # a per-tensor scale: replicated
                entries.append((e.role, e.part, ext))
        return _pack(group.layer, group.kind, entries)

    vocab = (_starts(plan.vocab)[rank], plan.vocab[rank])
    head = layout.lm_head if layout.lm_head is not None else layout.embed   # tied: the embed rows
    head_scale = layout.lm_head_scale
    if head_scale is not None and _per_channel(head_scale, head.shape[0]):
        head_scale = _rows(head_scale, *vocab)
    local = dataclasses.replace(cfg, num_heads=plan.attn_out[rank] // d, num_kv_heads=plan.kv_heads[rank],
                                intermediate_size=plan.intermediate[rank])
    return dataclasses.replace(
        layout, config=local,
        groups=tuple((shard_group(attn), shard_group(ffn)) for attn, ffn in layout.groups),
        lm_head=_rows(head, *vocab), lm_head_scale=head_scale)
