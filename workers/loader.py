"""Loader process: reads checkpoint byte ranges straight into ring slots.

Each ReadJob names an aligned file range and an aligned slot offset. With O_DIRECT the read goes
from the SSD into the shared ring with no page-cache copy. A file system that refuses O_DIRECT
(tmpfs says EINVAL) gets buffered reads instead, reported once per file.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import time
from dataclasses import dataclass

from ringllm.faults import NO_FAULTS, FaultPlan
from ringllm.shm.channel import Channel, ChunkDone, Fatal, LoaderRestarted, ReadJob, Ready, Shutdown
from ringllm.shm.ring import Ring
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

    def get(self, path: str) -> tuple[int, bool]:
        if path not in self.fds:
            try:
                self.fds[path] = (os.open(path, os.O_RDONLY | os.O_DIRECT), True)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                log.warning("%s: O_DIRECT refused by the file system, using buffered reads", path)
                self.fds[path] = (os.open(path, os.O_RDONLY), False)
        return self.fds[path]

    def fall_back(self, path: str) -> tuple[int, bool]:
        fd, _ = self.fds.pop(path)
        os.close(fd)
        log.warning("%s: O_DIRECT read refused, using buffered reads", path)
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


def loader_main(args: LoaderArgs) -> None:
    name = f"ringllm-load{args.index}"
    child_start(name, args.parent_pid, args.verbose)
    ring = Ring.attach(args.ring_name)
    inbox, coord, sup = Channel(args.inbox), Channel(args.coord_queue), Channel(args.sup_queue)
    files = FileCache()
    view = ring.view()
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
            if msg.epoch != args.epoch:
                # sent to the process this one replaces; the coordinator re-issues it with our
                # epoch. Reading it too could land after its slot had been given to another layer.
                continue
            if args.faults.chaos_delay_s:
                time.sleep(chaos.uniform(0, args.faults.chaos_delay_s))
            if chunks == args.faults.crash_loaders_at_chunk:
                os._exit(1)
            t0 = time.perf_counter()
            path = args.files[msg.file]
            try:
                if chunks == read_error_at:
                    raise OSError(errno.EIO, "injected read error")
                nbytes, direct = read_chunk(files, path, view, ring.slot_base(msg.slot), msg)
            except OSError as err:
                sup.send(Fatal("loader", args.index,
                               f"{path}: read error at offset {msg.file_offset} ({err.strerror or err})"[-900:]))
                return
            chunks += 1
            total_bytes += nbytes
            busy += time.perf_counter() - t0
            if page is not None:
                page.loader(args.index, total_bytes, busy, chunks)
            coord.send(ChunkDone(msg.job, args.index, nbytes, time.perf_counter() - t0, direct),
                       timeout=30)
    finally:
        files.close()
        view.release()
        ring.close()
        for ch in (inbox, coord, sup):
            ch.close()
