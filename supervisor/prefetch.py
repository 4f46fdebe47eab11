"""LibraryPrefetcher: a supervisor thread that asks the kernel to read torch's (and CUDA's)
libraries into the page cache as a run starts.

The command never imports torch for a streaming run; the GPU process does, and CUDA loads its
libraries at first use. With the page cache cold those reads (GBs of shared objects, thousands
of small compiled Python files, each read as it is faulted in) race the loaders' deep O_DIRECT
queues for the disk and lose: on the 4-GPU H200 host the GPU process took 40.9 s to start during
an 80-layer fill (about 6 s with the disk idle). posix_fadvise(WILLNEED) queues each file's
readahead at the start, before the loaders' reads pile up, and returns; the
import then finds its pages resident. Files already cached cost nothing; on a disk that can't
keep up both ways this only moves those bytes earlier, and they must be read anyway.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("ringllm")
LIBRARY_SUFFIXES = (".so", ".pyc")
# The kernel reads at most its readahead window per WILLNEED (a 32 MiB file asked whole came in
# at 25% here): ask window by window. 128 KiB is the smallest default window; the calls only
# queue I/O, 8 per MiB.
ADVICE_CHUNK = 128 << 10


def torch_library_files(cuda: bool) -> list[Path]:
    """What the GPU process's torch import (and, on cuda, CUDA's start) reads: torch's shared
    objects and compiled modules; with cuda the NVIDIA wheels' libraries beside it. Found without
    importing torch. Largest first: the shared objects are the bulk of the bytes."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    roots = [Path(p) for p in spec.submodule_search_locations]
    if cuda:
        roots += [r.parent / "nvidia" for r in roots if (r.parent / "nvidia").is_dir()]
    files = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            files += [Path(dirpath) / n for n in names if n.endswith(LIBRARY_SUFFIXES) or ".so." in n]
    sized = []
    for f in files:
        try:
            sized.append((f.stat().st_size, f))
        except OSError:
            pass
    return [f for _, f in sorted(sized, key=lambda sf: -sf[0])]


class LibraryPrefetcher(threading.Thread):
    """files: what to read ahead; None: torch's libraries (torch_library_files), listed on the
    thread so that the run's start waits for nothing."""

    def __init__(self, files: list[Path] | None, cuda: bool = False):
        super().__init__(name="ringllm-prefetch", daemon=True)
        self.files, self.cuda = files, cuda
        self.stop = threading.Event()
        self.files_done = 0
        self.bytes_asked = 0

    def run(self) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        if self.files is None:
            self.files = torch_library_files(self.cuda)
        for path in self.files:
            if self.stop.is_set():
                return
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                for offset in range(0, size, ADVICE_CHUNK):
                    if self.stop.is_set():
                        break
                    os.posix_fadvise(fd, offset, ADVICE_CHUNK, os.POSIX_FADV_WILLNEED)
                self.bytes_asked += size
            except OSError:
                pass
            finally:
                os.close(fd)
            self.files_done += 1
        log.debug("prefetch: readahead asked for %d files, %.2f GB", self.files_done, self.bytes_asked / 1e9)


def start_library_prefetch(device: str) -> LibraryPrefetcher | None:
    """At a run's start: the prefetch thread over torch's libraries (and CUDA's on cuda). It only
    queues readahead and ends by itself; RINGLLM_NO_PREFETCH=1 turns it off (a benchmark's A/B)."""
    if os.environ.get("RINGLLM_NO_PREFETCH") == "1":
        return None
    prefetcher = LibraryPrefetcher(None, cuda=device == "cuda")
    prefetcher.start()
    return prefetcher
