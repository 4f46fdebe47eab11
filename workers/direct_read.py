"""Parallel O_DIRECT reads of tensors into host tensors: how the GPU process loads what stays on
the GPU (embeddings, lm_head, the GPU-resident layers) while the loaders fill the ring.

One thread reading buffered managed 0.76 GB/s on an H200 host whose disk gives 1.3-1.8 GB/s, and
the resident layers (17 GB of a 22-layer 70B) arrived 13 s after the ring was full: the first
token waited for them. Here each tensor is cut into pieces read by `threads` threads with
O_DIRECT, the same path as the loaders' (no page-cache copy, no page cache filled with weights
that live on the GPU). O_DIRECT needs file offset, length and buffer aligned: a piece is read
as its aligned cover into an aligned per-thread bounce buffer, and its bytes are copied out.
Files whose file system refuses O_DIRECT (tmpfs) are read buffered, the same way; so is
everything when the caller asks (direct=False): bytes the supervisor warmed into the page cache
(supervisor.prefetch.WeightWarmer), which O_DIRECT would fetch from the disk again.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.safetensors_index import TensorExtent

ALIGN = 4096
PIECE = 16 << 20


def _open(path: str, direct: bool = True) -> tuple[int, bool]:
    if not direct:
        return os.open(path, os.O_RDONLY), False
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return os.open(path, os.O_RDONLY), False


class _Reader:
    """One thread's bounce buffer and file descriptors."""

    def __init__(self, direct: bool = True):
        self.direct = direct
        self.bounce = mmap.mmap(-1, PIECE + 2 * ALIGN)     # page-aligned
        self.view = memoryview(self.bounce)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.bounce))   # the mapping never moves
        self.fds: dict[str, tuple[int, bool]] = {}

    def read(self, path: str, offset: int, nbytes: int, dst_address: int) -> None:
        if path not in self.fds:
            self.fds[path] = _open(path, self.direct)
        fd, direct = self.fds[path]
        start = offset - offset % ALIGN if direct else offset
        end = -(-(offset + nbytes) // ALIGN) * ALIGN if direct else offset + nbytes
        done = 0
        while start + done < offset + nbytes:
            try:
                n = os.preadv(fd, [self.view[done:end - start]], start + done)
            except OSError as err:
                if err.errno == errno.EINVAL and direct:    # refused after all: buffered
                    os.close(fd)
                    self.fds[path] = (os.open(path, os.O_RDONLY), False)
                    return self.read(path, offset, nbytes, dst_address)
                raise
            if n <= 0:
                raise EOFError(start + done)
            done += n
        ctypes.memmove(dst_address, self.base + offset - start, nbytes)

    def close(self) -> None:
        for fd, _ in self.fds.values():
            os.close(fd)
        self.view.release()
        self.bounce.close()


class ParallelReader:
    """`threads` readers, each with its bounce buffer and open files, kept for as many `read`
    calls as the caller makes (a layer at a time: fresh bounce buffers per layer would be
    first-touched memory again). direct=False: buffered reads (see the module page)."""

    def __init__(self, threads: int, direct: bool = True):
        self.direct = direct
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ringllm-read")
        self.local = threading.local()
        self.readers: list[_Reader] = []
        self.lock = threading.Lock()

    def _work(self, piece) -> None:
        extent, at, nbytes, address = piece
        reader = getattr(self.local, "reader", None)
        if reader is None:
            reader = self.local.reader = _Reader(self.direct)
            with self.lock:
                self.readers.append(reader)
        try:
            reader.read(extent.path, extent.offset + at, nbytes, address)
        except EOFError:
            raise RingllmError(f"{extent.path}: unexpected end of file reading tensor {extent.name}") from None
        except OSError as err:
            raise RingllmError(f"{extent.path}: read error in tensor {extent.name} "
                               f"({err.strerror or err})") from None

    def read(self, items: list[tuple[TensorExtent, torch.Tensor]]) -> None:
        """Read each extent's bytes into its contiguous uint8 CPU tensor (as long as the extent)."""
        pieces = []
        for extent, dst in items:
            if dst.numel() < extent.nbytes or not dst.is_contiguous():
                raise ValueError(f"buffer for tensor {extent.name} is too small or not contiguous")
            for at in range(0, extent.nbytes, PIECE):
                pieces.append((extent, at, min(PIECE, extent.nbytes - at), dst.data_ptr() + at))
        futures = [self.pool.submit(self._work, p) for p in pieces]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:      # a failing disk: do not read the rest first
                future.cancel()
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> "ParallelReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensors(items: list[tuple[TensorExtent, torch.Tensor]], threads: int, direct: bool = True) -> None:
    """One ParallelReader's read of `items`."""
    with ParallelReader(threads, direct) as reader:
        reader.read(items)
