"""Byte buffers -> typed weight tensors, following a GroupLayout. No copies: views only."""
from __future__ import annotations

import torch

from ringllm.checkpoint.dtypes import NAME_OF_TAG, QUANTIZED_TORCH_NAME
from ringllm.checkpoint.layout import GroupLayout
from ringllm.checkpoint.safetensors_index import TensorExtent
from ringllm.workers.direct_read import read_tensors
from ringllm.workers.model import AttnWeights, FfnWeights
from ringllm.workers.quantized import assemble



def torch_dtype(name: str) -> torch.dtype:
    """torch's dtype for a weight dtype, by its name ("bfloat16") or safetensors tag ("BF16", "F8_E4M3")."""
    return getattr(torch, NAME_OF_TAG.get(name) or QUANTIZED_TORCH_NAME.get(name) or name)


def typed_view(buf: torch.Tensor, offset: int, extent: TensorExtent) -> torch.Tensor:
    """View bytes buf[offset : offset + extent.nbytes] (uint8) as the extent's dtype and shape."""
    raw = buf[offset:offset + extent.nbytes]
    return raw.view(torch_dtype(extent.dtype)).view(extent.shape)


def assemble_group(group: GroupLayout, views: list[torch.Tensor]) -> AttnWeights | FfnWeights:
    """A group's tensors (one view per GroupEntry, in entry order) -> the model's weights: a
    quantized Linear's parts (weight, weight_scale) become one QuantizedWeight."""
    by_role: dict[str, dict[str, torch.Tensor]] = {}
    for entry, view in zip(group.entries, views):
        by_role.setdefault(entry.role, {})[entry.part] = view
    weights = [assemble(parts) for parts in by_role.values()]
    return AttnWeights(*weights) if group.kind == "attn" else FfnWeights(*weights)


def group_weights(buf: torch.Tensor, group: GroupLayout) -> AttnWeights | FfnWeights:
    """Weights of one group as views into its flat buffer (uint8, group.nbytes long)."""
    return assemble_group(group, [typed_view(buf, e.buf_offset, e.extent) for e in group.entries])


def load_bytes(extent: TensorExtent, threads: int = 1, direct: bool = True) -> torch.Tensor:
    """One tensor's bytes from its file, as a uint8 CPU tensor (any dtype: I64, F64, ...);
    direct=False reads through the page cache (workers.direct_read)."""
    raw = torch.empty(extent.nbytes, dtype=torch.uint8)
    read_tensors([(extent, raw)], threads, direct)
    return raw


def load_tensor(extent: TensorExtent, threads: int = 1, direct: bool = True) -> torch.Tensor:
    """One tensor from its file, as a CPU tensor of its dtype and shape."""
    return typed_view(load_bytes(extent, threads, direct), 0, extent)
