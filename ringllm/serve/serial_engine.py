"""SerialEngine: the BatchEngine interface over the resident model, one request at a time.

Exact (the same prefill + decode as workers.generation.generate for one prompt), and what
`ringllm serve` runs until workers.batching.BatchEngine is available. A step is one weight pass
for the request at the head of the queue: its prefill, or one decoded token.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.serve.engine_types import BatchRequest, TokenEvent
from ringllm.workers.generation import Sampler
from ringllm.workers.model import KVCache, Llama


@dataclass
class _Active:
    req: BatchRequest
    sampler: Sampler
    cache: KVCache
    key_valid: torch.Tensor
    logits: torch.Tensor | None = None      # of the last pass, for the next token
    out: list[int] = field(default_factory=list)


class SerialEngine:
    def __init__(self, model: Llama, max_batch: int = 1, max_context: int | None = None):
        self.model = model
        self.max_context = max_context or model.cfg.max_position_embeddings
        self._lock = threading.Lock()           # submit/cancel come from other threads
        self._waiting: deque[BatchRequest] = deque()
        self._cancelled: set[str] = set()
        self._active: _Active | None = None

    def submit(self, req: BatchRequest) -> None:
        if not req.prompt:
            raise RingllmError("the prompt has no tokens")
        if len(req.prompt) + req.max_tokens > self.max_context:
            raise RingllmError(f"prompt of {len(req.prompt)} tokens + max_tokens {req.max_tokens} exceeds the "
                               f"context of {self.max_context} tokens")
        req.sampling.validate()
        with self._lock:
            self._waiting.append(req)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def running(self) -> int:
        return int(self._active is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_rows(self) -> int:
        return int(self._active is None)

    @property
    def kv_tokens_used(self) -> int:
        a = self._active
        return len(a.req.prompt) + len(a.out) if a is not None else 0

    def idle(self) -> bool:
        with self._lock:
            return self._active is None and not self._waiting and not self._cancelled

    def step(self) -> list[TokenEvent]:
        events = self._take_cancelled()
        if self._active is None:
            with self._lock:
                req = self._waiting.popleft() if self._waiting else None
            if req is None:
                return events
            self._active = self._prefill(req)
            return events
        events.append(self._decode())
        return events

    def _take_cancelled(self) -> list[TokenEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.id in cancelled]
            self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
        events = [TokenEvent(r.id, None, "cancelled", len(r.prompt), 0) for r in waiting]
        a = self._active
        if a is not None and a.req.id in cancelled:
            events.append(TokenEvent(a.req.id, None, "cancelled", len(a.req.prompt), len(a.out)))
            self._active = None     # its cache goes with it
        return events

    def _prefill(self, req: BatchRequest) -> _Active:
        device, n = self.model.device, len(req.prompt)
        slots = n + req.max_tokens
        cache = KVCache(self.model.cfg, 1, slots, self.model.dtype, device)
        key_valid = torch.ones(1, slots, dtype=torch.bool, device=device)
        tokens = torch.tensor([list(req.prompt)])
        positions = torch.arange(n, device=device)[None, :]
        logits = self.model.forward(tokens, positions, cache, 0, key_valid)
        return _Active(req, Sampler(req.sampling, device), cache, key_valid, logits)

    def _decode(self) -> TokenEvent:
        a = self._active
        tok = int(a.sampler(a.logits).item())
        a.out.append(tok)
        finish = "stop" if tok in a.req.eos_ids else "length" if len(a.out) >= a.req.max_tokens else None
        if finish is not None:
            self._active = None
            return TokenEvent(a.req.id, tok, finish, len(a.req.prompt), len(a.out))
        pos = len(a.req.prompt) + len(a.out) - 1
        a.logits = self.model.forward(torch.tensor([[tok]]), torch.tensor([[pos]], device=self.model.device),
                                      a.cache, pos, a.key_valid)
        return TokenEvent(a.req.id, tok)
