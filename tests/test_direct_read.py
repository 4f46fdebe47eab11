"""workers.direct_read: parallel O_DIRECT reads of tensor byte ranges (how the GPU process loads
what stays on the GPU), checked against plain buffered reads of the same ranges."""
from __future__ import annotations

import os
import random

import pytest
import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.safetensors_index import TensorExtent
from ringllm.workers import direct_read
from ringllm.workers.direct_read import read_tensors


def _extent(path, offset, nbytes, name="t"):
    return TensorExtent(name=name, path=str(path), offset=offset, nbytes=nbytes, dtype="U8", shape=(nbytes,))


@pytest.mark.parametrize("threads", [1, 3])
def test_unaligned_ranges_across_pieces_read_exactly(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(direct_read, "PIECE", 1 << 20)       # several pieces per tensor
    data = random.Random(threads).randbytes(5 * (1 << 20) + 777)
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    rng = random.Random(7)
    ranges = [(0, 10), (1, 4095), (4095, 2), (12345, 3 * (1 << 20) + 11), (len(data) - 999, 999)]
    ranges += [(o, rng.randrange(1, len(data) - o)) for o in (rng.randrange(len(data) - 1) for _ in range(6))]
    items = [(_extent(path, o, n), torch.empty(n, dtype=torch.uint8)) for o, n in ranges]
    read_tensors(items, threads)
    for (offset, nbytes), (_, dst) in zip(ranges, items):
        assert bytes(dst.tolist()) == data[offset:offset + nbytes], (offset, nbytes)


def test_a_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"x" * 10000)
    with pytest.raises(RingllmError, match=r"shard\.bin: unexpected end of file reading tensor model\.w"):
        read_tensors([(_extent(path, 8000, 4000, "model.w"), torch.empty(4000, dtype=torch.uint8))], 2)


def test_o_direct_is_used_where_the_file_system_allows_it(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"y" * 8192)
    fd, direct = direct_read._open(str(path))
    os.close(fd)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        expected = True
    except OSError:
        expected = False
    assert direct == expected
