"""Coordinator process: runs RingPolicy against real messages and keeps the ring header current.

Loop: take one message (short timeout), apply it, schedule, send what can be sent without
blocking (an Outbox per queue), log the window when it moves. It never blocks on a peer.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ringllm.coordinator.policy import JobDispatcher, ProtocolError, RingPolicy
from ringllm.faults import NO_FAULTS, FaultPlan
from ringllm.shm.channel import (Channel, ChunkDone, Fatal, LoaderRestarted, Mark, Outbox, ReadJob, Ready, Release,
                                 ResidentLayers, Shutdown, SlotReady, Stats, StatsRequest, Want)
from ringllm.shm.ring import READY, Ring
from ringllm.shm.stats import StatsPage
from ringllm.workers.process_setup import child_start, parent_alive, stop_requested

log = logging.getLogger("ringllm.coord")
WINDOW_LOG_INTERVAL_S = 1.0


@dataclass(frozen=True)
class CoordinatorArgs:
    parent_pid: int
    ring_name: str
    inbox: str
    gpu_queues: tuple       # one per GPU process (tensor-parallel rank), rank 0 first
    sup_queue: str
    loader_queues: tuple
    num_layers: int
    plans: tuple            # LayerPlan per layer
    files: tuple            # file table (shm.slot_plan.file_table)
    engine: object          # EngineConfig
    verbose: bool = False
    faults: FaultPlan = NO_FAULTS   # tests only
    stats_name: str = ""        # the run's stats page (shm.stats)
    # GPU-resident layers as the supervisor estimates them: loading starts at once with it
    # (the GPU process needs seconds to import torch and start CUDA before it can say); None:
    # wait for the GPU process's ResidentLayers
    resident_estimate: int | None = None


class Coordinator:
    """The coordinator's state and its two entry points, `handle` (one message) and `step` (act
    on the policy's decisions). Transports come in from outside: coordinator_main gives it the
    run's queues and ring; tests/test_scheduler.py drives it in-process against simulated
    loaders and the GPU process's scheduler."""

    def __init__(self, args: CoordinatorArgs, ring, loaders: list[Outbox], gpus: list[Outbox], sup: Channel):
        """gpus: one outbox per GPU process (rank), rank 0 first; each gets every SlotReady [P19]."""
        e = args.engine
        self.args, self.ring = args, ring
        self.policy = RingPolicy(args.num_layers, ring.slot_count, e.cpu_ring_offset, e.cpu_cap,
                                 e.cpu_ring_mode, e.cpu_hwm, e.cpu_lwm, e.cpu_back_margin, e.cpu_pinned_layers,
                                 min_disk_slots=e.lookahead_layers, consumers=len(gpus))
        self.jobs = JobDispatcher(len(loaders), e.dispatch_depth)
        self.chunks = [plan.chunks(e.chunk_bytes) for plan in args.plans]
        self.file_index = {path: i for i, path in enumerate(args.files)}
        self.loaders = loaders
        self.loader_epochs = [0] * len(loaders)   # which incarnation of each loader runs
        self.gpus = list(gpus)
        self.sup = sup
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.buffered_reads = 0
        self.fallback_reads = 0      # buffered although the file accepted O_DIRECT at open
        self.skipped_reads = 0       # jobs a loader skipped: their slot had moved on
        self.first_pass_bytes = None  # bytes read before compute reached pass 1 (the prefill's share)
        self.logged_layer = None
        self.logged_at = 0.0
        self.mark: dict | None = None
        # no loads until it is known which layers stream: the supervisor's estimate, or the GPU
        # process's ResidentLayers (which wins: the policy adjusts to it)
        self.started = False
        if args.resident_estimate is not None:
            self.policy.set_resident(args.resident_estimate)
            self.started = True
        # start-up: when the first read job went out, and when every streamed layer had been in
        # the ring once (the first pass's disk reading), with the bytes read by then
        self.first_job_at: float | None = None
        self.filled_at: float | None = None
        self.fill_bytes = 0
        self.loaded_once: set[int] = set()
        self.offers_sent = 0
        self.page = StatsPage(args.stats_name) if args.stats_name else None
        self.header = [ring.read_slot(s) for s in range(ring.slot_count)]

    def handle(self, msg) -> bool:
        """Apply one message; False means shut down."""
        if isinstance(msg, Want):
            self.policy.want(msg.step, msg.compute_step, msg.rank)
        elif isinstance(msg, Release):
            self.policy.release(msg.step, msg.slot, msg.generation, msg.compute_step, msg.rank)
        elif isinstance(msg, ChunkDone) and msg.skipped:
            # The loader found the slot moved on before reading: a duplicate or stale job. A job
            # we still wait for cannot be one (its slot stays LOADING until it is reported).
            if msg.job in self.jobs.in_flight[msg.loader]:
                raise ProtocolError(f"loader{msg.loader} skipped job {msg.job}, whose slot is still loading")
            self.skipped_reads += 1
        elif isinstance(msg, ChunkDone):
            self.bytes_read += msg.nbytes
            self.read_seconds += msg.seconds
            self.buffered_reads += not msg.direct
            self.fallback_reads += msg.fallback
            finished = self.jobs.done(msg.loader, msg.job)
            if finished is not None:
                self.policy.loaded(*finished)
                self._note_first_fill(self.policy.slots[finished[0]].layer)
        elif isinstance(msg, LoaderRestarted):
            # [P10] jobs sent before now are skipped by the new process; re-issue them under its epoch
            self.loader_epochs[msg.index] = msg.epoch
            n = self.jobs.requeue_loader(msg.index)
            log.warning("loader %d was restarted; %d chunk(s) it held are read again", msg.index, n)
        elif isinstance(msg, ResidentLayers):     # rank 0's alone: every rank keeps the same layers
            if self.started and msg.count != self.policy.resident_layers:
                log.info("the GPU process keeps %d layers (estimated %d); the ring adjusts", msg.count,
                         self.policy.resident_layers)
            self.policy.set_resident(msg.count)
            self.started = True
        elif isinstance(msg, Mark):
            self.mark = self.counters()
        elif isinstance(msg, StatsRequest):
            self.sup.send(Stats("coordinator", self.stats()))
        elif isinstance(msg, Shutdown):
            return False
        if self.first_pass_bytes is None and self.policy.compute_step >= self.args.num_layers:
            self.first_pass_bytes = self.bytes_read
        return True

    def _note_first_fill(self, layer: int) -> None:
        if self.filled_at is not None:
            return
        self.loaded_once.add(layer)
        streamed = range(self.policy.resident_layers, self.args.num_layers)
        if all(l in self.loaded_once for l in streamed):
            self.filled_at, self.fill_bytes = time.monotonic(), self.bytes_read

    def _sync_header(self) -> None:
        """Mirror the policy's slot table into the ring header (state, layer, generation)."""
        for s, info in enumerate(self.policy.slots):
            record = (info.state, info.layer, info.generation)
            if self.header[s] != record:
                self.ring.write_slot(s, *record)
                self.header[s] = record

    def step(self) -> None:
        if not self.started:
            return
        loads, offers = self.policy.schedule()
        # [P1] The header first: a reassigned slot's new generation is visible before any loader
        # writes into it, and READY before the GPU process is told (its copy check relies on both).
        self._sync_header()
        for load in loads:
            self.jobs.add_load(load.slot, load.generation, self.chunks[load.layer])
        for loader, job in self.jobs.assign():
            self.first_job_at = self.first_job_at or time.monotonic()
            c = job.chunk
            layer = self.policy.slots[job.slot].layer    # a LOADING slot keeps its layer (never evicted)
            self.loaders[loader].put(ReadJob(job.job, job.slot, job.generation, layer, self.file_index[c.path],
                                             c.file_offset, c.length, c.slot_offset, c.needed,
                                             self.loader_epochs[loader]))
        for offer in offers:
            if self.offers_sent == self.args.faults.tamper_at_offer:
                # tests: the slot is "rewritten" between the offer and the GPU's copy
                self.ring.write_slot(offer.slot, READY, offer.layer, offer.generation + 1)
            self.offers_sent += 1
            ready = SlotReady(offer.step, offer.layer, offer.slot, offer.generation)
            for gpu in self.gpus:       # one offer, held by every rank until each releases it
                gpu.put(ready)
        for box in (*self.loaders, *self.gpus):
            box.flush()
        self._log_window()
        if self.page is not None:
            window, st = self.policy.window(), self.policy.stats
            self.page.coordinator(self.policy.compute_step, window[0] if window else -1,
                                  window[-1] if window else -1, st.hits, st.misses, self.bytes_read,
                                  self.args.engine.cpu_cap, self.args.engine.cpu_ring_offset)

    def _log_window(self) -> None:
        layer = self.policy.compute_step % self.args.num_layers
        now = time.monotonic()
        if layer == self.logged_layer or now - self.logged_at < WINDOW_LOG_INTERVAL_S:
            return
        self.logged_layer, self.logged_at = layer, now
        window, n = self.policy.window(), self.args.num_layers
        if window:
            log.info("[WSM] CPU ring window: advancing to layer %d (%d+%d -> %d..%d, wraps at %d)",
                     layer, layer, self.args.engine.cpu_ring_offset, window[0], window[-1], n)

    def counters(self) -> dict:
        s = self.policy.stats
        return {"ring_hits": s.hits, "ring_misses": s.misses, "ring_loads": s.loads,
                "ring_evictions": s.evictions, "disk_bytes": self.bytes_read,
                # decode's disk bytes = disk_bytes - this (reads for pass 1 issued during pass 0
                # count here, reads for a pass after the last one count in decode)
                "disk_bytes_first_pass": self.bytes_read if self.first_pass_bytes is None else self.first_pass_bytes,
                "disk_read_seconds": self.read_seconds, "buffered_chunks": self.buffered_reads,
                "direct_fallback_chunks": self.fallback_reads, "stale_chunk_reports": self.jobs.stale_reports,
                "skipped_chunks": self.skipped_reads}

    def startup(self) -> dict:
        """time.monotonic() stamps of the ring's first fill (the supervisor makes them relative)."""
        return {"first_job_at": self.first_job_at, "filled_at": self.filled_at, "fill_bytes": self.fill_bytes}

    def stats(self) -> dict:
        """Totals, and with a Mark the same counters since it (key 'since_mark')."""
        now = self.counters()
        now["startup"] = self.startup()
        if self.mark is not None:
            now["since_mark"] = {k: now[k] - self.mark[k] for k in self.mark}
        return now

    @property
    def busy(self) -> bool:
        return any(b.pending for b in (*self.gpus, *self.loaders))


def coordinator_main(args: CoordinatorArgs) -> None:
    child_start("ringllm-coord", args.parent_pid, args.verbose)
    ring = Ring.attach(args.ring_name)
    inbox = Channel(args.inbox)
    coord = Coordinator(args, ring, [Outbox(Channel(q)) for q in args.loader_queues],
                        [Outbox(Channel(q)) for q in args.gpu_queues],
                        Channel(args.sup_queue, stop_requested=stop_requested))
    try:
        coord.sup.send(Ready("coordinator", 0, {"pid": os.getpid()}))
        running = True
        while running and parent_alive(args.parent_pid) and not stop_requested():
            msg = inbox.receive(timeout=0.002 if coord.busy else 0.2)
            try:
                while msg is not None and running:
                    running = coord.handle(msg)
                    msg = inbox.receive(timeout=0) if running else None
            except ProtocolError as err:
                coord.sup.send(Fatal("coordinator", 0, f"protocol error: {err}"))
                return
            coord.step()
    finally:
        ring.close()
        inbox.close()
