"""Continuous batching: requests join the running batch at the next pass boundary and leave when
done (EOS, max_tokens, or cancelled), each in its own row of one slot-based KV cache.

The pass is the unit: step() runs ONE forward of the model (model.SegmentPass), which fetches each
layer's weights once and applies them to every running decode (T = 1 per row, each row at its own
position) and to the prefill chunks of newly admitted requests. A prompt longer than its share of
the pass's prefill budget is prefilled over several passes (chunked prefill), while the others keep
decoding.

Thread-safety: submit() and cancel() may be called from any thread; step() and the rows it owns
run on one thread. The lock guards the waiting queue, the cancel set, the live ids and the row
table (changed by step()'s thread only, read by the properties from any thread).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.generation import Sampler
from ringllm.workers.memory_plan import PREFILL_CHUNK
from ringllm.workers.model import DecodeRows, KVCache, Llama, PrefillChunk, SegmentPass
from ringllm.workers.sampling import MAX_TOP_LOGPROBS, SamplingParams

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"

log = logging.getLogger("ringllm")


@dataclass(frozen=True)
class BatchRequest:
    id: str
    prompt: tuple[int, ...]          # token ids, >= 1
    max_tokens: int                  # >= 1
    sampling: SamplingParams         # per request: temperature, top_p, top_k, seed
    eos_ids: tuple[int, ...] = ()
    logprobs: int | None = None      # each new token's logprob and this many top alternatives; None: none
    prompt_logprobs: bool = False    # also the prompt's tokens' (echo); then max_tokens may be 0

    def check(self, max_context: int) -> None:
        """What any engine refuses at submit, in one line naming the limit."""
        if not self.prompt:
            raise RingllmError(f"request {self.id}: the prompt must have at least one token")
        if self.max_tokens < (0 if self.prompt_logprobs else 1):
            raise RingllmError(f"request {self.id}: max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RingllmError(f"request {self.id}: logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs and self.logprobs is None:
            raise RingllmError(f"request {self.id}: prompt_logprobs needs logprobs")
        total = len(self.prompt) + self.max_tokens
        if total > max_context:
            raise RingllmError(
                f"request {self.id}: prompt of {len(self.prompt)} tokens + max_tokens {self.max_tokens} = "
                f"{total} exceeds max_context {max_context}")
        self.sampling.validate()


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (the raw logits: before logit_bias, penalties,
    temperature), with the top alternatives as (token, logprob), best first. None for a prompt's
    first token, which nothing predicts."""
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def share_prefill_budget(needs: list[int], budget: int) -> list[int]:
    """Prompt tokens each prefilling request gets this pass (needs: what each has left, oldest
    first): an even share of the budget, what a short prompt leaves over going to the others, the
    remainder to the oldest. Each gets at least one token, so that no prompt waits behind another's
    (a pass then exceeds the budget by less than the number of rows: at most budget + max_batch
    tokens, which the memory plan counts)."""
    grants = [0] * len(needs)
    wanting = list(range(len(needs)))
    while wanting and budget >= len(wanting):
        share = budget // len(wanting)
        for i in wanting:
            n = min(share, needs[i] - grants[i])
            grants[i] += n
            budget -= n
        wanting = [i for i in wanting if grants[i] < needs[i]]
    for rank, i in enumerate(wanting):      # fewer tokens left than requests wanting more
        if rank < budget or grants[i] == 0:
            grants[i] += 1
    return grants


@dataclass(frozen=True)
class TokenEvent:
    id: str
    token: int | None                # None only on a finish event without a new token (cancel)
    finish: str | None = None        # None, "stop" (EOS), "length" (max_tokens), "cancelled", "error"
    prompt_tokens: int = 0           # filled on the finish event
    completion_tokens: int = 0       # filled on the finish event
    logprob: TokenLogprob | None = None          # `token`'s, when the request asked for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] = ()   # the next run of prompt tokens' (echo), in order


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

    def finish_event(self, token: int | None, finish: str, logprob: TokenLogprob | None = None) -> TokenEvent:
        return TokenEvent(self.req.id, token, finish, len(self.req.prompt), len(self.generated), logprob)


class BatchEngine:
    def __init__(self, model: Llama, max_batch: int, max_context: int, prefill_chunk: int = PREFILL_CHUNK):
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
        vocab = self.model.cfg.vocab_size
        outside = [t for t, _ in req.sampling.logit_bias if not 0 <= t < vocab]
        if outside:
            raise RingllmError(f"request {req.id}: logit_bias names token {outside[0]}, outside the vocabulary of {vocab}")
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
        over every running decode and a chunk of each prompt being prefilled, its share of the
        pass's prefill budget (share_prefill_budget)."""
        events = self._take_cancels_and_admit()
        decoding = [a for a in self._active.values() if not a.prefilling]
        prefilling = [a for a in self._active.values() if a.prefilling]   # admission order (dict order)
        grants = share_prefill_budget([len(a.req.prompt) - a.cached for a in prefilling], self.prefill_chunk)
        prefills, chunked = [], []
        for a, n in zip(prefilling, grants):
            prompt = a.req.prompt
            last = a.cached + n == len(prompt)
            prefills.append(PrefillChunk(a.row, prompt[a.cached:a.cached + n], a.cached, last, a.req.prompt_logprobs))
            chunked.append((a, n, last))
        if not decoding and not prefills:
            return events
        decode = DecodeRows([a.row for a in decoding], [a.generated[-1] for a in decoding],
                            [a.cached for a in decoding]) if decoding else None
        logits = self._pass.forward(self.cache, decode, prefills)
        self.passes += 1
        for a in decoding:
            a.cached += 1
        drawing, rows = list(decoding), list(range(len(decoding)))     # rows: of `logits`
        offset = len(decoding)
        for a, n, last in chunked:
            if a.req.prompt_logprobs:       # SegmentPass gave a row for each of the chunk's tokens
                events.append(self._prompt_event(a, logits[offset:offset + n]))
                offset += n
            else:
                offset += int(last)
            a.cached += n
            if last and a.req.max_tokens == 0:      # echo: the prompt's logprobs were all it asked
                with self._lock:
                    events.append(a.finish_event(None, LENGTH))
                    self._release(a)
            elif last:
                drawing.append(a)
                rows.append(offset - 1)
        if drawing:
            events += self._draw(drawing, logits if rows == list(range(len(logits))) else logits[rows])
        return events

    @staticmethod
    def _prompt_event(a: _Active, logits: torch.Tensor) -> TokenEvent:
        """The logprobs of the prompt tokens that a chunk's logits predict (row i: token
        cached + i + 1), led by the prompt's first token (None) in its first chunk."""
        prompt, start = a.req.prompt, a.cached
        predicted = prompt[start + 1:start + 1 + len(logits)]
        entries = token_logprobs(logits[:len(predicted)], predicted, a.req.logprobs)
        if start == 0:
            entries.insert(0, TokenLogprob(prompt[0], None))
        return TokenEvent(a.req.id, None, prompt_logprobs=tuple(entries))

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
        raw, adjusting = logits, [i for i, a in enumerate(drawing) if a.sampler.params.adjusts_logits]
        if adjusting:     # logit_bias and penalties: only the rows of requests that set them
            logits = logits.clone()
            for i in adjusting:
                logits[i:i + 1] = drawing[i].sampler.adjust(logits[i:i + 1])
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
        logprobs: list[TokenLogprob | None] = [None] * len(drawing)
        for i, a in enumerate(drawing):
            if tokens[i] is None:
                continue
            if a.req.logprobs is not None:     # the model's own distribution: the raw logits
                logprobs[i] = token_logprobs(raw[i:i + 1], [tokens[i]], a.req.logprobs)[0]
            a.sampler.observe(tokens[i], raw.shape[-1], raw.device)
        events = []
        with self._lock:
            for a, tok, logprob in zip(drawing, tokens, logprobs):
                if tok is None:
                    events.append(a.finish_event(None, ERROR))
                    self._release(a)
                    continue
                a.generated.append(tok)
                if tok in a.req.eos_ids:
                    events.append(a.finish_event(tok, STOP, logprob))
                    self._release(a)
                elif len(a.generated) == a.req.max_tokens:
                    events.append(a.finish_event(tok, LENGTH, logprob))
                    self._release(a)
                else:
                    events.append(TokenEvent(a.req.id, tok, logprob=logprob))
        return events


def token_logprobs(logits: torch.Tensor, tokens, top: int) -> list[TokenLogprob]:
    """Row i's log-softmax at tokens[i], with its `top` best (token, logprob): one host sync."""
    if len(tokens) == 0:
        return []
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(t, v) for t, v in zip(tokens, chosen)]
    best = lp.topk(top, dim=-1)
    return [TokenLogprob(t, v, tuple(zip(ids, vals)))
            for t, v, ids, vals in zip(tokens, chosen, best.indices.tolist(), best.values.tolist())]
