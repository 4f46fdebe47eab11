"""supervisor.prefetch: torch's libraries found without importing torch, and a file evicted from
the page cache is resident again after the prefetcher ran (the kernel's mincore says so); the
weight warmer's ranges are resident after it ran and evicted after its release, and what it
warms is every tensor the GPU process reads itself, in its order."""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest

from ringllm.checkpoint.layout import load_layout
from ringllm.checkpoint.safetensors_index import TensorExtent, read_safetensors_header
from ringllm.supervisor.prefetch import LibraryPrefetcher, WeightWarmer, torch_library_files
from tests.conftest import make_model_dir


def page_residency(path: Path) -> bytes:
    """mincore's vector for the whole file: one byte a page, bit 0 set when it is in the page cache."""
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
        return vec.raw


def resident_fraction(path: Path, start: int = 0, end: int | None = None) -> float:
    """The fraction of the pages of bytes start..end (default: the whole file) in the page cache."""
    vec = page_residency(path)[start // mmap.PAGESIZE:None if end is None else -(-end // mmap.PAGESIZE)]
    return sum(b & 1 for b in vec) / len(vec)


def evicted(path: Path) -> float:
    """Drop the file's clean pages; what is still resident (some file systems keep them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


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
    before = evicted(f)
    if before > 0.5:
        pytest.skip(f"this file system keeps the file cached after DONTNEED ({before:.0%} resident)")
    p = LibraryPrefetcher([f, tmp_path / "missing.so"])
    p.start()
    p.join(timeout=30)
    assert not p.is_alive() and p.files_done == 1 and p.bytes_asked == 32 << 20
    deadline = time.monotonic() + 10              # the readahead the thread asked for lands
    while resident_fraction(f) < 0.9 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resident_fraction(f) >= 0.9, f"{resident_fraction(f):.0%} resident after the prefetch (before: {before:.0%})"


def test_the_warmer_caches_its_ranges_in_order_and_its_release_drops_them(tmp_path, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(48 << 20))
    before = evicted(f)
    if before > 0.5:
        pytest.skip(f"this file system keeps the file cached after DONTNEED ({before:.0%} resident)")
    mib = 1 << 20
    # two tensors, the second first in the file: the warmer follows the list, not the file
    extents = [TensorExtent("b", str(f), 30 * mib + 100, 17 * mib, "BF16", (17 * mib // 2,)),
               TensorExtent("a", str(f), 4096 + 7, 9 * mib, "BF16", (9 * mib // 2,))]
    reads, real_preadv = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append(off) or real_preadv(fd, bufs, off))
    w = WeightWarmer(extents, threads=1)
    w.start()
    w.join(timeout=30)
    assert not w.is_alive() and w.bytes_read == w.nbytes == 26 * mib
    assert reads[0] == 30 * mib + 100 and reads[-1] > 4096 and reads.index(4096 + 7) == 3   # 17 MiB: 3 pieces first
    for e in extents:
        assert resident_fraction(f, e.offset, e.offset + e.nbytes) >= 0.99, e.name
    w.release()
    for e in extents:
        assert resident_fraction(f, e.offset, e.offset + e.nbytes) <= 0.01, e.name
    assert w.report()["bytes"] == 26 * mib and w.report()["finished_at"] >= w.report()["started_at"]


def test_the_warmer_skips_what_it_cannot_read_and_stops_when_released(tmp_path):
    missing = TensorExtent("x", str(tmp_path / "gone.safetensors"), 0, 1 << 20, "BF16", (1 << 19,))
    w = WeightWarmer([missing])
    w.start()
    w.join(timeout=10)
    assert not w.is_alive() and w.bytes_read == 0
    w.release()                 # nothing to drop, no error
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (64 << 20))
    w = WeightWarmer([TensorExtent("y", str(big), 0, 64 << 20, "BF16", (32 << 20,))] * 50, threads=1)
    w.start()
    w.release()                 # 3.2 GB asked: the release does not wait for it
    assert not w.is_alive() and w.bytes_read < w.nbytes


def test_what_is_warmed_is_every_tensor_the_gpu_process_reads_itself_in_its_order(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=3, tie_word_embeddings=False)
    layout = load_layout(d)
    # the checkpoint's own headers, not the layout, say which tensors exist
    names = {n for shard in d.glob("*.safetensors") for n in read_safetensors_header(shard)}
    warmed = [e.name for e in layout.resident_extents(3)]
    assert len(warmed) == len(set(warmed)) and set(warmed) == names
    assert warmed[:3] == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    layer_of = [int(n.split(".")[2]) for n in warmed[3:]]
    assert layer_of == sorted(layer_of)                      # layer by layer, as load_groups reads
    first = [e.name for e in layout.resident_extents(1)]
    assert first == warmed[:len(first)] and all(".layers.0." in n for n in first[3:])
    # the attention group (input norm, q/k/v/o) before the FFN group (post-attention norm, MLP)
    is_attn = [("self_attn" in n or "input_layernorm" in n) for n in first[3:]]
    assert is_attn == sorted(is_attn, reverse=True) and any(is_attn) and not all(is_attn)


def settle_page_cache(f: Path, timeout_s: float = 10.0) -> None:
    """Waits until the file's cached pages stop changing (asynchronous readahead lands after the
    read that started it returns), so that a drop now is not undone by reads still in flight."""
    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        now = resident_fraction(f, 0)
        if now == last:
            return
        last = now
        time.sleep(0.1)


def test_the_warmers_release_keeps_the_pages_that_were_cached_before_it(tmp_path):
    """Pages of the checkpoint that something else had in the page cache (a second ringllm on the
    same model, a user who pre-read it) stay there: the release drops only what the warmer read in."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(24 << 20))
    before = evicted(f)
    if before > 0.5:
        pytest.skip(f"this file system keeps the file cached after DONTNEED ({before:.0%} resident)")
    mib = 1 << 20
    with open(f, "rb") as other_reader:         # someone else's read of the first 10 MiB, and none of the rest
        os.posix_fadvise(other_reader.fileno(), 0, 0, os.POSIX_FADV_RANDOM)     # no readahead past it
        other_reader.read(10 * mib)
    settle_page_cache(f)
    assert resident_fraction(f, 0, 10 * mib) >= 0.99 and resident_fraction(f, 10 * mib) <= 0.01
    w = WeightWarmer([TensorExtent("w", str(f), 4096 + 7, 20 * mib, "BF16", (10 * mib,))], threads=2)
    w.start()
    w.join(timeout=30)
    assert not w.is_alive() and w.bytes_read == 20 * mib
    assert resident_fraction(f, 4096 + 7, 4096 + 7 + 20 * mib) >= 0.99
    settle_page_cache(f)     # the readahead of the warmer's last reads may still be landing
    w.release()
    assert resident_fraction(f, 0, 10 * mib) >= 0.99, "the release dropped pages it had not read in"
    assert resident_fraction(f, 10 * mib + mmap.PAGESIZE, 4096 + 7 + 20 * mib) <= 0.01


def test_the_warmer_stays_within_dram_limit(tmp_path):
    """--dram-limit is DRAM for the ring and the warmer's page cache together (issue #23 item
    13): a model whose embeddings and lm_head (8 MiB) the limit's room beside the ring cannot
    hold is not warmed; without the limit the same run warms them."""
    import json
    import subprocess
    import sys

    model = make_model_dir(tmp_path / "m", vocab_size=16384, num_hidden_layers=2)
    head_bytes = 2 * 16384 * 64 * 4      # embed_tokens + lm_head, float32
    common = [sys.executable, "-m", "ringllm", "generate", "--model", str(model), "--device", "cpu",
              "--prompt", "w5 w6", "--no-chat", "--max-new-tokens", "2", "--loaders", "1"]

    def warmed(*extra) -> dict | None:
        out = tmp_path / f"metrics{len(extra)}.json"
        run = subprocess.run([*common, "--metrics-json", str(out), *extra], capture_output=True, text=True,
                             timeout=180, env={**os.environ, "RINGLLM_NO_PREFETCH": "0"})
        assert run.returncode == 0, run.stderr
        return json.loads(out.read_text())["startup"].get("warm")

    free = warmed()
    assert free is not None and free["bytes"] >= head_bytes, free
    assert warmed("--dram-limit", "4MiB") is None      # the ring's slots (~0.1 MiB) + 8 MiB > 4 MiB
