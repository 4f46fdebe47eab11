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

WeightWarmer: a supervisor thread that reads, from the run's start, what the GPU process will
read for itself (embeddings, lm_head, the GPU-resident layers) into the page cache. The GPU
process can read nothing before it runs (torch's import and CUDA's start: 18-22 s of a 22-layer
start on one H200 while the loaders filled the ring), and it found the disk idle for 3.3 s after
the fill, then read 21 GB while the first token waited (33.4 s against 24.9 s of disk reading).
Warmed, those bytes are read while the GPU process starts, and it then reads them buffered
(from the cache) instead of O_DIRECT (which would go to the disk again). When the GPU process
reports Ready it has read them all: the cache is given back (POSIX_FADV_DONTNEED), only the pages
the warmer read in: mincore(2) says, before each read, which pages were already cached (another
ringllm on the same checkpoint, a user who pre-read it), and those stay. Where the kernel hides a
file's cache state (since Linux 5.2, from a caller that neither owns the file nor may write it),
mincore shows those pages as absent and they are dropped as before: the warmer never keeps more
than it was allowed to bring in.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import mmap
import os
import re
import threading
import time
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


WARM_PIECE = 8 << 20       # bytes per buffered read: the kernel's readahead grows to meet it
WARM_THREADS = 2           # beside the loaders' queues; more only splits the same disk


# mincore's byte for a page: bit 0 set when it is in the page cache. Pages not cached, as b"\0".
_CACHED = bytes(1 if b & 1 else 0 for b in range(256))
_NOT_CACHED_RUN = re.compile(rb"\0+")


def uncached_ranges(fd: int, offset: int, nbytes: int) -> list[tuple[int, int]]:
    """(start, length) of the pages holding bytes offset..offset+nbytes of an open file that are
    not in the page cache now (mincore); the whole span, page-aligned, where it cannot be asked."""
    start = offset - offset % mmap.PAGESIZE
    length = offset + nbytes - start
    try:
        # a private mapping that is never touched: ctypes can address it, nothing is read or written
        with mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=start) as mapped:
            vec = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
            anchor = ctypes.c_char.from_buffer(mapped)
            try:
                asked = _mincore(ctypes.addressof(anchor), length, vec) == 0
            finally:
                del anchor            # the mapping cannot close while ctypes holds it
    except (OSError, ValueError):     # past the end of the file, a file mmap refuses
        asked = False
    if not asked:
        return [(start, length)]
    return [(start + m.start() * mmap.PAGESIZE, (m.end() - m.start()) * mmap.PAGESIZE)
            for m in _NOT_CACHED_RUN.finditer(vec.raw.translate(_CACHED))]


_mincore = ctypes.CDLL(None, use_errno=True).mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


class WeightWarmer(threading.Thread):
    """Reads `extents` (checkpoint.safetensors_index.TensorExtent) into the page cache in their
    order, WARM_PIECE at a time by `threads` threads. Best effort: a file that fails to read is
    skipped (the GPU process reads it again and names the error). release() stops it and drops
    from the cache the pages it read in (read_in), not those that were cached before it read."""

    def __init__(self, extents: list, threads: int = WARM_THREADS):
        super().__init__(name="ringllm-warm", daemon=True)
        self.extents = list(extents)
        self.threads = max(1, threads)
        self.stop = threading.Event()
        self.bytes_read = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._lock = threading.Lock()
        self.read_in: list[tuple[str, int, int]] = []     # (path, start, length): pages it reads in
        self._pieces = iter([(e.path, at, min(WARM_PIECE, e.offset + e.nbytes - at))
                             for e in self.extents for at in range(e.offset, e.offset + e.nbytes, WARM_PIECE)])

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.extents)

    def run(self) -> None:
        self.started_at = time.monotonic()
        self._note_uncached()
        workers = [threading.Thread(target=self._read_pieces, name=f"ringllm-warm{i}", daemon=True)
                   for i in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.finished_at = time.monotonic()

    def _note_uncached(self) -> None:
        """What of the extents is not in the page cache, asked before the first read: asked per
        piece, the kernel's readahead of the pieces before would count as someone else's."""
        read_in = []
        for path in dict.fromkeys(e.path for e in self.extents):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue          # not read either
            try:
                read_in += [(path, start, length) for e in self.extents if e.path == path
                            for start, length in uncached_ranges(fd, e.offset, e.nbytes)]
            finally:
                os.close(fd)
        with self._lock:
            self.read_in = read_in

    def _read_pieces(self) -> None:
        buf = bytearray(WARM_PIECE)
        fds: dict[str, int | None] = {}
        try:
            while not self.stop.is_set():
                with self._lock:       # pieces go out in order: the GPU process reads in that order
                    piece = next(self._pieces, None)
                if piece is None:
                    return
                path, offset, nbytes = piece
                if path not in fds:
                    try:
                        fds[path] = os.open(path, os.O_RDONLY)
                    except OSError:
                        fds[path] = None
                if fds[path] is None:
                    continue
                try:
                    n = os.preadv(fds[path], [memoryview(buf)[:nbytes]], offset)
                except OSError:
                    continue
                with self._lock:
                    self.bytes_read += n
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)

    def release(self) -> None:
        """Stop reading, and drop the pages it read in from the page cache: its reader is done
        with them (or the run is over), and they would only crowd the ring's DRAM. Pages that
        were cached before it read them are someone else's, and stay."""
        self.stop.set()
        if self.is_alive():
            self.join(timeout=5.0)
        if not hasattr(os, "posix_fadvise"):
            return
        with self._lock:
            read_in, self.read_in = self.read_in, []
        for path, start, length in read_in:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def report(self) -> dict:
        """For --metrics-json's startup object (monotonic stamps; startup_phases makes them relative)."""
        return {"started_at": self.started_at, "finished_at": self.finished_at,
                "bytes": self.bytes_read, "planned_bytes": self.nbytes}


def start_weight_warmer(layout, resident_layers: int | None, spare_dram: int) -> WeightWarmer | None:
    """At a run's start: the warmer over what the GPU process reads itself (ModelLayout.resident_extents
    for the estimated GPU-resident layers; the head alone when the estimate is unknown), if those
    bytes fit in `spare_dram` (the DRAM the ring leaves): a page cache evicted before its reader
    comes would only read them twice. RINGLLM_NO_PREFETCH=1 turns it off with the library prefetch."""
    if os.environ.get("RINGLLM_NO_PREFETCH") == "1":
        return None
    warmer = WeightWarmer(layout.resident_extents(max(0, resident_layers or 0)))
    if warmer.nbytes > spare_dram:
        log.debug("warm: %.2f GB of GPU-resident weights would not fit the %.2f GB of DRAM the ring leaves; "
                  "the GPU process reads them itself", warmer.nbytes / 1e9, spare_dram / 1e9)
        return None
    warmer.start()
    return warmer
