"""The in-process reference engine: every weight loaded once, no processes, no ring.

It is what `ringllm generate --resident` runs, and what the streaming engine is tested against.
Each group is read into one flat host buffer and the model gets views into it, exactly like the
streaming engine's group buffers.
"""
from __future__ import annotations

import torch

from ringllm.checkpoint.layout import GROUP_KINDS, ModelLayout
from ringllm.workers.model import AttnWeights, FfnWeights, ResidentWeights
from ringllm.workers.weights import group_weights, load_tensor, read_extent_into


def load_resident_weights(layout: ModelLayout, dtype: torch.dtype, device: torch.device,
                          embed_on_host: bool = False) -> ResidentWeights:
    """embed_tokens, final norm and lm_head, converted to the compute dtype.

    With embed_on_host the embedding table stays in DRAM (rows are gathered there), and a tied
    lm_head gets its own copy on the device.
    """
    embed_host = load_tensor(layout.embed).to(dtype)
    embed = embed_host if embed_on_host else embed_host.to(device)
    norm = load_tensor(layout.final_norm).to(device=device, dtype=dtype)
    if layout.lm_head is None:
        lm_head = embed if embed.device == torch.device(device) else embed_host.to(device)
    else:
        lm_head = load_tensor(layout.lm_head).to(device=device, dtype=dtype)
    return ResidentWeights(embed, norm, lm_head)


def load_groups(layout: ModelLayout, layers, dtype: torch.dtype, device: torch.device) -> dict:
    """{layer: {"attn": AttnWeights, "ffn": FfnWeights}} on the device, in the compute dtype."""
    groups = {}
    for layer in layers:
        per_kind = {}
        for kind in GROUP_KINDS:
            group = layout.group(layer, kind)
            buf = torch.empty(group.nbytes, dtype=torch.uint8)
            for e in group.entries:
                read_extent_into(buf[e.buf_offset:e.buf_offset + e.extent.nbytes], e.extent)
            weights = group_weights(buf, group)
            # Convert once here rather than on every use when compute dtype differs.
            per_kind[kind] = type(weights)(*(w.to(device=device, dtype=dtype) for w in weights))
        groups[layer] = per_kind
    return groups


class ResidentSource:
    """WeightSource holding every group on the device."""

    def __init__(self, layout: ModelLayout, dtype: torch.dtype, device: torch.device):
        self.groups = load_groups(layout, range(layout.config.num_layers), dtype, device)

    def attn(self, layer: int) -> AttnWeights:
        return self.groups[layer]["attn"]

    def ffn(self, layer: int) -> FfnWeights:
        return self.groups[layer]["ffn"]

    def release(self, layer: int, kind: str) -> None:
        pass
