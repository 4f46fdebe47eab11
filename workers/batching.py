"""Continuous batching: requests join the running batch at the next pass boundary and leave when
done (EOS, max_tokens, or cancelled), each in its own row of one slot-based KV cache.

The pass is the unit: step() runs ONE forward of the model (model.SegmentPass), which fetches each
layer's weights once and applies them to every running decode (T = 1 per row, each row at its own
position) and to the prefill chunks of newly admitted requests. A prompt longer than the pass's
prefill budget is prefilled over several passes (chunked prefill), while the others keep decoding.

Thread-safety: submit() and cancel() may be called from any thread; step() and the rows it owns
run on one thread. The lock guards the waiting queue, the cancel set, the live ids and the row
table (changed by step()'s thread only, read by the properties from any thread).
"""
from __future__ import annotations

import threading
import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.generation import Sampler
from ringllm.workers.model import DecodeRows, KVCache, Llama, PrefillChunk, SegmentPass
from ringllm.workers.sampling import SamplingParams

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"

log = logging.getLogger("ringllm")


@dataclass(frozen=True)
class BatchRequest:
    id: str
    prompt: tuple[int, ...]          # token ids, >= 1
    max_tokens: int                  # >= 1
    sampling: SamplingParams         # per request: temperature, top_p, top_k, seed
    eos_ids: tuple[int, ...] = ()

    def check(self, max_context: int) -> None:
        """What any engine refuses at submit, in one line naming the limit."""
        if not self.prompt:
            raise RingllmError(f"request {self.id}: the prompt must have at least one token")
        if self.max_tokens < 1:
            raise RingllmError(f"request {self.id}: max_tokens must be >= 1, got {self.max_tokens}")
        total = len(self.prompt) + self.max_tokens
        if total > max_context:
            raise RingllmError(
                f"request {self.id}: prompt of {len(self.prompt)} tokens + max_tokens {self.max_tokens} = "
                f"{total} exceeds max_context {max_context}")
        self.sampling.validate()


@dataclass(frozen=True)
class TokenEvent:
    id: str
    token: int | None                # None only on a finish event without a new token (cancel)
    finish: str | None = None        # None, "stop" (EOS), "length" (max_tokens), "cancelled", "error"
    prompt_tokens: int = 0           # filled on the finish event
    completion_tokens: int = 0       # filled on the finish event


@dataclass
class _Active:
    """A request holding a KV row. Invariant: slots 0..cached-1 of its row hold its tokens
    (prompt, then the generated ones fed back); `pending` is its newest token, not yet cached."""
    req: BatchRequest
    row: int
    sampler: Sampler
    cached: int = 0
    generated: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.req.prompt)

    def finish_event(self, token: int | None, finish: str) -> TokenEvent:
        return TokenEvent(self.req.id, token, finish, len(self.req.prompt), len(self.generated))


class BatchEngine:
    def __init__(self, model: Llama, max_batch: int, max_context: int, prefill_chunk: int = 512):
        """max_batch rows of max_context slots each; prefill_chunk: the most prompt tokens one
        pass prefills (over all admitted requests), which bounds a pass's time."""
        if max_batch < 1:
            raise RingllmError(f"max_batch must be >= 1, got {max_batch}")
        if max_context < 2:
            raise RingllmError(f"max_context must be >= 2, got {max_context}")
        limit = model.cfg.max_position_embeddings
        if max_context > limit:
            raise RingllmError(f"max_context {max_context} exceeds the model's context of {limit} "
                               "tokens (max_position_embeddings)")
        if prefill_chunk < 1:
            raise RingllmError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.max_batch, self.max_context = model, max_batch, max_context
        self.prefill_chunk = prefill_chunk
        self.passes = 0          # forwards run: weight passes (a step with nothing to run runs none)
        self.cache = KVCache(model.cfg, max_batch, max_context, model.dtype, model.device)
        self._pass = SegmentPass(model)
        self._lock = threading.Lock()
        self._waiting: deque[tuple[BatchRequest, Sampler]] = deque()
        self._cancels: set[str] = set()
        self._live: set[str] = set()                  # ids waiting or running
        self._active: dict[int, _Active] = {}         # row -> request; step()'s thread only
        self._free = list(range(max_batch - 1, -1, -1))   # pop() takes the lowest row first

    # --- any thread --------------------------------------------------------------------------
    def submit(self, req: BatchRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free row. Everything it
        needs is built here, so that whatever a request holds wrong fails it now, not a pass."""
        req.check(self.max_context)
        try:
            sampler = Sampler(req.sampling, self.model.device)
        except Exception as err:
            raise RingllmError(f"request {req.id}: {err}") from None
        with self._lock:
            if req.id in self._live:
                raise RingllmError(f"request id {req.id!r} is already queued or running")
            self._live.add(req.id)
            self._waiting.append((req, sampler))

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step, which frees its row and returns its
        "cancelled" finish event. An id that is not live (already finished) is ignored."""
        with self._lock:
            if request_id in self._live:
                self._cancels.add(request_id)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def free_rows(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def kv_tokens_used(self) -> int:
        with self._lock:
            return sum(a.cached for a in self._active.values())

    def idle(self) -> bool:
        with self._lock:
            return not self._active and not self._waiting

    # --- step()'s thread ---------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One pass: drop cancelled requests, admit waiting ones into free rows, then one forward
        over every running decode and the prefill chunks that fit the pass's budget."""
        events = self._take_cancels_and_admit()
        decoding = [a for a in self._active.values() if not a.prefilling]
        prefills, chunked, budget = [], [], self.prefill_chunk
        for a in [a for a in self._active.values() if a.prefilling]:   # admission order (dict order)
            if budget == 0:
                break
            prompt = a.req.prompt
            n = min(budget, len(prompt) - a.cached)
            last = a.cached + n == len(prompt)
            prefills.append(PrefillChunk(a.row, prompt[a.cached:a.cached + n], a.cached, last))
            chunked.append((a, n, last))
            budget -= n
        if not decoding and not prefills:
            return events
        decode = DecodeRows([a.row for a in decoding], [a.generated[-1] for a in decoding],
                            [a.cached for a in decoding]) if decoding else None
        logits = self._pass.forward(self.cache, decode, prefills)
        self.passes += 1
        for a in decoding:
            a.cached += 1
        drawing = list(decoding)
        for a, n, last in chunked:
            a.cached += n
            if last:
                drawing.append(a)
        events += self._draw(drawing, logits)
        return events

    def _take_cancels_and_admit(self) -> list[TokenEvent]:
        events = []
        with self._lock:
            cancels, self._cancels = self._cancels, set()
            for row, a in list(self._active.items()):
                if a.req.id in cancels:
                    events.append(a.finish_event(None, CANCELLED))
                    self._release(a)
            kept = deque()
            for req, sampler in self._waiting:
                if req.id in cancels:
                    events.append(TokenEvent(req.id, None, CANCELLED, len(req.prompt), 0))
                    self._live.discard(req.id)
                else:
                    kept.append((req, sampler))
            self._waiting = kept
            while self._waiting and self._free:
                req, sampler = self._waiting.popleft()
                row = self._free.pop()
                self._active[row] = _Active(req, row, sampler)
        return events

    def _release(self, a: _Active) -> None:
        """Frees the row (its stale slots need no clearing: a row only sees slots it wrote)."""
        del self._active[a.row]
        self._free.append(a.row)
        self._free.sort(reverse=True)
        self._live.discard(a.req.id)
        self._cancels.discard(a.req.id)     # a cancel that came too late must not hit a reused id

    def _draw(self, drawing: list[_Active], logits: torch.Tensor) -> list[TokenEvent]:
        """One token per request from its logits row, with its own sampler (own generator: a
        seeded request draws the same tokens whatever else is in the batch). A request whose
        draw fails ends alone, with an "error" finish event."""
        greedy = [i for i, a in enumerate(drawing) if a.sampler.params.greedy]
        tokens: list[int | None] = [0] * len(drawing)
        if greedy:       # one host sync for all greedy rows
            for i, tok in zip(greedy, logits[greedy].argmax(-1).tolist()):
                tokens[i] = tok
        for i, a in enumerate(drawing):
            if not a.sampler.params.greedy:
                try:
                    tokens[i] = int(a.sampler(logits[i:i + 1])[0])
                except Exception:
                    log.exception("request %s: sampling failed; ending that request", a.req.id)
                    tokens[i] = None
        events = []
        with self._lock:
            for a, tok in zip(drawing, tokens):
                if tok is None:
                    events.append(a.finish_event(None, ERROR))
                    self._release(a)
                    continue
                a.generated.append(tok)
                if tok in a.req.eos_ids:
                    events.append(a.finish_event(tok, STOP))
                    self._release(a)
                elif len(a.generated) == a.req.max_tokens:
                    events.append(a.finish_event(tok, LENGTH))
                    self._release(a)
                else:
                    events.append(TokenEvent(a.req.id, tok))
        return events
