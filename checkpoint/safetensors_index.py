"""Where every tensor of a checkpoint lives: file, absolute byte offset, length, dtype, shape.

We parse the safetensors header ourselves (8-byte little-endian length, then JSON) instead of
opening the files with the safetensors library, because the loaders read raw byte ranges with
O_DIRECT and need the absolute offsets. Every check that can catch a damaged file before a
single weight byte is read happens here.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ringllm.checkpoint.dtypes import BYTES_OF_TAG, OTHER_TAG_BYTES
from ringllm.checkpoint.errors import RingllmError

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorExtent:
    name: str
    path: str          # absolute path of the shard
    offset: int        # absolute byte offset of the first element in the file
    nbytes: int
    dtype: str         # safetensors tag: BF16, F16, F32, ...
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorExtent]:
    """Parse and validate one shard's header; raise RingllmError naming the file on damage."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise RingllmError(f"{path}: corrupt safetensors file ({size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise RingllmError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes, file has {size})")
            raw = f.read(header_len)
    except OSError as err:
        raise RingllmError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise RingllmError(f"{path}: corrupt safetensors header ({err})") from None
    data_start = 8 + header_len
    data_len = size - data_start
    extents: dict[str, TensorExtent] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RingllmError(f"{path}: corrupt safetensors header (bad entry for tensor {name})") from None
        itemsize = BYTES_OF_TAG.get(dtype) or OTHER_TAG_BYTES.get(dtype)
        if itemsize is None:
            raise RingllmError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
        if begin < 0 or end < begin or end - begin != math.prod(shape) * itemsize:
            raise RingllmError(
                f"{path}: corrupt safetensors header (tensor {name}: offsets {begin}..{end} do not match "
                f"shape {list(shape)} of {dtype})")
        if end > data_len:
            raise RingllmError(
                f"{path}: truncated shard (tensor {name} ends at byte {data_start + end}, file has {size})")
        extents[name] = TensorExtent(name, str(path.resolve()), data_start + begin, end - begin, dtype, shape)
    ordered = sorted(extents.values(), key=lambda e: e.offset)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise RingllmError(f"{path}: corrupt safetensors header (tensors {prev.name} and {cur.name} overlap)")
    return extents


def shard_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards: from model.safetensors.index.json if present, else *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise RingllmError(f"{index}: cannot read its weight_map ({err})") from None
        files = [model_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise RingllmError(f"{f}: shard named in {index.name} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise RingllmError(f"{model_dir}: no *.safetensors files (and no model.safetensors.index.json)")
    return files


def index_checkpoint(model_dir: Path) -> dict[str, TensorExtent]:
    """Every tensor of the checkpoint by name; a name found in two shards is an error."""
    tensors: dict[str, TensorExtent] = {}
    for shard in shard_files(model_dir):
        for name, extent in read_safetensors_header(shard).items():
            if name in tensors:
                raise RingllmError(
                    f"{shard}: tensor {name} is duplicated (also in {os.path.basename(tensors[name].path)})")
            tensors[name] = extent
    return tensors
