"""supervisor.prefetch: torch's libraries found without importing torch, and a file evicted from
the page cache is resident again after the prefetcher ran (the kernel's mincore says so)."""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

from ringllm.supervisor.prefetch import LibraryPrefetcher, torch_library_files


def resident_fraction(path: Path) -> float:
    size = path.stat().st_size
    # a private mapping (never written, so nothing reaches the file) that ctypes can address
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            assert libc.mincore(base, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            del base
        return sum(b & 1 for b in vec.raw) / pages


def test_torch_libraries_are_found_largest_first():
    import torch

    files = torch_library_files(cuda=False)
    lib = Path(torch.__file__).parent / "lib"
    shared = sorted(p for p in lib.iterdir() if p.suffix == ".so" or ".so." in p.name)
    assert shared and set(shared) <= set(files)
    sizes = [f.stat().st_size for f in files]
    assert sizes == sorted(sizes, reverse=True)
    assert any(f.suffix == ".pyc" for f in files)


def test_an_evicted_file_is_resident_after_the_prefetch(tmp_path):
    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(32 << 20))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # clean pages: the kernel drops them
    finally:
        os.close(fd)
    before = resident_fraction(f)
    if before > 0.5:
        import pytest
        pytest.skip(f"this file system keeps the file cached after DONTNEED ({before:.0%} resident)")
    p = LibraryPrefetcher([f, tmp_path / "missing.so"])
    p.start()
    p.join(timeout=30)
    assert not p.is_alive() and p.files_done == 1 and p.bytes_asked == 32 << 20
    deadline = time.monotonic() + 10              # the readahead the thread asked for lands
    while resident_fraction(f) < 0.9 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resident_fraction(f) >= 0.9, f"{resident_fraction(f):.0%} resident after the prefetch (before: {before:.0%})"
