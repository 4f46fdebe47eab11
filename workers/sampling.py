"""Sampling parameters: what the command line validates and the GPU process samples with. Kept
free of torch, so that the supervisor's side of a run never imports it (ringllm.device_probe)."""
from __future__ import annotations

from dataclasses import dataclass

from ringllm.checkpoint.errors import RingllmError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 = off
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise RingllmError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RingllmError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RingllmError(f"--top-k must be >= 0, got {self.top_k}")
