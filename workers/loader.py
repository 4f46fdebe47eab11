"""Loader process: reads checkpoint byte ranges straight into ring slots.

Each ReadJob names an aligned file range and an aligned slot offset. With O_DIRECT the read goes
from the SSD into the shared ring with no page-cache copy. A file system that refuses O_DIRECT
at open (tmpfs says EINVAL) gets buffered reads instead, reported once per file. A read that
O_DIRECT refuses on a file that accepted it at open (a misaligned job) falls back too, but is
counted (ChunkDone.fallback): the supervisor warns at the end of the run.

Every write into the ring follows the late-write protocol of shm.ring (steps 1-5 there): a
record "loader k is writing slot s for generation g", a check before and after the read that
the slot still is (LOADING, g), a taint word and Fatal when the after-check fails.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

from ringllm.faults import NO_FAULTS, FaultPlan
from ringllm.shm.channel import Channel, ChunkDone, Fatal, LoaderRestarted, ReadJob, Ready, Shutdown
from ringllm.shm.ring import LOADING, STATE_NAMES, Ring
from ringllm.shm.stats import StatsPage
from ringllm.workers.process_setup import child_start, parent_alive, stop_requested

log = logging.getLogger("ringllm.loader")


@dataclass(frozen=True)
class LoaderArgs:
    index: int
    parent_pid: int
    ring_name: str
    inbox: str
    coord_queue: str
    sup_queue: str
    files: tuple              # the file table: ReadJob.file indexes it
    verbose: bool = False
    faults: FaultPlan = NO_FAULTS  # tests only
    stats_name: str = ""           # the run's stats page (shm.stats)
    epoch: int = 0                 # restarts of this loader index so far: jobs for another epoch are stale


class FileCache:
    """Open file descriptors by path, O_DIRECT where the file system allows it."""

    def __init__(self):
        self.fds: dict[str, tuple[int, bool]] = {}
        self.direct_at_open: set[str] = set()      # files that accepted O_DIRECT when opened

    def get(self, path: str) -> tuple[int, bool]:
        if path not in self.fds:
            try:
                self.fds[path] = (os.open(path, os.O_RDONLY | os.O_DIRECT), True)
                self.direct_at_open.add(path)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                log.warning("%s: O_DIRECT refused by the file system, using buffered reads", path)
                self.fds[path] = (os.open(path, os.O_RDONLY), False)
        return self.fds[path]

    def fall_back(self, path: str) -> tuple[int, bool]:
        fd, _ = self.fds.pop(path)
        os.close(fd)
        log.warning("%s: O_DIRECT read refused although the file accepted O_DIRECT at open (misaligned "
                    "read?); using buffered reads", path)
        self.fds[path] = (os.open(path, os.O_RDONLY), False)
        return self.fds[path]

    def close(self):
        for fd, _ in self.fds.values():
            os.close(fd)
        self.fds.clear()


def read_chunk(files: FileCache, path: str, ring_view: memoryview, base: int, job: ReadJob) -> tuple[int, bool]:
    """Read one chunk of `path` into the ring; return (bytes read, whether O_DIRECT was used)."""
    fd, direct = files.get(path)
    dst = ring_view[base + job.slot_offset: base + job.slot_offset + job.length]
    done = 0
    while done < job.length:
        try:
            n = os.preadv(fd, [dst[done:]], job.file_offset + done)
        except OSError as err:
            if err.errno == errno.EINVAL and direct:
                fd, direct = files.fall_back(path)
                continue
            raise
        if n == 0:
            break            # end of file: the aligned tail past it holds no tensor bytes
        done += n
        if direct and n % 4096:
            break            # a short O_DIRECT read only happens at the end of the file
    if done < job.needed:
        raise OSError(errno.EIO, f"short read: {done} of {job.needed} bytes at offset {job.file_offset}")
    return done, direct


class LateWrite(RuntimeError):
    """A read landed in a slot that had left (LOADING, the job's generation)."""


class SlotWriter:
    """One loader's reads into the ring, under the late-write protocol (shm.ring, steps 1-5)."""

    def __init__(self, index: int, ring: Ring, files: tuple):
        self.index, self.ring, self.files = index, ring, files
        self.fds = FileCache()
        self.view = ring.view()

    def loading(self, job: ReadJob) -> bool:
        state, _, generation = self.ring.read_slot(job.slot)
        return state == LOADING and generation == job.generation

    def serve(self, job: ReadJob, before_write: Callable[[], None] | None = None) -> ChunkDone:
        """Read one job into its slot. A job whose slot moved on is skipped (ChunkDone.skipped);
        a read that may have landed after its slot moved on raises LateWrite.
        before_write (tests): runs between the before-check and the read."""
        t0 = time.perf_counter()
        self.ring.begin_write(self.index, job.slot, job.generation)            # 1  [P9]
        late = False
        try:
            if not self.loading(job):                                           # 2
                return ChunkDone(job.job, self.index, 0, 0.0, False, skipped=True)
            if before_write is not None:
                before_write()
            path = self.files[job.file]
            try:
                nbytes, direct = read_chunk(self.fds, path, self.view, self.ring.slot_base(job.slot), job)   # 3
            finally:
                late = not self.loading(job)                                    # 4, after any byte written
                if late:
                    self.ring.taint(job.slot, self.index, job.generation)
        finally:
            self.ring.end_write(self.index)                                     # 5: after the taint [P9]
        if late:
            state, layer, generation = self.ring.read_slot(job.slot)
            raise LateWrite(
                f"late write into ring slot {job.slot}: loader{self.index} read layer {job.layer} (generation "
                f"{job.generation}, {path} at offset {job.file_offset}) after the slot had moved on to layer "
                f"{layer}, generation {generation} ({STATE_NAMES.get(state, state)}); stopping before compute "
                "uses it")
        return ChunkDone(job.job, self.index, nbytes, time.perf_counter() - t0, direct,
                         fallback=not direct and path in self.fds.direct_at_open)

    def close(self) -> None:
        self.fds.close()
        self.view.release()


def loader_main(args: LoaderArgs) -> None:
    name = f"ringllm-load{args.index}"
    child_start(name, args.parent_pid, args.verbose)
    ring = Ring.attach(args.ring_name)
    inbox, coord, sup = (Channel(q, stop_requested=stop_requested) for q in (args.inbox, args.coord_queue, args.sup_queue))
    writer = SlotWriter(args.index, ring, args.files)
    chunks = 0
    total_bytes, busy = 0, 0.0
    page = StatsPage(args.stats_name) if args.stats_name else None
    chaos = random.Random(args.faults.chaos_seed * 1000 + args.index)
    read_error_at = args.faults.read_error_chunk(args.index)
    try:
        sup.send(Ready("loader", args.index, {"pid": os.getpid()}))
        while parent_alive(args.parent_pid) and not stop_requested():
            msg = inbox.receive(timeout=0.5)
            if msg is None or isinstance(msg, LoaderRestarted):
                continue
            if isinstance(msg, Shutdown):
                break
            if not isinstance(msg, ReadJob):
                continue
            if msg.epoch != args.epoch:      # [P10]
                # sent to the process this one replaces; the coordinator re-issues it with our
                # epoch. Reading it too could land after its slot had been given to another layer.
                continue
            if args.faults.chaos_delay_s:
                time.sleep(chaos.uniform(0, args.faults.chaos_delay_s))
            if chunks == args.faults.crash_loaders_at_chunk:
                os._exit(1)
            duplicate = args.faults.duplicate_delay(args.index, chunks)
            try:
                if chunks == read_error_at:
                    raise OSError(errno.EIO, "injected read error")
                done = writer.serve(msg)
                if duplicate is not None:
                    done = _late_duplicate(writer, msg, done, coord, *duplicate)
            except OSError as err:
                sup.send(Fatal("loader", args.index, f"{args.files[msg.file]}: read error at offset "
                                                     f"{msg.file_offset} ({err.strerror or err})"))
                return
            except LateWrite as err:
                sup.send(Fatal("loader", args.index, str(err)))
                return
            chunks += 1
            total_bytes += done.nbytes
            busy += done.seconds
            if page is not None:
                page.loader(args.index, total_bytes, busy, chunks)
            coord.send(done, timeout=30)
    finally:
        writer.close()
        ring.close()
        for ch in (inbox, coord, sup):
            ch.close()


def _late_duplicate(writer: SlotWriter, job: ReadJob, done: ChunkDone, coord: Channel, seconds: float,
                    checked_first: bool) -> ChunkDone:
    """Tests (FaultPlan.late_duplicate / late_write): report `job` done, then serve it again,
    `seconds` later and once the slot has moved on; with checked_first the duplicate passes its
    before-check before the report and only its write comes late, after the slot went to
    another load. Returns the duplicate's report."""
    if not checked_first:
        coord.send(done, timeout=30)
        time.sleep(seconds)
        # a duplicate, not a race: wait until the coordinator has taken the report in (on a
        # loaded machine it may not have within `seconds`)
        deadline = time.monotonic() + 30
        while writer.loading(job) and time.monotonic() < deadline:
            time.sleep(0.01)
        return writer.serve(job)

    def report_then_wait():
        coord.send(done, timeout=30)
        time.sleep(seconds)
        # until the slot has been given to another load: the coordinator starts loading before
        # the GPU process is up, so a fixed delay can end while the slot still waits, READY
        deadline = time.monotonic() + 30
        while writer.ring.generation(job.slot) == job.generation and time.monotonic() < deadline:
            time.sleep(0.01)
    return writer.serve(job, before_write=report_then_wait)
