"""Supervisor: owns every shared resource of a run, starts the processes, streams their tokens,
watches them, and on any exit path stops them and unlinks everything.

    supervisor (this process, `ringllm generate`)
      +-- coordinator   window policy, ring slots, read jobs
      +-- loader x K    SSD -> ring slots (O_DIRECT)
      +-- gpu process   ring -> GPU group buffers -> Llama forward -> tokens

Shutdown escalates on one deadline: Shutdown message, then SIGTERM, then SIGKILL (`_stop`).
Resources are unlinked in `finally`, so success, errors, Ctrl-C and SIGTERM all leave nothing
behind; a signal that arrives while that cleanup runs is remembered, never raised. A loader that
dies is restarted (its chunks are read again); one that keeps dying, or that reported a Fatal
error, ends the run.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import ModelLayout
from ringllm.config import EngineConfig, dram_headroom
from ringllm.faults import NO_FAULTS, FaultPlan
from ringllm.coordinator.process import CoordinatorArgs, coordinator_main
from ringllm.shm.channel import (QUEUE_MESSAGES, Channel, Events, Fatal, Finished, LoaderRestarted, Ready, Shutdown,
                                 Stats, StatsRequest)
from ringllm.shm.prefault import SlotPrefaulter
from ringllm.supervisor.parallel import TensorParallelPlan, blame_dead_rank, free_tcp_port, gpu_key, stopped_ranks
from ringllm.supervisor.checks import MemoryWatch, check_dram, fallback_warning, spare_dram
from ringllm.supervisor.prefetch import WeightWarmer, start_library_prefetch, start_weight_warmer
from ringllm.shm.resources import RunNames, new_run_id, run_id_of, sweep, unlink_all
from ringllm.shm.ring import Ring, ring_bytes
from ringllm.shm.stats import DONE, RUNNING, StatsPage
from ringllm.shm.slot_plan import file_table, plan_model, slot_size
from ringllm.supervisor.startup import first_pass_bar, resident_estimate, startup_phases
from ringllm.workers.spec_plan import spec_plan
from ringllm.workers.speculation import cache_slots
from ringllm.workers.child import spawn
from ringllm.workers.gpu_process import GpuArgs, gpu_main
from ringllm.workers.loader import LoaderArgs, loader_main

log = logging.getLogger("ringllm")

MAX_LOADER_RESTARTS_PER_MINUTE = 3    # for each loader index


@dataclass
class RunResult:
    outputs: list = field(default_factory=list)
    gpu: dict = field(default_factory=dict)
    coordinator: dict = field(default_factory=dict)
    gpu_info: dict = field(default_factory=dict)
    loader_restarts: int = 0
    processes: dict = field(default_factory=dict)   # role -> pid, peak RSS, peak VmLck, peak VmPin
    # machine-wide pinned bytes (shm.resources.system_pinned_bytes) above the level before the run:
    # the peak while it ran, and what is left once every process has exited (0: all returned)
    pinned_peak_bytes: int | None = None
    pinned_left_bytes: int | None = None
    # wall clock from the supervisor's start: GPU process ready (resident layers loaded, kernels
    # warm), first token printed, everything stopped and removed
    startup_wall_s: float | None = None
    first_token_wall_s: float | None = None
    wall_s: float | None = None
    startup: dict = field(default_factory=dict)   # supervisor.startup.startup_phases
    warm: dict | None = None                      # supervisor.prefetch.WeightWarmer.report


def child_key(role: str, index: int) -> str:
    """The key in procs/ready of the child that sent a message with this role and index."""
    if role == "gpu":
        return gpu_key(index)
    return f"loader{index}" if role == "loader" else role


def plan_ring(layout: ModelLayout, engine: EngineConfig):
    plans = plan_model(layout, engine.merge_gap)
    size = slot_size(plans)
    return plans, size, ring_bytes(engine.ring_slots, size, engine.loaders)


class Terminated(BaseException):
    """SIGTERM arrived (exit code 143)."""


class Supervisor:
    def __init__(self, layout: ModelLayout, engine: EngineConfig, device: str, dtype: str,
                 verbose: bool = False, faults: FaultPlan = NO_FAULTS, profile_trace: str | None = None,
                 fill_ring_first: bool = False, parallel: TensorParallelPlan | None = None):
        """parallel: tensor parallel over several GPU processes (ranks), None for one."""
        self.profile_trace, self.fill_ring_first = profile_trace, fill_ring_first
        self.parallel = parallel or TensorParallelPlan()
        self.faults = faults          # tests only (ringllm.faults)
        self.layout, self.engine, self.device, self.dtype, self.verbose = layout, engine, device, dtype, verbose
        self.plans, self.slot_size, self.ring_total = plan_ring(layout, engine)
        self.dram_headroom = dram_headroom(layout, self.parallel.world)   # DRAM kept beside the ring
        self.files = file_table(self.plans)
        self.names: RunNames | None = None
        self.channels: dict[str, Channel] = {}
        self.ring: Ring | None = None
        self.prefaulter: SlotPrefaulter | None = None
        self.warmer: WeightWarmer | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready: set[str] = set()      # keys of self.procs that reported Ready: they read their queue
        self.deaths: dict[int, deque[float]] = {i: deque() for i in range(engine.loaders)}   # per loader
        self.pending: deque = deque()     # inbox messages read ahead by _fatal_pending, handled first
        self.loader_epochs = [0] * engine.loaders
        self.result = RunResult()
        self.signalled: int | None = None     # the first SIGINT / SIGTERM: it decides the exit code
        self.stopping = False                 # cleanup runs (a signal now says it is under way)
        self.told_stopping = False
        self.page: StatsPage | None = None
        self.tokens_seen = 0
        self.memory = MemoryWatch(self.result, device == "cuda")
        self._run_started = time.monotonic()
        self._first_token_at: float | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def run(self, prompts, max_new_tokens: int, sampling, eos_ids,
            on_token: Callable[[int, int], None]) -> RunResult:
        """Every prompt a request of the GPU process's engine; on_token(prompt index, token) for
        each token as it comes. Returns each prompt's tokens (EOS included) and the run's figures."""
        previous = self.hold_signals()
        try:
            self.start(prompts, max_new_tokens, sampling, eos_ids)
            self.result.outputs = [[] for _ in prompts]
            self._serve(on_token)
        finally:
            try:
                self.close()
            finally:
                self.restore_signals(previous)
        self._raise_if_signalled()   # a signal during the cleanup of a run that ended well
        return self.result

    def start(self, prompts, max_new_tokens: int, sampling, eos_ids, serve: tuple | None = None) -> None:
        """Create every resource and start every child (generate's prompts, or serve's engine
        shape); what killed runs left is swept first. The one start-up of run() and serve."""
        check_dram(self.ring_total, self.engine, self.dram_headroom)
        self._run_started = time.monotonic()
        self.memory.begin()
        swept = sweep()
        if swept:
            runs = sorted({run_id_of(name.rsplit("/", 1)[-1]) for name in swept} - {None})
            log.info("removed %d resource(s) left by earlier run(s) that were killed: %s", len(swept), ", ".join(runs))
        self._create()
        self._raise_if_signalled()
        self._start_all(prompts, max_new_tokens, sampling, eos_ids, serve)

    def close(self) -> None:
        """Stop every child and remove every resource, whatever happened before: the one shut-down
        of run() and serve. Signals are not raised from here on (_raise_if_signalled is not called
        until the end), so the cleanup finishes whatever arrives."""
        self.stopping = True
        try:
            self._stop()
        finally:
            self._unlink()
            self.memory.account_pinned(final=True)
            self.result.wall_s = time.monotonic() - self._run_started

    def hold_signals(self) -> dict:
        """From here until restore_signals, SIGINT/SIGTERM are only remembered (_on_signal): with
        their default action a signal would end the process and leave the ring behind. Main
        thread only (elsewhere signals cannot be handled; returns {})."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def restore_signals(previous: dict) -> None:
        """Give SIGINT/SIGTERM back the handlers hold_signals found."""
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def serve_engine(self, max_batch: int, max_context: int, sampling=None):
        """`ringllm serve`: start every process, wait for the GPU process, and return an engine with
        workers.engine.Engine's interface over it (supervisor.serving.ServedEngine); its close()
        stops and removes everything as the end of run() does. sampling: the server's draft, or None."""
        from ringllm.supervisor.serving import ServedEngine

        return ServedEngine.start(self, max_batch, max_context, sampling)

    def _on_signal(self, signum, frame):
        # Only remembered here; _raise_if_signalled raises it where the supervisor checks: the
        # serve loop (at least every 0.1 s: a signal also ends the queue wait), after each spawn,
        # after the cleanup. Raised from the handler, a KeyboardInterrupt lands in whatever code
        # runs: inside a library it can be swallowed or printed as "Exception ignored", between
        # Popen and self.procs it would orphan a child, and during cleanup it would skip the
        # unlinking. The first signal decides the exit code (130 / 143).
        if self.signalled is None:
            self.signalled = signum
        if self.stopping and not self.told_stopping:
            self.told_stopping = True    # os.write: logging is not safe inside a handler
            os.write(2, b"[ringllm] stopping: waiting for the processes, then removing the ring, "
                        b"the queues and the manifest\n")

    def _raise_if_signalled(self):
        if self.signalled == signal.SIGTERM:
            raise Terminated()
        if self.signalled == signal.SIGINT:
            raise KeyboardInterrupt()

    def _create(self) -> None:
        self.names = RunNames(new_run_id(), self.engine.loaders, gpus=self.parallel.world)
        self.names.write_manifest()   # before anything exists, so a kill at any point is sweepable
        self.ring = Ring.create(self.names.segment, self.engine.ring_slots, self.slot_size, self.engine.loaders)
        try:
            for q in self.names.queues:
                self.channels[q] = Channel(q, create=True)
        except OSError as err:
            raise RingllmError(
                f"cannot create message queue ({err}); each run needs {len(self.names.queues)} queues and "
                "all of a user's queues share RLIMIT_MSGQUEUE (ulimit -q): fewer --loaders or fewer "
                "concurrent runs") from None
        self.inbox = self.channels[self.names.sup_queue]
        self.page = StatsPage(self.names.stats_segment, create=True, layers=self.layout.config.num_layers,
                              loaders=self.engine.loaders, slots=self.engine.ring_slots)
        self.page.supervisor(0, os.getpid())
        log.info("ring: %d slots x %.1f MiB = %.2f GiB in %s; %d loader(s)", self.engine.ring_slots,
                 self.slot_size / 2**20, self.ring_total / 2**30, self.names.segment, self.engine.loaders)

    def _spawn(self, key: str, target, args) -> None:
        def track(proc):
            self.procs[key] = proc
            self.ready.discard(key)
        spawn(target, args, track)
        self._raise_if_signalled()

    def _loader_args(self, index: int) -> LoaderArgs:
        n = self.names
        return LoaderArgs(index, os.getpid(), n.segment, n.loader_queues[index], n.coord_queue, n.sup_queue,
                          tuple(self.files), self.verbose, faults=self.faults, stats_name=n.stats_segment,
                          epoch=self.loader_epochs[index])

    def _start_all(self, prompts, max_new_tokens, sampling, eos_ids, serve: tuple | None = None) -> None:
        """serve: (max_batch, max_context) for `ringllm serve` (no prompts: requests come later)."""
        n, pid = self.names, os.getpid()
        start_library_prefetch(self.device)   # first: ahead of the loaders' reads (supervisor.prefetch)
        estimate = self.faults.resident_estimate
        if estimate is None:
            batch, max_seq = serve if serve is not None else (
                len(prompts), cache_slots(max(map(len, prompts)), max_new_tokens, sampling))
            # with ranks, each GPU holds its share of a layer: plan rank 0's, the largest
            estimate = resident_estimate(self.parallel.planned_layout(self.layout), self.engine, batch, max_seq,
                                         self.dtype, self.device, spec_plan(sampling), serving=serve is not None)
        n_layers = self.layout.config.num_layers
        self.warmer = start_weight_warmer(self.layout, estimate,  # what the GPU process reads itself, read early
                                          spare_dram(self.ring_total, self.dram_headroom, self.engine.dram_limit))
        self.prefaulter = SlotPrefaulter(self.ring, None if estimate is None else n_layers - estimate)
        self.prefaulter.start()      # fresh pages faulted ahead of the loaders (shm.prefault)
        self._spawn("coordinator", coordinator_main, CoordinatorArgs(
            pid, n.segment, n.coord_queue, tuple(n.gpu_queues), n.sup_queue, tuple(n.loader_queues),
            self.layout.config.num_layers, tuple(self.plans), tuple(self.files), self.engine, self.verbose,
            faults=self.faults, stats_name=n.stats_segment, resident_estimate=estimate))
        for i in range(self.engine.loaders):
            self._spawn(f"loader{i}", loader_main, self._loader_args(i))
        if self.parallel.world > 1 and getattr(sampling, "seed", None) is None:
            # every rank samples from the same gathered logits: with one seed they draw alike
            sampling = replace(sampling, seed=secrets.randbits(62))
        port = self.parallel.port or (free_tcp_port(self.parallel.addr) if self.parallel.world > 1 else 0)
        for rank in range(self.parallel.world):
            self._spawn(gpu_key(rank), gpu_main, GpuArgs(
                pid, n.segment, n.gpu_queues[rank], n.coord_queue, n.sup_queue, self.layout, tuple(self.plans),
                self.engine, self.parallel.device_of(self.device, rank), self.dtype, tuple(tuple(p) for p in prompts),
                max_new_tokens, sampling, tuple(eos_ids), self.verbose, faults=self.faults,
                profile_trace=self.profile_trace if rank == 0 else None, fill_ring_first=self.fill_ring_first,
                stats_name=n.stats_segment, serve=serve,
                warmed_layers=-1 if self.warmer is None else max(0, estimate or 0),
                rank=rank, world=self.parallel.world, dist_addr=self.parallel.addr, dist_port=port,
                dist_backend=self.parallel.backend_for(self.device), device_sharers=self.parallel.sharers(self.device, rank)))

    def _serve(self, on_token) -> None:
        started = time.monotonic()
        bar_update, bar_stop = first_pass_bar(self.layout.config.num_layers, lambda: self.page.read()["coord"]["step"])
        try:
            self._serve_loop(on_token, started, bar_update, bar_stop)
        finally:
            bar_stop()

    def _serve_loop(self, on_token, started, bar_update, bar_stop) -> None:
        while True:
            msg = self.pending.popleft() if self.pending else self.inbox.receive(timeout=0.1)
            self._raise_if_signalled()
            if not self.tokens_seen:
                bar_update()
            if isinstance(msg, Ready):
                self._on_ready(msg)
            elif isinstance(msg, Events):
                # [id, token, finish, ...] rows (shm.channel.event_rows); id = the prompt's index
                for wire, token, finish, *_ in msg.events:
                    if finish == "error":
                        raise RingllmError(f"prompt {wire}: the GPU process failed to sample its next token")
                    if token is None:
                        continue
                    if self._first_token_at is None:
                        bar_stop()
                        self._first_token_at = time.monotonic()
                        self.result.first_token_wall_s = self._first_token_at - self._run_started
                    self.result.outputs[wire].append(token)
                    on_token(wire, token)
                if msg.last and msg.forward:
                    self.tokens_seen += 1
                    self.page.supervisor(self.tokens_seen, os.getpid())
            elif isinstance(msg, Fatal):
                self._raise_fatal(msg)
            elif isinstance(msg, Finished):      # rank 0's: the ranks agreed on every pass (workers.request_loop)
                self.memory.sample(self.procs, force=True)
                self.result.gpu = msg.stats
                self.result.coordinator = self._coordinator_stats()
                self.result.startup = startup_phases(self._run_started, msg.stats, self.result.coordinator,
                                                     self._first_token_at, self.result.warm)
                warning = fallback_warning(self.result.coordinator)
                if warning:
                    log.warning("%s", warning)
                return
            self._watch()
            self.memory.sample(self.procs)
            if "gpu" not in self.ready and time.monotonic() - started > self.engine.startup_timeout_s:
                raise RingllmError(f"the GPU process did not become ready within {self.engine.startup_timeout_s:.0f} s")

    def _raise_fatal(self, msg: Fatal):
        """End the run at a child's error report, in its words, naming the child. With ranks, a
        rank's error may only be the loss of another: a rank that died is named instead, and a
        collective that timed out names the ranks that are stopped."""
        self._blame_dead_rank(msg)
        raise RingllmError(f"{child_key(msg.role, msg.index)}: {msg.text}{self._stopped_ranks(msg.index)}")

    def _stopped_ranks(self, reporter: int) -> str:
        return stopped_ranks(self.procs, self.parallel.world, reporter)

    def _blame_dead_rank(self, msg: Fatal) -> None:
        blame_dead_rank(self.procs, self.parallel.world, msg.index, msg.text, msg.role == "gpu")

    def _on_ready(self, msg: Ready) -> None:
        key = child_key(msg.role, msg.index)
        if msg.info.get("pid") == self.procs[key].pid:     # not a restarted loader's predecessor
            self.ready.add(key)
        if msg.role == "loader" and self.loader_epochs[msg.index] < self.faults.loader_kills(msg.index):
            os.kill(msg.info["pid"], signal.SIGKILL)
        if msg.role == "gpu" and all(gpu_key(r) in self.ready for r in range(self.parallel.world)):
            self._release_warmer()      # every rank has read what was warmed for it
        if msg.role == "gpu" and msg.index == 0:
            self.result.startup_wall_s = time.monotonic() - self._run_started
            self.result.gpu_info = msg.info
            self.page.set_status(RUNNING)
            if msg.info.get("name"):
                log.info("GPU process ready on %s (%s, %.1f GiB free)", msg.info["name"], msg.info["device"],
                         msg.info.get("free_bytes", 0) / 2**30)

    def _release_warmer(self) -> None:
        if self.warmer is not None:
            self.warmer.release()
            self.result.warm = self.warmer.report()
            self.warmer = None

    def _watch(self) -> None:
        """Notice dead children: restart a loader (within limits), end the run for anything else."""
        for key, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if self._fatal_pending():
                return    # the serve loop ends the run at that message, with its sender's words
            if not key.startswith("loader"):
                rank = next((r for r in range(self.parallel.world) if gpu_key(r) == key), -1)
                raise RingllmError(f"the {key} process exited unexpectedly (exit code {code})"
                                   f"{self._stopped_ranks(rank) if rank >= 0 else ''}")
            index = int(key[len("loader"):])
            # Each loader index has its own budget. It guards against one loader that keeps dying
            # (its chunk, its disk region, a bug it keeps hitting); shared, K loaders that each
            # died once (an OOM killer picking among them) would end a run that is recovering, and
            # the message would name whichever died last. A failure that hits every loader still
            # ends the run soon: each one uses up its own budget at the same pace.
            now, deaths = time.monotonic(), self.deaths[index]
            deaths.append(now)
            while deaths and now - deaths[0] > 60:
                deaths.popleft()
            if len(deaths) > MAX_LOADER_RESTARTS_PER_MINUTE:
                raise RingllmError(f"{key} died {len(deaths)} times within a minute (last exit code "
                                   f"{code}); giving up")
            log.warning("%s died (exit code %s); starting a new one and re-reading its chunks", key, code)
            self.result.loader_restarts += 1
            # The new process has the next epoch: it skips the jobs still queued for the dead one
            # (the coordinator may even add some before it hears of the restart) and the
            # coordinator re-issues everything the dead one held under the new epoch.
            # [P15] next epoch, the dead one's ring record cleared, then the new process, then the
            # coordinator told (it re-issues what the dead one held).
            self.loader_epochs[index] += 1
            # The dead process writes nothing more; a write record it left would read as a late
            # write into its slot once that slot is reassigned (shm.ring: late writes).
            self.ring.end_write(index)
            self._spawn(key, loader_main, self._loader_args(index))
            time.sleep(self.faults.restart_notice_delay_s)
            self.channels[self.names.coord_queue].send(LoaderRestarted(index, self.loader_epochs[index]), timeout=5)

    def _fatal_pending(self) -> bool:
        """Whether a Fatal report waits in our inbox; read before a dead child is judged. A child's
        messages are queued before it exits (mq_send returns once the message is in the queue,
        blocking while the queue is full), so all a dead child sent is among the at most
        QUEUE_MESSAGES messages queued now. A loader that reported Fatal is never restarted."""
        for _ in range(QUEUE_MESSAGES):
            msg = self.inbox.receive(timeout=0)
            if msg is None:
                break
            self.pending.append(msg)
        return any(isinstance(m, Fatal) for m in self.pending)

    def _coordinator_stats(self) -> dict:
        self.channels[self.names.coord_queue].send(StatsRequest(), timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = self.inbox.receive(timeout=0.1)
            self._raise_if_signalled()
            if isinstance(msg, Stats):
                return msg.stats
        return {}

    def _stop(self) -> None:
        """Stop every child on one deadline, EngineConfig.stop_budget_s(ring) from the Shutdown message:
          t = 0       Shutdown to every child's queue; SIGTERM at once to a child that has not
                      reported Ready (it may not read its queue yet: still importing)
          t = grace   SIGTERM to those still alive (a GPU process in a long forward pass reads no
                      queue; its handler raises SystemExit, so its `finally` unregisters the ring)
          t = budget  SIGKILL to those still alive, then reap them for reap_after_kill_s
        Signals to the supervisor do not interrupt this (run() sets self.stopping first)."""
        if not self.procs:
            return
        t0 = time.monotonic()
        budget = self.engine.stop_budget_s(self.ring_total if self.device == "cuda" else 0)   # only CUDA registers it
        for name, ch in self.channels.items():
            if name != self.names.sup_queue:
                ch.try_send(Shutdown())
        for key, proc in self.procs.items():
            if key not in self.ready:
                proc.terminate()
        for key in self._wait_for_exit(t0 + self.engine.stop_grace_s):
            self.procs[key].terminate()
        alive = self._wait_for_exit(t0 + budget)
        if alive:
            log.warning("%s still running %.0f s after Shutdown; killing", ", ".join(alive), budget)
        for key in alive:
            self.procs[key].kill()
        for key in self._wait_for_exit(time.monotonic() + self.engine.reap_after_kill_s):
            log.error("%s (pid %d) did not exit after SIGKILL", key, self.procs[key].pid)
        self.procs.clear()

    def _wait_for_exit(self, deadline: float) -> list[str]:
        """Reap children until the deadline; return the keys of those still running."""
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [key for key, proc in self.procs.items() if proc.poll() is None]

    def _unlink(self) -> None:
        if self.names is None:
            return
        if self.page is not None:
            self.page.set_status(DONE)    # a watching `ringllm top` sees the end before the page goes
            self.page.close()
        for ch in self.channels.values():
            ch.close()
        self._release_warmer()
        # the prefaulter touches the mapping: it goes only once that thread has ended
        if self.ring is not None and (self.prefaulter is None or self.prefaulter.finish(timeout_s=30)):
            self.ring.close()
        unlink_all(self.names.segments, self.names.queues)
        self.names.remove_manifest()
