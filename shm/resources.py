"""Names, ownership and sweeping of a run's shared resources (one shm segment, a few queues).

Every name carries the run id `<supervisor pid>-<random hex>`, so two runs never collide. The
supervisor writes a manifest `/dev/shm/ringllm-<run id>.manifest` (JSON: its pid, its parent's pid,
segments, queues)
before creating anything; the manifest is removed last. `/dev/mqueue` is usually not mounted, so
the manifest is the only way a later run can find the queues a killed run left behind: `sweep()`
unlinks everything listed in the manifests of runs whose supervisor is gone.

A supervisor holds an exclusive flock on its manifest for as long as it lives (the kernel drops it
when the process ends, however it ends), and that lock is what tells a live run: processes that
share /dev/shm but not a pid namespace (containers) cannot judge each other's pids. A manifest
without "locked" was written by an earlier ringllm, which took no lock: only its pid can tell.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import posix_ipc

SHM_DIR = Path("/dev/shm")
PREFIX = "ringllm-"


def new_run_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class RunNames:
    run_id: str
    num_loaders: int
    gpus: int = 1                      # GPU processes (tensor-parallel ranks), one queue each
    segment: str = field(init=False)
    stats_segment: str = field(init=False)
    sup_queue: str = field(init=False)
    coord_queue: str = field(init=False)
    gpu_queues: list[str] = field(init=False)
    loader_queues: list[str] = field(init=False)
    _manifest_lock: object = field(default=None, init=False, repr=False)   # the open manifest, locked

    def __post_init__(self):
        if self.gpus < 1:
            raise ValueError(f"a run needs at least one GPU process, not {self.gpus}")
        base = f"/{PREFIX}{self.run_id}"
        self.segment = base + "-ring"
        self.stats_segment = base + "-stats"
        self.sup_queue = base + "-sup"
        self.coord_queue = base + "-coord"
        # rank 0 keeps the one-GPU name, so `gpu_queue` means rank 0's in every run
        self.gpu_queues = [base + "-gpu"] + [f"{base}-gpu{r}" for r in range(1, self.gpus)]
        self.loader_queues = [f"{base}-load{i}" for i in range(self.num_loaders)]

    @property
    def gpu_queue(self) -> str:
        """Rank 0's queue (the only one with one GPU process)."""
        return self.gpu_queues[0]

    @property
    def queues(self) -> list[str]:
        """Every queue of the run: the manifest lists them all, so a sweep unlinks them all."""
        return [self.sup_queue, self.coord_queue, *self.gpu_queues, *self.loader_queues]

    @property
    def segments(self) -> list[str]:
        return [self.segment, self.stats_segment]

    @property
    def manifest_path(self) -> Path:
        return SHM_DIR / f"{PREFIX}{self.run_id}.manifest"

    def write_manifest(self) -> None:
        """Write the manifest and keep it open under an exclusive flock until remove_manifest()
        or this process's end. Locked before the rename: a manifest a sweep can see is locked."""
        tmp = self.manifest_path.with_suffix(".tmp")
        lock = open(tmp, "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(json.dumps({"pid": os.getpid(), "parent": os.getppid(), "segments": self.segments,
                               "queues": self.queues, "locked": True}))
        lock.flush()
        tmp.rename(self.manifest_path)
        self._manifest_lock = lock

    def remove_manifest(self) -> None:
        """Remove the manifest (the run's last resource), then let its lock go."""
        self.manifest_path.unlink(missing_ok=True)
        if self._manifest_lock is not None:
            self._manifest_lock.close()
            self._manifest_lock = None


def unlink_all(segments: list[str], queues: list[str]) -> list[str]:
    """Unlink what exists; return the names actually removed."""
    removed = []
    for names, unlink in ((segments, posix_ipc.unlink_shared_memory), (queues, posix_ipc.unlink_message_queue)):
        for name in names:
            try:
                unlink(name)
                removed.append(name)
            except posix_ipc.ExistentialError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _manifest_locked(manifest: Path) -> bool:
    """Whether a live supervisor holds the manifest's lock (RunNames.write_manifest)."""
    try:
        with open(manifest) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:          # gone: its run removed it as it ended
        return False
    return False


def _run_alive(manifest: Path, info: dict | None) -> bool:
    if _manifest_locked(manifest):
        return True
    if info is not None and not info.get("locked"):     # an earlier ringllm's: no lock to judge by
        return _pid_alive(int(info.get("pid", 0)))
    return False


def sweep(include_live: bool = False) -> list[str]:
    """Remove the resources of runs whose supervisor is dead (or of every run, with include_live)."""
    removed = []
    for manifest in sorted(SHM_DIR.glob(f"{PREFIX}*.manifest")):
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError):
            info = None
        if not include_live and _run_alive(manifest, info):
            continue
        if info is not None:
            removed += unlink_all(info.get("segments", []), info.get("queues", []))
        manifest.unlink(missing_ok=True)
        removed.append(str(manifest))
    return removed


def orphan_processes() -> list:
    """ringllm children whose supervisor is gone (re-parented to init or a subreaper)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["name", "ppid"]):
        name = proc.info["name"] or ""
        if name.startswith("ringllm-") and name != "ringllm-sup":
            try:
                parent = proc.parent()
            except psutil.Error:
                continue
            if parent is None or not (parent.name() or "").startswith(("python", "ringllm")):
                out.append(proc)
    return out


def leftover_names() -> list[str]:
    """Everything of ours visible in /dev/shm (segments and manifests); for tests and `cleanup`."""
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}*"))


def run_id_of(name: str) -> str | None:
    """The run id `<pid>-<hex>` inside a /dev/shm name of ours (segment or manifest)."""
    parts = name.removeprefix(PREFIX).split(".")[0].split("-")
    return "-".join(parts[:2]) if len(parts) >= 2 and parts[0].isdigit() else None


def read_manifest(run_id: str) -> dict | None:
    try:
        return json.loads((SHM_DIR / f"{PREFIX}{run_id}.manifest").read_text())
    except (OSError, ValueError):
        return None


def system_pinned_bytes() -> int | None:
    """Bytes of user memory pinned by drivers right now, machine-wide: the kernel's FOLL_PIN
    counters in /proc/vmstat (pin_user_pages, which cudaHostRegister uses in current NVIDIA
    drivers, moves them; VmLck does not). None where the kernel does not keep them."""
    counts = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in ("nr_foll_pin_acquired", "nr_foll_pin_released"):
                    counts[key] = int(value)
    except OSError:
        return None
    if len(counts) != 2:
        return None
    return (counts["nr_foll_pin_acquired"] - counts["nr_foll_pin_released"]) * os.sysconf("SC_PAGE_SIZE")


def pinned_above(baseline: int, settle_s: float = 2.0) -> int:
    """Machine-wide pinned bytes above `baseline`, given up to `settle_s` to fall back: a GPU
    driver returns a dead process's last pinned pages from its own deferred work, a moment after
    the process has been reaped."""
    deadline = time.monotonic() + settle_s
    while True:
        above = max(0, (system_pinned_bytes() or 0) - baseline)
        if above == 0 or time.monotonic() >= deadline:
            return above
        time.sleep(0.05)
