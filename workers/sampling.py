"""Sampling parameters: what the command line validates and the GPU process samples with. Kept
free of torch, so that the supervisor's side of a run never imports it (ringllm.device_probe)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ringllm.checkpoint.errors import RingllmError

# Below this temperature sampling is greedy: logits divided by a temperature near 0 overflow to
# inf (1e-45 does it to any logit) and the softmax gives NaN; long before that it is one-hot
# anyway (at 1e-5 a token 1e-4 below the top one gets e**-10 of its probability).
GREEDY_BELOW_TEMPERATURE = 1e-5
# torch.Generator.manual_seed takes -2**63 .. 2**64 - 1, as msgpack carries ints (shm.channel)
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # 0 = the top token only (greedy)
    top_k: int = 0             # 0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_p == 0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RingllmError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:        # also false for NaN
            raise RingllmError(f"--top-p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RingllmError(f"--top-k must be >= 0, got {self.top_k}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise RingllmError(f"--seed must be in {SEED_MIN}..{SEED_MAX} (64 bits), got {self.seed}")
