"""`ringllm serve` over the streaming engine: the supervisor's side of a long-lived GPU process
that runs workers.engine.Engine over the streamed model.

ServedEngine has Engine's interface (submit, cancel, step, idle, running, waiting, free_rows,
kv_tokens_used), so serve.runner.EngineRunner drives it from its thread as it drives the
in-process engine:

    event loop --submit/cancel--> Submit/PromptPart/Cancel --> GPU process queue
    runner thread: step() --> waits for the next pass's Events (bounded), watching the children

One step() is one engine step of the GPU process (one weight pass over every running request).
A child that dies, or reports Fatal, ends serving: step() raises EngineDown naming it (the runner
answers 503 and the server exits non-zero). close() stops and removes everything exactly as the
end of Supervisor.run does: no /dev/shm segment, no queue, no child.
"""
from __future__ import annotations

import logging
import threading
import time

import posix_ipc

from ringllm.checkpoint.errors import RingllmError
from ringllm.shm.channel import Cancel, Events, Fatal, Ready, submit_messages
from ringllm.workers.engine import Request, RequestStats, TokenEvent, TokenLogprob
from ringllm.workers.sampling import SamplingParams

log = logging.getLogger("ringllm")

STEP_WAIT_S = 1.0      # step() returns no events after this long without a finished pass
SEND_TIMEOUT_S = 5.0


class EngineDown(RingllmError):
    """The engine cannot go on (a child process died or failed). `fatal` tells serve.runner to
    end every request with 503 and the server to exit non-zero, instead of retrying."""
    fatal = True


class EngineBusy(RingllmError):
    """The GPU process's queue stayed full: the request is not taken. `busy` tells serve.runner to
    answer 503 (the engine goes on)."""
    busy = True


class ServedEngine:
    def __init__(self, sup, max_batch: int, max_context: int):
        self.sup, self.max_batch, self.max_context = sup, max_batch, max_context
        self._lock = threading.Lock()          # the request tables and the sends (parts stay in order)
        self._next_id = 0
        self._ids: dict[int, str] = {}         # wire id -> request id (live requests)
        self._wire: dict[str, int] = {}        # request id -> wire id
        self._seen: dict[int, int] = {}        # wire id -> KV tokens (prompt + generated), once running
        self._prompt: dict[int, int] = {}      # wire id -> prompt length
        self.failure: str | None = None
        self.passes = 0                        # weight passes the GPU process reported
        self._previous: dict = {}              # SIGINT/SIGTERM handlers before start()

    # --- start and stop ----------------------------------------------------------------------
    @classmethod
    def start(cls, sup, max_batch: int, max_context: int, sampling=None) -> "ServedEngine":
        """Start the supervisor's run in serve mode (Supervisor.start: the same start-up as
        generate's) and wait for the GPU process. From here to the end of close() SIGINT/SIGTERM
        are only remembered (Supervisor.hold_signals); uvicorn takes them over while it serves
        (the drain) and gives them back."""
        engine = cls(sup, max_batch, max_context)
        engine._previous = sup.hold_signals()
        try:
            sup.start((), 0, sampling or SamplingParams(), (), serve=(max_batch, max_context))
            engine._wait_until_ready()
            sup._raise_if_signalled()     # a signal during start-up: the caller exits 130/143
        except BaseException:
            engine.close()
            raise
        return engine

    def _wait_until_ready(self) -> None:
        sup, started = self.sup, time.monotonic()
        while "gpu" not in sup.ready:
            self._receive(timeout=0.1)
            sup._raise_if_signalled()
            if time.monotonic() - started > sup.engine.startup_timeout_s:
                raise RingllmError(f"the GPU process did not become ready within {sup.engine.startup_timeout_s:.0f} s")

    def close(self) -> None:
        """Stop every child and remove every resource (the runner thread has stopped) with the
        supervisor's one shut-down, then give SIGINT/SIGTERM back their handlers."""
        try:
            self.sup.close()
        finally:
            self.sup.restore_signals(self._previous)
            self._previous = {}

    @property
    def signalled(self) -> int | None:
        """A SIGINT/SIGTERM that came while no one else handled it (then: do not serve; close)."""
        return self.sup.signalled

    # --- any thread: Engine's entry points ----------------------------------------------
    def submit(self, req: Request) -> None:
        # the checks Engine.submit makes, here, so that a refusal is the caller's error now
        req.check(self.max_context)
        with self._lock:
            if self.failure is not None:
                raise EngineDown(self.failure)
            if req.id in self._wire:
                raise RingllmError(f"request id {req.id!r} is already queued or running")
            wire, self._next_id = self._next_id, self._next_id + 1
            try:
                for msg in submit_messages(wire, list(req.prompt), req.max_tokens, req.sampling, list(req.eos_ids),
                                           req.logprobs, req.prompt_logprobs, req.draft):
                    self._gpu_queue().send(msg, timeout=SEND_TIMEOUT_S)
            except posix_ipc.BusyError:     # prompt parts already sent are dropped by the next Submit
                raise EngineBusy(f"the GPU process took no request for {SEND_TIMEOUT_S:.0f} s "
                                 "(its queue stayed full)") from None
            self._ids[wire], self._wire[req.id], self._prompt[wire] = req.id, wire, len(req.prompt)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            wire = self._wire.get(request_id)
            if wire is None or self.failure is not None:
                return
            self._gpu_queue().send(Cancel(wire), timeout=SEND_TIMEOUT_S)

    def _gpu_queue(self):
        return self.sup.channels[self.sup.names.gpu_queue]

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._seen)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._ids) - len(self._seen)

    @property
    def free_rows(self) -> int:
        return self.max_batch - self.running

    @property
    def kv_tokens_used(self) -> int:
        with self._lock:
            return sum(self._seen.values())

    def idle(self) -> bool:
        """No request live. A dead child makes it False, so that the runner's next step() says so."""
        with self._lock:
            if self._ids:
                return False
        return all(proc.poll() is None for proc in self.sup.procs.values())

    # --- the runner's thread -----------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """The events of the GPU process's next step, or none after STEP_WAIT_S without one.
        Raises EngineDown when a child died or failed."""
        if self.failure is not None:
            raise EngineDown(self.failure)
        rows: list = []
        deadline = time.monotonic() + STEP_WAIT_S
        try:
            while time.monotonic() < deadline:
                msg = self._receive(timeout=0.05)
                if isinstance(msg, Events):
                    rows += msg.events
                    if msg.last:
                        self.passes += msg.forward
                        break
        except RingllmError as err:
            with self._lock:
                self.failure = f"the streaming engine stopped: {err}"
            log.error("%s", self.failure)
            raise EngineDown(self.failure) from None
        return self._events(rows)

    def _receive(self, timeout: float):
        """One inbox message (Ready handled here, Fatal raised), then the children checked."""
        sup = self.sup
        msg = sup.pending.popleft() if sup.pending else sup.inbox.receive(timeout=timeout)
        if isinstance(msg, Ready):
            sup._on_ready(msg)
        elif isinstance(msg, Fatal):
            sup._raise_fatal(msg)
        sup._watch()          # a dead loader is restarted; anything else raises, naming the process
        sup.memory.sample(sup.procs)
        return msg

    def _events(self, rows: list) -> list[TokenEvent]:
        events = []
        with self._lock:
            for wire, token, finish, prompt_tokens, completion_tokens, logprob, prompt_logprobs, stats in rows:
                rid = self._ids.get(wire)
                if rid is None:
                    continue
                if finish is not None:
                    del self._ids[wire], self._wire[rid], self._prompt[wire]
                    self._seen.pop(wire, None)
                elif token is not None:
                    self._seen[wire] = self._seen.get(wire, self._prompt[wire]) + 1
                events.append(TokenEvent(rid, token, finish, prompt_tokens, completion_tokens, _logprob(logprob),
                                         tuple(_logprob(e) for e in prompt_logprobs),
                                         RequestStats(*stats) if stats is not None else None))
        return events


def _logprob(entry) -> TokenLogprob | None:
    """A TokenLogprob from its wire form [token, logprob, [[token, logprob], ...]]."""
    if entry is None:
        return None
    token, logprob, top = entry
    return TokenLogprob(token, logprob, tuple(tuple(pair) for pair in top))
