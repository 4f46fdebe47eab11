"""Protocol hardening (issue #10): records in shared memory are never read torn, loaders that
write late into a reassigned slot stop the run, messages fit the queue cap for any batch and
any text, and O_DIRECT reads are planned aligned and never fall back on a file system that
takes them."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import posix_ipc
import pytest

# --- item 4: seqlocked records --------------------------------------------------------------

# The writer rewrites records in a tight loop with values whose fields must agree: every field
# of write k holds k (k >= 1), so a torn read shows as fields that differ, or as a zero.
RING_WRITER = """
import sys, time
from ringllm.shm.ring import Ring
ring = Ring.attach(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
k = 1
while time.monotonic() < end:
    for _ in range(1000):
        ring.write_slot(0, k & 0x7fffffff, k & 0x7fffffff, k)
        k += 1
ring.close()
"""

STATS_WRITER = """
import sys, time
from ringllm.shm.stats import StatsPage
page = StatsPage(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
k = 1
while time.monotonic() < end:
    for _ in range(1000):
        page.coordinator(k, k, k, k, k, k, k, k)
        page.gpu(k, k, k, k, k, k, float(k), k)
        page.loader(0, k, float(k), k)
        k += 1
page.close()
"""

WRITE_SECONDS = 2.0


def start_writer(code: str, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, name, str(WRITE_SECONDS)])


def read_while_writing(writer: subprocess.Popen, read) -> tuple[int, list]:
    """Call read() until the writer exits; return (reads, the torn ones: tuples whose fields
    disagree or go back in time). read() returns one tuple per record; records start all zero."""
    reads, torn, last = 0, [], {}
    deadline = time.monotonic() + WRITE_SECONDS + 30
    while writer.poll() is None and time.monotonic() < deadline:
        for record, values in enumerate(read()):
            reads += 1
            k = values[0]
            if any(v != k for v in values) or k < last.get(record, 0):
                torn.append(values)
            last[record] = max(last.get(record, 0), k)
    writer.wait(timeout=30)
    return reads, torn


def test_ring_slot_records_are_never_read_torn():
    from ringllm.shm.ring import Ring

    name = f"/rltest-{os.getpid()}-ring"
    ring = Ring.create(name, slot_count=2, slot_size=4096, loaders=1)
    ring.write_slot(0, 0, 0, 0)
    try:
        writer = start_writer(RING_WRITER, name)
        reads, torn = read_while_writing(writer, lambda: [ring.read_slot(0)])
        assert writer.returncode == 0
        assert reads > 1000
        assert not torn, f"{len(torn)} of {reads} reads torn, e.g. {torn[:5]}"
    finally:
        ring.close()
        posix_ipc.unlink_shared_memory(name)


def test_stats_records_are_never_read_torn():
    from ringllm.shm.stats import StatsPage

    name = f"/rltest-{os.getpid()}-stats"
    page = StatsPage(name, create=True, layers=4, loaders=1, slots=2)

    def read():
        s = page.read()
        loader = s["loader"][0]
        return [tuple(s["coord"].values()), tuple(s["gpu"].values()),
                (loader["bytes"], loader["busy_s"], loader["chunks"])]

    try:
        writer = start_writer(STATS_WRITER, name)
        reads, torn = read_while_writing(writer, read)
        assert writer.returncode == 0
        assert reads > 1000
        assert not torn, f"{len(torn)} of {reads} reads torn, e.g. {torn[:5]}"
    finally:
        page.close()
        posix_ipc.unlink_shared_memory(name)
