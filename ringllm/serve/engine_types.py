"""The engine interface the runner drives (workers.batching: BatchRequest, TokenEvent, BatchEngine).

Until workers/batching.py lands (branch h-batch), the same frozen dataclasses are defined here so
that the front-end and its tests run; once it is merged the import below wins and the fallback
can be deleted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ringllm.workers.sampling import SamplingParams

try:
    from ringllm.workers.batching import BatchRequest, TokenEvent   # noqa: F401
except ImportError:   # h-batch not merged yet: the interface as its brief fixes it
    @dataclass(frozen=True)
    class BatchRequest:
        id: str
        prompt: tuple[int, ...]
        max_tokens: int
        sampling: SamplingParams
        eos_ids: tuple[int, ...] = ()

    @dataclass(frozen=True)
    class TokenEvent:
        id: str
        token: int | None
        finish: str | None = None       # None | "stop" | "length" | "cancelled"
        prompt_tokens: int = 0          # filled on the finish event
        completion_tokens: int = 0
