"""`sweep()` judges a run alive by the lock its supervisor holds on the run's manifest, not by the
pid written in it (issue #23, item 14): containers that share /dev/shm but not a pid namespace
see each other's supervisor pids as dead (or as someone else), and unlinked each other's live rings.

A run of another pid namespace is played by a process that writes a manifest through RunNames
(the supervisor's own call) and keeps running, its manifest then naming a pid that means nothing
here. Each run owns a real shm segment, so what the sweep unlinks is seen from outside."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import posix_ipc
import pytest

from ringllm.shm import resources
from ringllm.shm.resources import RunNames

# Writes the manifest of a run and creates its segment, then holds on until stdin closes.
LIVE_RUN = """
import sys
import posix_ipc
from ringllm.shm.resources import RunNames
names = RunNames(sys.argv[1], 1)
names.write_manifest()
posix_ipc.SharedMemory(names.segment, posix_ipc.O_CREX, size=4096).close_fd()
print("ready", flush=True)
sys.stdin.read()
"""


def dead_pid() -> int:
    """A pid that no process here has any more (a reaped child's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def segment_exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name).close_fd()
        return True
    except posix_ipc.ExistentialError:
        return False


def set_manifest_pid(names: RunNames, pid: int) -> None:
    """Rewrite the pid in place (same file, so a lock on it stays), as another namespace's pid."""
    info = json.loads(names.manifest_path.read_text())
    info["pid"] = info["parent"] = pid
    with open(names.manifest_path, "r+") as f:
        f.write(json.dumps(info))
        f.truncate()


@pytest.fixture
def run_names():
    made = []

    def make(pid_part: int) -> RunNames:
        made.append(RunNames(f"{pid_part}-{secrets.token_hex(4)}", 1))
        return made[-1]
    yield make
    for names in made:
        resources.unlink_all(names.segments, names.queues)
        names.manifest_path.unlink(missing_ok=True)


def test_sweep_keeps_a_live_run_whose_pid_is_not_ours_and_removes_a_run_without_its_lock(run_names):
    gone = dead_pid()
    live = run_names(gone)
    holder = subprocess.Popen([sys.executable, "-c", LIVE_RUN, live.run_id], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        set_manifest_pid(live, gone)
        # a run whose supervisor is gone: its manifest and segment were left, nobody holds its lock
        # (the writer exited); its pid is a live process here, as a reused pid would be
        dead = run_names(gone)
        subprocess.run([sys.executable, "-c", LIVE_RUN, dead.run_id], input="", text=True, check=True,
                       capture_output=True, timeout=60)
        set_manifest_pid(dead, holder.pid)

        removed = resources.sweep()

        assert segment_exists(live.segment) and live.manifest_path.exists(), removed
        assert live.segment not in removed and str(live.manifest_path) not in removed, removed
        assert not segment_exists(dead.segment) and not dead.manifest_path.exists(), removed
        assert dead.segment in removed and str(dead.manifest_path) in removed, removed
        # `ringllm cleanup --all` still removes a live run's resources
        assert live.segment in resources.sweep(include_live=True)
    finally:
        holder.communicate("", timeout=60)
