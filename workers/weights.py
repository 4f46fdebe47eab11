"""Byte buffers -> typed weight tensors, following a GroupLayout. No copies: views only."""
from __future__ import annotations

import ctypes
import os

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.dtypes import NAME_OF_TAG
from ringllm.checkpoint.layout import GroupLayout
from ringllm.checkpoint.safetensors_index import TensorExtent
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


def read_extent_into(dst: torch.Tensor, extent: TensorExtent) -> None:
    """Buffered read of one tensor's bytes into a contiguous uint8 CPU tensor (the resident path only)."""
    # the tensor's memory as a writable buffer through ctypes: dst.numpy() would need numpy, which
    # ringllm does not depend on
    view = memoryview((ctypes.c_ubyte * dst.numel()).from_address(dst.data_ptr()))
    fd = os.open(extent.path, os.O_RDONLY)
    try:
        done = 0
        while done < extent.nbytes:
            n = os.preadv(fd, [view[done:extent.nbytes]], extent.offset + done)
            if n <= 0:
                raise RingllmError(f"{extent.path}: unexpected end of file reading tensor {extent.name}")
            done += n
    except OSError as err:
        raise RingllmError(f"{extent.path}: read error in tensor {extent.name} ({err.strerror})") from None
    finally:
        os.close(fd)


def load_tensor(extent: TensorExtent) -> torch.Tensor:
    raw = torch.empty(extent.nbytes, dtype=torch.uint8)
    read_extent_into(raw, extent)
    return typed_view(raw, 0, extent)
