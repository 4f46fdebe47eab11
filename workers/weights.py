"""Byte buffers -> typed weight tensors, following a GroupLayout. No copies: views only."""
from __future__ import annotations

import torch

from ringllm.checkpoint.dtypes import NAME_OF_TAG
from ringllm.checkpoint.layout import GroupLayout
from ringllm.checkpoint.safetensors_index import TensorExtent
from ringllm.workers.direct_read import read_tensors
from ringllm.workers.model import AttnWeights, FfnWeights



def torch_dtype(name: str) -> torch.dtype:
    """torch's dtype for a weight dtype, by its name ("bfloat16") or safetensors tag ("BF16")."""
    return getattr(torch, NAME_OF_TAG.get(name, name))


def typed_view(buf: torch.Tensor, offset: int, extent: TensorExtent) -> torch.Tensor:
    """View bytes buf[offset : offset + extent.nbytes] (uint8) as the extent's dtype and shape."""
    raw = buf[offset:offset + extent.nbytes]
    return raw.view(torch_dtype(extent.dtype)).view(extent.shape)


def group_weights(buf: torch.Tensor, group: GroupLayout) -> AttnWeights | FfnWeights:
    """Weights of one group as views into its flat buffer (uint8, group.nbytes long)."""
    views = [typed_view(buf, e.buf_offset, e.extent) for e in group.entries]
    return AttnWeights(*views) if group.kind == "attn" else FfnWeights(*views)


def load_tensor(extent: TensorExtent, threads: int = 1) -> torch.Tensor:
    """One tensor from its file, as a CPU tensor of its dtype and shape."""
    raw = torch.empty(extent.nbytes, dtype=torch.uint8)
    read_tensors([(extent, raw)], threads)
    return typed_view(raw, 0, extent)
