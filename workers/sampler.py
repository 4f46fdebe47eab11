"""One request's sampler: its own generator (a seeded request draws alike whatever shares its
pass), logit_bias and OpenAI's penalties, temperature, top-k, top-p."""
from __future__ import annotations

import random

import torch

from ringllm.workers.sampling import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        params.validate()
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
        self.counts: torch.Tensor | None = None     # [V] times each token was generated (penalties)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] with logit_bias added and OpenAI's penalties over the tokens generated so
        far (observe) subtracted: presence once a token appeared, frequency times its count."""
        p = self.params
        if not p.adjusts_logits:
            return logits
        logits = logits.clone()
        if p.logit_bias:
            tokens, biases = zip(*p.logit_bias)
            logits[..., list(tokens)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        if self.counts is not None:
            logits -= p.presence_penalty * (self.counts > 0) + p.frequency_penalty * self.counts
        return logits

    def observe(self, token: int, vocab: int, device) -> None:
        """Counts a generated token for the penalties (a [V] tensor: it does not grow with the run)."""
        if not (self.params.presence_penalty or self.params.frequency_penalty):
            return
        if self.counts is None:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.counts[token] += 1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> next tokens [B]."""
        p = self.params
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            drop_sorted = probs.cumsum(-1) - probs > p.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
