"""Supervisor: owns every shared resource of a run, starts the processes, streams their tokens,
watches them, and on any exit path stops them and unlinks everything.

    supervisor (this process, `ringllm generate`)
      +-- coordinator   window policy, ring slots, read jobs
      +-- loader x K    SSD -> ring slots (O_DIRECT)
      +-- gpu process   ring -> GPU group buffers -> Llama forward -> tokens

Shutdown escalates on one deadline: Shutdown message, then SIGTERM, then SIGKILL. Resources are
unlinked in `finally`, so success, errors, Ctrl-C and SIGTERM all leave nothing behind. A loader
that dies is restarted (its chunks are read again); one that keeps dying ends the run.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import psutil

from checkpoint.errors import RingllmError
from checkpoint.layout import ModelLayout
from coordinator.config import EngineConfig
from coordinator.process import CoordinatorArgs, coordinator_main
from shm.channel import Channel, Fatal, Finished, LoaderRestarted, Ready, Shutdown, Stats, StatsRequest, Tokens
from shm.resources import SHM_DIR, RunNames, new_run_id, sweep, unlink_all
from shm.ring import Ring, ring_bytes
from shm.slot_plan import align_up, plan_model
from workers.gpu_process import GpuArgs, gpu_main
from workers.loader import LoaderArgs, loader_main

log = logging.getLogger("ringllm")

STARTUP_TIMEOUT_S = 300.0
STOP_DEADLINE_S = 3.0
MAX_LOADER_RESTARTS_PER_MINUTE = 3
DRAM_HEADROOM = 1 << 30      # leave this much DRAM free beyond the ring


@dataclass
class RunResult:
    outputs: list = field(default_factory=list)
    gpu: dict = field(default_factory=dict)
    coordinator: dict = field(default_factory=dict)
    gpu_info: dict = field(default_factory=dict)
    loader_restarts: int = 0


def plan_ring(layout: ModelLayout, engine: EngineConfig):
    plans = plan_model(layout)
    slot_size = align_up(max(p.nbytes for p in plans))
    return plans, slot_size, ring_bytes(engine.ring_slots, slot_size)


def check_dram(total: int, engine: EngineConfig) -> None:
    """Before allocating anything: the ring must fit in available DRAM and in /dev/shm."""
    available = psutil.virtual_memory().available
    gib = 2 ** 30
    if total + DRAM_HEADROOM > available:
        raise RingllmError(
            f"the ring needs {total / gib:.2f} GiB (CPU_CAP_VALUE={engine.cpu_cap} slots) but only "
            f"{available / gib:.2f} GiB of DRAM is available (keeping {DRAM_HEADROOM / gib:.0f} GiB free); "
            "lower CPU_CAP_VALUE")
    shm_free = shutil.disk_usage(SHM_DIR).free
    if total > shm_free:
        raise RingllmError(
            f"the ring needs {total / gib:.2f} GiB but {SHM_DIR} has {shm_free / gib:.2f} GiB free; "
            "lower CPU_CAP_VALUE or enlarge /dev/shm")


class Terminated(BaseException):
    """SIGTERM arrived (exit code 143)."""


class Supervisor:
    def __init__(self, layout: ModelLayout, engine: EngineConfig, device: str, dtype: str,
                 verbose: bool = False, fault_after_chunks: dict | None = None):
        self.fault_after_chunks = fault_after_chunks or {}   # tests: loader index -> chunk that fails
        self.layout, self.engine, self.device, self.dtype, self.verbose = layout, engine, device, dtype, verbose
        self.plans, self.slot_size, self.ring_total = plan_ring(layout, engine)
        self.ctx = multiprocessing.get_context("spawn")
        self.names: RunNames | None = None
        self.channels: list[Channel] = []
        self.ring: Ring | None = None
        self.procs: dict[str, multiprocessing.Process] = {}
        self.restarts: deque[float] = deque()
        self.result = RunResult()

    # --- lifecycle -----------------------------------------------------------------------------
    def run(self, prompts, max_new_tokens: int, sampling, eos_ids,
            on_tokens: Callable[[list], None]) -> RunResult:
        check_dram(self.ring_total, self.engine)
        swept = sweep()
        if swept:
            log.info("removed %d resource(s) left by an earlier run that was killed", len(swept))
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._create()
            self._start_all(prompts, max_new_tokens, sampling, eos_ids)
            self.result.outputs = [[] for _ in prompts]
            finished = [False] * len(prompts)
            eos = set(eos_ids)

            def collect(tokens):
                # the same bookkeeping as workers.generation.generate: EOS kept, then the row stops
                for row, tok in enumerate(tokens):
                    if not finished[row]:
                        self.result.outputs[row].append(tok)
                        finished[row] = tok in eos
                on_tokens(tokens)

            self._serve(collect)
            return self.result
        finally:
            self._stop()
            self._unlink()
            signal.signal(signal.SIGTERM, previous)

    @staticmethod
    def _on_sigterm(signum, frame):
        raise Terminated()

    def _create(self) -> None:
        self.names = RunNames(new_run_id(), self.engine.loaders)
        self.names.write_manifest()   # before anything exists, so a kill at any point is sweepable
        self.ring = Ring.create(self.names.segment, self.engine.ring_slots, self.slot_size)
        self.inbox = Channel(self.names.sup_queue, create=True)
        self.channels = [self.inbox] + [Channel(q, create=True) for q in self.names.queues[1:]]
        log.info("ring: %d slots x %.1f MiB = %.2f GiB in %s; %d loader(s)", self.engine.ring_slots,
                 self.slot_size / 2**20, self.ring_total / 2**30, self.names.segment, self.engine.loaders)

    def _spawn(self, key: str, target, args) -> None:
        proc = self.ctx.Process(target=target, args=(args,), name=key, daemon=True)
        proc.start()
        self.procs[key] = proc

    def _loader_args(self, index: int) -> LoaderArgs:
        n = self.names
        return LoaderArgs(index, os.getpid(), n.segment, n.loader_queues[index], n.coord_queue, n.sup_queue,
                          self.verbose, self.fault_after_chunks.get(index, -1))

    def _start_all(self, prompts, max_new_tokens, sampling, eos_ids) -> None:
        n, pid = self.names, os.getpid()
        self._spawn("coordinator", coordinator_main, CoordinatorArgs(
            pid, n.segment, n.coord_queue, n.gpu_queue, n.sup_queue, tuple(n.loader_queues),
            self.layout.config.num_layers, tuple(self.plans), self.engine, self.verbose))
        for i in range(self.engine.loaders):
            self._spawn(f"loader{i}", loader_main, self._loader_args(i))
        self._spawn("gpu", gpu_main, GpuArgs(
            pid, n.segment, n.gpu_queue, n.coord_queue, n.sup_queue, self.layout, tuple(self.plans),
            self.engine, self.device, self.dtype, tuple(tuple(p) for p in prompts), max_new_tokens,
            sampling, tuple(eos_ids), self.verbose))

    def _serve(self, on_tokens) -> None:
        ready: set[str] = set()
        started = time.monotonic()
        while True:
            msg = self.inbox.receive(timeout=0.1)
            if isinstance(msg, Ready):
                ready.add(f"{msg.role}{msg.index if msg.role == 'loader' else ''}")
                if msg.role == "gpu":
                    self.result.gpu_info = msg.info
                    if msg.info.get("name"):
                        log.info("GPU process ready on %s (%s, %.1f GiB free)", msg.info["name"], msg.info["device"],
                                 msg.info.get("free_bytes", 0) / 2**30)
            elif isinstance(msg, Tokens):
                on_tokens(msg.tokens)
            elif isinstance(msg, Fatal):
                raise RingllmError(f"{msg.role}{msg.index if msg.role == 'loader' else ''}: {msg.text}")
            elif isinstance(msg, Finished):
                self.result.gpu = msg.stats
                self.result.coordinator = self._coordinator_stats()
                return
            self._watch()
            if "gpu" not in ready and time.monotonic() - started > STARTUP_TIMEOUT_S:
                raise RingllmError(f"the GPU process did not become ready within {STARTUP_TIMEOUT_S:.0f} s")

    def _watch(self) -> None:
        """Notice dead children: restart a loader (within limits), end the run for anything else."""
        for key, proc in list(self.procs.items()):
            if proc.is_alive():
                continue
            code = proc.exitcode
            if not key.startswith("loader"):
                raise RingllmError(f"the {key} process exited unexpectedly (exit code {code})")
            now = time.monotonic()
            self.restarts.append(now)
            while self.restarts and now - self.restarts[0] > 60:
                self.restarts.popleft()
            if len(self.restarts) > MAX_LOADER_RESTARTS_PER_MINUTE:
                raise RingllmError(f"{key} died {len(self.restarts)} times within a minute (last exit code "
                                   f"{code}); giving up")
            index = int(key[len("loader"):])
            log.warning("%s died (exit code %s); starting a new one and re-reading its chunks", key, code)
            self.result.loader_restarts += 1
            self._drain(self.names.loader_queues[index])
            self._spawn(key, loader_main, self._loader_args(index))
            Channel(self.names.coord_queue).send(LoaderRestarted(index), timeout=5)

    @staticmethod
    def _drain(queue_name: str) -> None:
        """Drop read jobs queued for a dead loader: the coordinator re-issues all it held."""
        ch = Channel(queue_name)
        while ch.receive(timeout=0) is not None:
            pass
        ch.close()

    def _coordinator_stats(self) -> dict:
        Channel(self.names.coord_queue).send(StatsRequest(), timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = self.inbox.receive(timeout=0.1)
            if isinstance(msg, Stats):
                return msg.stats
        return {}

    def _stop(self) -> None:
        if not self.procs:
            return
        for ch in self.channels[1:]:
            try:
                ch.try_send(Shutdown())
            except Exception:
                pass
        deadline = time.monotonic() + STOP_DEADLINE_S
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + STOP_DEADLINE_S
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1)
        self.procs.clear()

    def _unlink(self) -> None:
        if self.names is None:
            return
        for ch in self.channels:
            ch.close()
        if self.ring is not None:
            self.ring.close()
        unlink_all(self.names.segments, self.names.queues)
        self.names.manifest_path.unlink(missing_ok=True)
