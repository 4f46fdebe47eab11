"""EngineRunner: the engine's own thread, the bounded admission queue, and the drain.

Invariants, enforced here:
- Only the runner thread calls engine.step(); submit() and cancel() are the engine's thread-safe
  entry points and may come from the event loop.
- Every admitted request gets exactly one finish event on its queue (its own, or "error" when
  the engine failed it, or "cancelled" when a drain ran out of time); its queue is forgotten then.
- At most max_batch + max_waiting requests are admitted; beyond that submit raises QueueFull.
- A request not admitted raises an Unavailable (HTTP 503) whose code says why.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from ringllm.workers.engine import CANCELLED, Request, TokenEvent

log = logging.getLogger("ringllm.serve")

IDLE_WAIT_S = 1.0          # the thread re-checks its state at least this often while idle
RATE_WINDOW_S = 10.0       # tokens/s and passes/s are averaged over this window
UNAVAILABLE = "unavailable"    # the finish of requests in flight when the engine died (HTTP 503)
# /health calls the engine stalled after this long without a pass while requests are admitted:
# STALL_PASSES times its mean pass, and never under the floor (a streaming engine's first pass
# reads every streamed layer from disk)
STALL_PASSES = 10
STALL_FLOOR_S = 120.0
# /metrics' ringllm_tokens_per_pass: the tokens one pass gave one request (1 without a draft; more
# when its draft tree was accepted), counted in these buckets (a fixed array: it never grows)
TOKENS_PER_PASS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)


class Unavailable(Exception):
    """A request not admitted (HTTP 503); `code` is the OpenAI error code that says why."""
    code = "unavailable"


class QueueFull(Unavailable):
    code = "queue_full"


class ShuttingDown(Unavailable):
    code = "server_shutting_down"


class EngineUnavailable(Unavailable):
    code = "engine_unavailable"


class EngineBusy(Unavailable):
    """The engine cannot take a request now (the streaming engine's GPU queue stayed full)."""
    code = "engine_busy"


@dataclass
class RunnerStats:
    running: int
    waiting: int
    admitted: int
    kv_tokens_used: int
    tokens_total: int
    passes_total: int
    pass_seconds_total: float
    tokens_per_second: float
    passes_per_second: float
    seconds_per_pass: float | None
    tokens_per_pass_buckets: tuple[int, ...] = ()   # per TOKENS_PER_PASS_BUCKETS bound (not cumulative), then +Inf
    request_passes_total: int = 0       # (request, pass) pairs that gave tokens: the histogram's count
    drafted_total: int = 0              # draft tokens verified, of finished requests
    accepted_total: int = 0             # of those, accepted


class EngineRunner:
    def __init__(self, engine, max_batch: int, max_waiting: int, stall_floor_s: float = STALL_FLOOR_S):
        self.engine = engine
        self.capacity = max_batch + max_waiting
        self.stall_floor_s = stall_floor_s
        self._cond = threading.Condition()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._cancel_sent: set[str] = set()     # each request is cancelled in the engine once
        self._progress_at = time.monotonic()    # the last pass, or when work came to an idle engine
        self._draining = False
        self._drain_now = threading.Event()     # a second signal: cancel what is in flight now
        self.failure: str | None = None     # why the engine stopped for good (then every request is 503)
        self.on_failure = None              # called once from the engine thread after such a failure
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tokens_total = self._passes_total = 0
        self._per_pass = [0] * (len(TOKENS_PER_PASS_BUCKETS) + 1)
        self._drafted_total = self._accepted_total = 0
        self._pass_seconds_total = 0.0
        # (time, tokens, seconds, passes) per step; a step can end without a pass (the streaming
        # engine's step() returns after a bounded wait), its seconds go to the pass that ends next
        self._recent: deque[tuple[float, int, float, int]] = deque()
        self._unfinished_seconds = 0.0

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ringllm-engine", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Stop admitting; requests in flight go on."""
        with self._cond:
            self._draining = True

    def drain(self, deadline_s: float) -> int:
        """(Any thread.) Stop admitting, let in-flight requests finish for deadline_s, then
        cancel the rest. Returns how many were cancelled."""
        self.begin_drain()
        end = time.monotonic() + deadline_s
        while self.in_flight and time.monotonic() < end and not self._drain_now.is_set():
            self._drain_now.wait(0.05)
        left = list(self._queues)
        for rid in left:
            self.cancel(rid)
        if left:
            log.info("drain: %d request(s) still running after %.0f s: cancelled", len(left), deadline_s)
        end = time.monotonic() + 5.0      # a cancel lands within one step
        while self.in_flight and time.monotonic() < end:
            time.sleep(0.02)
        return len(left)

    def end_drain_now(self) -> None:
        """(Any thread.) The drain's deadline is now: what is in flight is cancelled."""
        self._drain_now.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s", timeout_s)
        # whatever is still registered never gets another event: end it
        for rid in list(self._queues):
            self._deliver(TokenEvent(rid, None, CANCELLED))

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    # --- requests --------------------------------------------------------------------------
    def submit(self, req: Request) -> asyncio.Queue:
        """Admit a request (from the event loop): its events arrive on the returned queue.
        Raises an Unavailable, or the engine's RingllmError for a request it refuses."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._cond:
            if self.failure is not None:
                raise EngineUnavailable(self.failure)
            if self._draining or self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._queues) >= self.capacity:
                raise QueueFull(f"the queue is full ({self.capacity} requests in flight)")
            try:
                self.engine.submit(req)
            except Exception as err:
                # marks the engine's errors carry (supervisor.serving): it died, or is full now
                if getattr(err, "fatal", False):
                    raise EngineUnavailable(str(err)) from None
                if getattr(err, "busy", False):
                    raise EngineBusy(str(err)) from None
                raise
            if not self._queues:
                self._progress_at = time.monotonic()    # the stall clock starts with the work
            self._queues[req.id] = (loop, queue)
            self._cond.notify_all()
        return queue

    def cancel(self, request_id: str) -> None:
        """Cancel a request in flight (client gone, stop string seen); its "cancelled" event
        comes from the next step. Unknown or finished ids are ignored."""
        with self._cond:
            if request_id not in self._queues or request_id in self._cancel_sent:
                return
            try:
                self.engine.cancel(request_id)
            except Exception as err:    # not sent: the drain's cancel tries again
                log.warning("request %s: the cancel could not be sent (%s)", request_id, err)
                return
            self._cancel_sent.add(request_id)
            self._cond.notify_all()

    def stalled(self) -> str | None:
        """Why the engine looks stuck (requests admitted, no pass for longer than the bound), or None."""
        with self._cond:
            admitted, since = len(self._queues), self._progress_at
        if not admitted or self.failure is not None:
            return None
        mean = self._pass_seconds_total / self._passes_total if self._passes_total else 0.0
        bound = max(self.stall_floor_s, STALL_PASSES * mean)
        quiet = time.monotonic() - since
        if quiet <= bound:
            return None
        return f"no pass for {quiet:.0f} s with {admitted} request(s) admitted (the bound is {bound:.0f} s)"

    def stats(self) -> RunnerStats:
        now = time.monotonic()
        recent = [r for r in list(self._recent) if r[0] >= now - RATE_WINDOW_S]
        passes = sum(r[3] for r in recent)
        seconds = sum(r[2] for r in recent if r[3])
        return RunnerStats(
            running=self.engine.running, waiting=self.engine.waiting, admitted=len(self._queues),
            kv_tokens_used=self.engine.kv_tokens_used, tokens_total=self._tokens_total,
            passes_total=self._passes_total, pass_seconds_total=self._pass_seconds_total,
            tokens_per_second=sum(r[1] for r in recent) / RATE_WINDOW_S,
            passes_per_second=passes / RATE_WINDOW_S,
            seconds_per_pass=seconds / passes if passes else None,
            tokens_per_pass_buckets=tuple(self._per_pass), request_passes_total=sum(self._per_pass),
            drafted_total=self._drafted_total, accepted_total=self._accepted_total)

    # --- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self.engine.idle():
                    self._cond.wait(IDLE_WAIT_S)
                if self._stopping:
                    return
            t0 = time.perf_counter()
            passes_before = self.engine.passes
            try:
                events = self.engine.step()
            except Exception as err:
                if getattr(err, "fatal", False):    # the engine cannot go on (supervisor.serving.EngineDown)
                    self._fail(str(err))
                    return
                log.exception("the engine failed a step; ending every request in flight")
                for rid in list(self._queues):
                    self.engine.cancel(rid)
                    self._deliver(TokenEvent(rid, None, "error"))
                time.sleep(0.1)     # a failing engine must not spin this thread
                continue
            seconds = self._unfinished_seconds + time.perf_counter() - t0
            passes = self.engine.passes - passes_before     # the engine counts its weight passes
            self._unfinished_seconds = 0.0 if passes else seconds
            tokens = sum(1 for e in events if e.token is not None)
            self._tokens_total += tokens
            if passes:
                self._passes_total += passes
                self._pass_seconds_total += seconds
                self._progress_at = time.monotonic()
                for n in Counter(e.id for e in events if e.token is not None).values():
                    self._per_pass[bisect.bisect_left(TOKENS_PER_PASS_BUCKETS, n)] += 1   # the first bound >= n
            for e in events:
                if e.stats is not None:
                    self._drafted_total += e.stats.drafted
                    self._accepted_total += e.stats.accepted
            now = time.monotonic()
            self._recent.append((now, tokens, seconds if passes else 0.0, passes))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            for event in events:
                self._deliver(event)

    def _fail(self, text: str) -> None:
        """Every request in flight ends "unavailable" (HTTP 503 with `text`), new ones are refused
        with it, and on_failure (the server: exit non-zero) is called."""
        with self._cond:
            self.failure, self._draining = text, True
        for rid in list(self._queues):
            self._deliver(TokenEvent(rid, None, UNAVAILABLE))
        if self.on_failure is not None:
            self.on_failure()

    def _deliver(self, event: TokenEvent) -> None:
        with self._cond:
            target = self._queues.get(event.id)
            if target is not None and event.finish is not None:
                del self._queues[event.id]
                self._cancel_sent.discard(event.id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:     # the loop has closed: nobody is listening any more
            pass
