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
MAX_TOP_LOGPROBS = 20      # OpenAI's limit on alternatives per token; it also bounds an event's size


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # 0 = the top token only (greedy)
    top_k: int = 0             # 0 = off
    seed: int | None = None
    # OpenAI's penalties over the tokens generated so far, and logit_bias as (token id, bias)
    # pairs; applied to the logits before temperature, top-k/top-p and greedy (generation.Sampler)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

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
            raise RingllmError(f"--seed must be a 64-bit integer (-2**63 .. 2**64 - 1), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:     # also false for NaN
                raise RingllmError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise RingllmError(f"logit_bias of token {token} must be in [-100, 100], got {bias}")
