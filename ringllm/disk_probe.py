"""The disk ceiling as the engine's own loaders reach it.

A threaded O_DIRECT read (ringllm.measure.measure_disk) underestimates what the loaders do: on the
H200 host they read at 1.14-1.18x its figure. So this probe measures with the real thing: K loader
processes (workers.child running workers.loader.loader_main, as the
supervisor starts them) reading the checkpoint's real layer chunks (LayerPlan.chunks) into a
scratch ring, handed out by the coordinator's JobDispatcher at the engine's depth and sent the way
the coordinator sends them (an Outbox per loader queue). The probe plays the coordinator: it
writes the slot records, so each loader's before/after checks (shm.ring, late writes) find the
slot LOADING with the job's generation, and counts the ChunkDone reports. It also plays the
supervisor: Ready, Fatal and dead children end up here.

Two slots are enough to keep the loaders busy: while the last chunks of one layer are in flight,
the next layer's chunks already wait in the other slot's queue. The ring is prefaulted first
(the engine reads into a ring it has faulted once; first-touch costs are no disk property).
Layers are read at most once each, in order (a re-read could come from a drive's cache).

Resources follow the supervisor's rules (shm.resources): a fresh run id, the manifest written
before anything is created, so a killed probe is swept by the next start; on every exit path
the loaders are stopped and the ring, the queues and the manifest are removed.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from ringllm.checkpoint.errors import RingllmError
from ringllm.coordinator.policy import JobDispatcher
from ringllm.faults import NO_FAULTS, FaultPlan
from ringllm.shm.channel import Channel, ChunkDone, Fatal, Outbox, ReadJob, Ready, Shutdown
from ringllm.shm.resources import RunNames, new_run_id, unlink_all
from ringllm.shm.ring import LOADING, READY, Ring, prefault
from ringllm.shm.slot_plan import DEFAULT_CHUNK_BYTES, LayerPlan, file_table, plan_model, slot_size
from ringllm.workers.child import spawn
from ringllm.workers.loader import LoaderArgs, loader_main

log = logging.getLogger("ringllm")

PROBE_SLOTS = 2
READY_TIMEOUT_S = 60.0        # loaders import a few modules before they report Ready
STALL_TIMEOUT_S = 60.0        # no chunk finished for this long: the disk (or a loader) is stuck
STOP_GRACE_S = 2.0            # loaders read their queue at least every 0.5 s
KILL_AFTER_S = 5.0


@dataclass(frozen=True)
class DiskProbe:
    gbps: float
    bytes: int          # bytes the loaders reported read (ChunkDone.nbytes)
    seconds: float      # from the first job sent to the last ChunkDone
    direct: bool        # every chunk read with O_DIRECT
    loaders: int
    chunks: int


def measure_disk_with_loaders(layout_or_plans, loaders: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                              dispatch_depth: int = 2, max_bytes: int = 4 << 30, max_seconds: float = 10.0,
                              faults: FaultPlan = NO_FAULTS) -> DiskProbe:
    """Read the layers' chunks with `loaders` loader processes until `max_bytes` were sent or
    `max_seconds` passed (the jobs already out are waited for and counted); see the module doc.
    `layout_or_plans`: a ModelLayout (every layer) or LayerPlans (those layers, in that order).
    Raises RingllmError with one line when a loader fails or dies; leaves nothing behind."""
    plans = list(layout_or_plans) if isinstance(layout_or_plans, (list, tuple)) else plan_model(layout_or_plans)
    if not plans:
        raise RingllmError("disk probe: no layers to read")
    if loaders < 1:
        raise RingllmError(f"disk probe: --loaders {loaders}: at least one loader is needed")
    probe = _Probe(plans, loaders, chunk_bytes, dispatch_depth, faults)
    handlers = _hold_signals(probe)
    try:
        probe.create()
        probe.start_loaders()
        return probe.read(max_bytes, max_seconds)
    finally:
        try:
            probe.stop()
        finally:
            probe.unlink()
            _restore_signals(handlers)
        probe.raise_if_signalled()     # a Ctrl-C during the cleanup: now that nothing is left


def measure_loader_counts(plans: list, counts, chunk_bytes: int = DEFAULT_CHUNK_BYTES, dispatch_depth: int = 2,
                          max_bytes: int = 4 << 30, max_seconds: float = 10.0) -> dict:
    """{K: DiskProbe} for each loader count K. Each count starts where the last one stopped
    (wrapping around), so no count reads what an earlier one just read (the drive's cache would
    flatter it), and the page cache is dropped before each where this process may (root)."""
    from ringllm.measure import drop_page_cache

    out, start = {}, 0
    for k in counts:
        drop_page_cache()
        order = plans[start:] + plans[:start]
        out[k] = measure_disk_with_loaders(order, k, chunk_bytes, dispatch_depth, max_bytes=max_bytes,
                                           max_seconds=max_seconds)
        done, layers = 0, 0
        for plan in order:                  # the layers this count read
            if done >= out[k].bytes:
                break
            done += plan.nbytes
            layers += 1
        start = (start + layers) % len(plans)
    return out


def _hold_signals(probe: "_Probe") -> dict:
    """SIGINT/SIGTERM are remembered and raised where the probe checks (as in the supervisor):
    raised anywhere, they could land between Popen and the list of children, or in the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, probe.on_signal)
    return previous


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _Probe:
    def __init__(self, plans: list[LayerPlan], loaders: int, chunk_bytes: int, depth: int, faults: FaultPlan):
        self.plans, self.loaders, self.chunk_bytes, self.faults = plans, loaders, chunk_bytes, faults
        self.files = file_table(plans)
        self.file_index = {path: i for i, path in enumerate(self.files)}
        self.jobs = JobDispatcher(loaders, depth)
        self.names: RunNames | None = None
        self.ring: Ring | None = None
        self.inbox: Channel | None = None
        self.outboxes: list[Outbox] = []
        self.channels: list[Channel] = []
        self.procs: list[subprocess.Popen] = []
        self.slot_layer: dict[int, int] = {}      # slot -> index into plans of the layer it loads
        self.signalled: int | None = None

    # --- signals -------------------------------------------------------------------------------
    def on_signal(self, signum, frame):
        if self.signalled is None:
            self.signalled = signum

    def raise_if_signalled(self) -> None:
        if self.signalled == signal.SIGTERM:
            from ringllm.supervisor.supervisor import Terminated    # the CLI's exit 143
            raise Terminated()
        if self.signalled == signal.SIGINT:
            raise KeyboardInterrupt()

    # --- resources -----------------------------------------------------------------------------
    def create(self) -> None:
        self.names = RunNames(new_run_id(), self.loaders)
        self.names.write_manifest()      # before anything exists: a killed probe is swept by the next start
        self.ring = Ring.create(self.names.segment, min(PROBE_SLOTS, len(self.plans)), slot_size(self.plans),
                                self.loaders)
        prefault(self.ring)
        try:
            # one inbox for what the coordinator and the supervisor would receive: we play both
            self.inbox = Channel(self.names.coord_queue, create=True)
            self.channels.append(self.inbox)
            for q in self.names.loader_queues:
                self.channels.append(Channel(q, create=True))
                self.outboxes.append(Outbox(self.channels[-1]))
        except OSError as err:
            raise RingllmError(f"disk probe: cannot create message queue ({err}); fewer loaders, or raise "
                               "RLIMIT_MSGQUEUE (ulimit -q)") from None

    def start_loaders(self) -> None:
        n = self.names
        for i in range(self.loaders):
            args = LoaderArgs(i, os.getpid(), n.segment, n.loader_queues[i], n.coord_queue, n.coord_queue,
                              tuple(self.files), faults=self.faults)
            spawn(loader_main, args, self.procs.append)     # as the supervisor starts its children
            self.raise_if_signalled()

    def stop(self) -> None:
        """Shutdown to every loader, SIGTERM after a grace, SIGKILL after that; reap them all."""
        if not self.procs:
            return
        for box in self.outboxes:
            box.channel.try_send(Shutdown())
        for deadline, act in ((STOP_GRACE_S, subprocess.Popen.terminate), (KILL_AFTER_S, subprocess.Popen.kill),
                              (KILL_AFTER_S, None)):
            end = time.monotonic() + deadline
            for proc in self.procs:
                try:
                    proc.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            alive = [p for p in self.procs if p.poll() is None]
            if not alive:
                break
            if act is None:
                log.error("disk probe: loader pid(s) %s did not exit after SIGKILL", [p.pid for p in alive])
            for proc in alive:
                if act is not None:
                    act(proc)
        self.procs.clear()

    def unlink(self) -> None:
        if self.names is None:
            return
        for ch in self.channels:
            ch.close()
        if self.ring is not None:
            self.ring.close()
        unlink_all([self.names.segment], self.names.queues)
        self.names.remove_manifest()

    # --- the measurement -----------------------------------------------------------------------
    def _receive(self, timeout: float):
        msg = self.inbox.receive(timeout=timeout)
        self.raise_if_signalled()
        if isinstance(msg, Fatal):
            raise RingllmError(f"disk probe: loader{msg.index}: {msg.text}")
        if msg is None:
            self._check_alive()
        return msg

    def _check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            code = proc.poll()
            if code is None:
                continue
            # a dying loader's Fatal is queued before it exits: its words beat ours
            msg = self.inbox.receive(timeout=0)
            while msg is not None:
                if isinstance(msg, Fatal):
                    raise RingllmError(f"disk probe: loader{msg.index}: {msg.text}")
                msg = self.inbox.receive(timeout=0)
            raise RingllmError(f"disk probe: loader{i} (pid {proc.pid}) exited unexpectedly (exit code {code})")

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(ready) < self.loaders:
            if time.monotonic() > deadline:
                raise RingllmError(f"disk probe: {self.loaders - len(ready)} loader(s) not ready within "
                                   f"{READY_TIMEOUT_S:.0f} s")
            msg = self._receive(0.1)
            if isinstance(msg, Ready):
                ready.add(msg.index)

    def _assign(self, slot: int, generation: int, layer: int) -> None:
        """The slot goes to `layer`: its record first (the loaders' checks read it), then its chunks."""
        self.ring.write_slot(slot, LOADING, self.plans[layer].layer, generation)
        self.jobs.add_load(slot, generation, self.plans[layer].chunks(self.chunk_bytes))
        self.slot_layer[slot] = layer

    def _send(self) -> int:
        """Send what the dispatcher hands out; return the bytes sent."""
        sent = 0
        for loader, job in self.jobs.assign():
            c = job.chunk
            self.outboxes[loader].put(ReadJob(job.job, job.slot, job.generation, self.plans[self.slot_layer[job.slot]].layer,
                                              self.file_index[c.path], c.file_offset, c.length, c.slot_offset, c.needed))
            sent += c.length
        for box in self.outboxes:
            box.flush()
        return sent

    def read(self, max_bytes: int, max_seconds: float) -> DiskProbe:
        self._wait_ready()
        generation = [0] * self.ring.slot_count
        next_layer = 0
        for slot in range(self.ring.slot_count):
            generation[slot] += 1
            self._assign(slot, generation[slot], next_layer)
            next_layer += 1
        sent, nbytes, chunks, direct = 0, 0, 0, True
        t0 = last = time.perf_counter()
        deadline = t0 + max_seconds
        sent += self._send()
        while any(self.jobs.in_flight) or any(box.pending for box in self.outboxes):
            msg = self._receive(0.002 if any(box.pending for box in self.outboxes) else 0.1)
            if time.perf_counter() - last > STALL_TIMEOUT_S:
                raise RingllmError(f"disk probe: no chunk read within {STALL_TIMEOUT_S:.0f} s")
            if not isinstance(msg, ChunkDone):
                self._flush()
                continue
            if msg.skipped:     # only a stale or duplicate job skips; the probe sends neither
                raise RingllmError(f"disk probe: loader{msg.loader} skipped job {msg.job}: its slot was not loading")
            last = time.perf_counter()
            nbytes, chunks, direct = nbytes + msg.nbytes, chunks + 1, direct and msg.direct
            finished = self.jobs.done(msg.loader, msg.job)
            if finished is not None:
                slot = finished[0]
                self.ring.write_slot(slot, READY, self.plans[self.slot_layer[slot]].layer, generation[slot])
                if next_layer < len(self.plans) and sent < max_bytes and last < deadline:
                    generation[slot] += 1
                    self._assign(slot, generation[slot], next_layer)
                    next_layer += 1
            if sent < max_bytes and last < deadline:
                sent += self._send()
            else:
                self.jobs.queue.clear()     # the limit: what is out is waited for, nothing more sent
                self._flush()
        seconds = last - t0
        return DiskProbe(nbytes / seconds / 1e9 if seconds > 0 else 0.0, nbytes, seconds, direct, self.loaders, chunks)

    def _flush(self) -> None:
        for box in self.outboxes:
            box.flush()
