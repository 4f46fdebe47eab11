"""What the supervisor checks before a run and reports after it: does the ring fit in DRAM and in
/dev/shm (`check_dram`), what each process used (`process_memory`), and the end-of-run warning
about O_DIRECT reads that fell back to buffered ones (`fallback_warning`), and the memory the
run's processes held while it ran (`MemoryWatch`)."""
from __future__ import annotations

import os
import shutil
import time

import psutil

from ringllm.checkpoint.errors import RingllmError
from ringllm.config import DRAM_HEADROOM, EngineConfig
from ringllm.shm.resources import SHM_DIR, pinned_above, system_pinned_bytes


def process_memory(pid: int) -> dict[str, int]:
    """RSS, VmLck (mlock) and VmPin (pages pinned by drivers that account for them) in bytes."""
    fields = {"VmRSS": "rss", "VmLck": "locked", "VmPin": "pinned"}
    out = dict.fromkeys(fields.values(), 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = fields.get(line.split(":", 1)[0])
                if key:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def check_dram(total: int, engine: EngineConfig, headroom: int = DRAM_HEADROOM) -> None:
    """Before allocating anything: the ring must fit in available DRAM beside `headroom`
    (config.dram_headroom: more with tensor-parallel ranks) and in /dev/shm."""
    available = psutil.virtual_memory().available
    gib = 2 ** 30
    if total + headroom > available:
        raise RingllmError(
            f"the ring needs {total / gib:.2f} GiB (CPU_CAP_VALUE={engine.cpu_cap} slots) but only "
            f"{available / gib:.2f} GiB of DRAM is available (keeping {round(headroom / gib, 1):g} GiB free"
            f"{' for the run and its ranks' if headroom > DRAM_HEADROOM else ''}); lower CPU_CAP_VALUE")
    shm_free = shutil.disk_usage(SHM_DIR).free
    if total > shm_free:
        raise RingllmError(
            f"the ring needs {total / gib:.2f} GiB but {SHM_DIR} has {shm_free / gib:.2f} GiB free; "
            "lower CPU_CAP_VALUE or enlarge /dev/shm")


def spare_dram(ring_total: int, headroom: int = DRAM_HEADROOM, limit: int | None = None) -> int:
    """DRAM left beside the ring (counted whole, faulted or not) and the headroom, and within
    --dram-limit (`limit`, which the ring and this share): what the page cache may take at start
    without pushing anything out (supervisor.prefetch.WeightWarmer)."""
    spare = psutil.virtual_memory().available - ring_total - headroom
    if limit is not None:
        spare = min(spare, limit - ring_total)
    return max(0, spare)


def fallback_warning(coordinator: dict) -> str | None:
    """The end-of-run warning when O_DIRECT reads fell back to buffered ones on files that had
    accepted O_DIRECT at open (a refused read: misaligned), else None. Files whose file system
    refuses O_DIRECT at open (tmpfs) are expected to read buffered and are reported at open."""
    n = coordinator.get("direct_fallback_chunks") or 0
    if not n:
        return None
    return (f"{n} chunk(s) were read with buffered I/O because O_DIRECT refused the read, on file(s) that "
            "accepted O_DIRECT at open (a misaligned read; the loader log names the file). Tokens are not "
            "affected, but each such byte is copied once more, through the page cache, whose pages then "
            "compete with the ring for DRAM, and the disk is read below its O_DIRECT rate")


class MemoryWatch:
    """What the run's processes hold, for --metrics-json: each process's peak RSS, VmLck and VmPin
    (sampled at most once a second), and on a GPU the machine-wide pinned bytes above the level
    before the run (RunResult.pinned_peak_bytes, pinned_left_bytes)."""

    def __init__(self, result, cuda: bool):
        self.result, self.cuda = result, cuda
        self.sampled_at = 0.0
        self.pinned_before: int | None = None

    def begin(self) -> None:
        self.pinned_before = system_pinned_bytes()

    def sample(self, procs: dict, force: bool = False) -> None:
        now = time.monotonic()
        if now - self.sampled_at < 1.0 and not force:
            return
        self.sampled_at = now
        for key, proc in [("supervisor", None), *procs.items()]:
            pid = os.getpid() if proc is None else proc.pid
            mem = process_memory(pid)
            entry = self.result.processes.setdefault(key, {"pid": pid, "peak_rss": 0, "peak_locked": 0,
                                                           "peak_pinned": 0})
            entry["pid"] = pid
            entry["peak_rss"] = max(entry["peak_rss"], mem["rss"])
            entry["peak_locked"] = max(entry["peak_locked"], mem["locked"])
            entry["peak_pinned"] = max(entry["peak_pinned"], mem["pinned"])
        self.account_pinned()

    def account_pinned(self, final: bool = False) -> None:
        """Machine-wide pinned bytes against the level before the run (other pinning on the
        machine shows up too; the GPU machines we verify on run nothing else). Only on a GPU: on
        the cpu the run registers nothing, and the machine-wide count moves with other programs'
        O_DIRECT reads (they pin pages while they run), which would be no news of ours."""
        if not self.cuda:
            return
        now = system_pinned_bytes()
        if now is None or self.pinned_before is None:
            return
        above = max(0, now - self.pinned_before)
        self.result.pinned_peak_bytes = max(self.result.pinned_peak_bytes or 0, above)
        if final:   # give the driver its moment to return the last pages
            self.result.pinned_left_bytes = pinned_above(self.pinned_before) if above else 0
