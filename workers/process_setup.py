"""What every ringllm child process does first: name itself, die with its parent, leave Ctrl-C
to the supervisor, and log to stderr with its role. Also: how many CPU threads torch may use."""
from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
from pathlib import Path

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def set_process_name(name: str) -> None:
    """Set /proc/self/comm (what `ps` and `top` show); the kernel keeps 15 characters."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class ParentGone(SystemExit):
    pass


_stop_requested = False


def _on_sigterm(signum, frame):
    # Remember it as well as raising: inside a message-queue wait posix_ipc replaces the
    # exception with SignalError, so loops also poll stop_requested().
    global _stop_requested
    _stop_requested = True
    sys.exit(143)


class sigterm_deferred:
    """A SIGTERM while this block runs is remembered and raised (SystemExit 143) when it ends.
    For torch's import: SystemExit raised inside Python code that C++ (pybind11) called aborts
    the process with "terminate called after throwing ... SystemExit" on stderr."""

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._remember)
        self.pending = False
        return self

    def _remember(self, signum, frame):
        global _stop_requested
        _stop_requested = self.pending = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)
        if self.pending and exc[0] is None:
            raise SystemExit(143)
        return False


def stop_requested() -> bool:
    return _stop_requested


def child_start(name: str, parent_pid: int, verbose: bool = False) -> None:
    set_process_name(name)
    # SIGINT reaches the whole foreground process group; the supervisor decides what happens.
    # The supervisor starts us with SIGINT blocked (supervisor._spawn), so a Ctrl-C during our
    # imports is pending, not a KeyboardInterrupt; ignoring it discards it, then we unblock.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # SIGTERM (from the supervisor, or from the kernel when the supervisor dies) -> SystemExit,
    # so that `finally` blocks run.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)      # [P16] die with the supervisor
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:    # the parent died before the death signal was armed
        raise ParentGone(1)
    configure_logging(f"[{name}] %(message)s", verbose)


def configure_logging(fmt: str, verbose: bool) -> None:
    """Our loggers (`ringllm.*`) at INFO (DEBUG with -v); every other library at WARNING. A root
    logger at INFO would print torch's INFO records too, e.g. the "FakeTensor cache stats" that
    torch._subclasses.fake_tensor logs from atexit when a run stops while torch is importing."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=fmt)
    logging.getLogger("ringllm").setLevel(logging.DEBUG if verbose else logging.INFO)


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


# --- torch's CPU threads ------------------------------------------------------------------------
# torch starts one intra-op thread per core of the machine, and OpenMP threads spin while they
# wait. Two runs on a 2-core machine then had 4 spinning threads on 2 cores (116-122 s each
# instead of about 8 s). The GPU process sizes torch to the CPUs this run may actually use.
RESERVED_CPUS = 1     # the coordinator, the loaders and the supervisor together: they mostly sleep
                      # in reads and queue waits (about 0.1 CPU on the demo model)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")   # a user's explicit choice; torch reads them


def torch_threads_for(affinity_cpus: int, quota_cpus: float | None) -> int:
    """Threads for torch: the CPUs in the affinity mask, capped by the cgroup quota (whole CPUs:
    a thread more than the quota is throttled), less RESERVED_CPUS; at least 1."""
    cpus = affinity_cpus
    if quota_cpus is not None:
        cpus = min(cpus, max(1, math.floor(quota_cpus)))
    return max(1, cpus - RESERVED_CPUS)


def _quota_v2(cgroup: Path) -> float | None:
    quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(cgroup: Path) -> float | None:
    quota = int((cgroup / "cpu.cfs_quota_us").read_text())
    return None if quota < 0 else quota / int((cgroup / "cpu.cfs_period_us").read_text())


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and its ancestors up to the mount; only the mount when the path is
    not visible here (a cgroup namespace shows its own root as "/")."""
    dirs = [mount / path.lstrip("/")]
    if not dirs[0].is_dir():
        return [mount]
    while dirs[-1] != mount:
        dirs.append(dirs[-1].parent)
    return dirs


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, the tightest along its path to the root
    (a parent's limit binds its children too); None when unlimited or unknown. cgroup v2 keeps it
    in cpu.max, v1 in the cpu controller's cpu.cfs_quota_us / cpu.cfs_period_us."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":                                  # v2: "0::/path"
            mounts = [(root, _quota_v2)]
        elif "cpu" in controllers.split(","):                  # v1: "3:cpu,cpuacct:/path"
            mounts = [(root / controllers, _quota_v1), (root / "cpu", _quota_v1)]
        else:
            continue
        for mount, read in mounts:
            if not mount.is_dir():
                continue
            for d in _cgroup_dirs(mount, path):
                try:
                    quota = read(d)
                except (OSError, ValueError):
                    continue
                if quota is not None:
                    limits.append(quota)
            break
    return min(limits, default=None)


def apply_torch_threads(torch, sharers: int = 1) -> int:
    """Size torch's intra-op threads for this run, unless the user chose (THREAD_ENV); return
    what torch uses. `sharers`: processes computing at once (tensor-parallel ranks), which split
    the CPUs between them (each with them all spun N times the threads the CPUs have)."""
    if not any(os.environ.get(var) for var in THREAD_ENV):
        torch.set_num_threads(max(1, torch_threads_for(len(os.sched_getaffinity(0)), cgroup_cpu_quota()) // sharers))
    return torch.get_num_threads()
