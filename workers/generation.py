"""Prefill + decode loop and sampling, shared by the resident and the streaming engines; with a
draft, the decode loop is workers.spec_decode's."""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.model import KVCache, Llama
from ringllm.workers.sampling import SamplingParams  # noqa: F401  (defined here before; torch-free now)
from ringllm.workers.spec_decode import speculate
from ringllm.workers.speculation import SpecStats, cache_slots


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


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampler: Sampler,
             eos_ids: Sequence[int], on_tokens: Callable[[list[int]], None] | None = None,
             max_context: int | None = None, spec_stats: SpecStats | None = None) -> list[list[int]]:
    """Left-pad the prompts, prefill, then decode until every row hit EOS or max_new_tokens.

    on_tokens(step_tokens) is called after every step with one token per row (finished rows
    repeat their EOS); a speculative pass calls it once per token it produced. Returns each
    row's new tokens, EOS included when it was produced. With the sampler's params carrying a
    draft (workers.speculation), decoding is speculative and its counts go into spec_stats.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RingllmError("every prompt must have at least one token")
    lengths = [len(p) for p in prompts]
    longest, batch = max(lengths), len(prompts)
    total = longest + max_new_tokens
    if max_context is not None and total > max_context:
        raise RingllmError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{max_context} tokens (max_position_embeddings)")
    draft = getattr(sampler.params, "draft", None)
    if draft is not None and batch > 1:
        raise RingllmError(f"--draft {draft.kind} with {batch} prompts: speculative decoding "
                           "takes one prompt at a time (batches are not supported yet)")
    # a draft's room past the new tokens, where the context allows it (speculation.cache_slots)
    slots_total = cache_slots(longest, max_new_tokens, sampler.params)
    if max_context is not None:
        slots_total = min(slots_total, max(total, max_context))
    device = model.device
    pad = torch.tensor([longest - n for n in lengths], device=device)
    # token ids stay on the host: the embedding gathers them where its table lives (DRAM for the
    # streaming engine on cuda), so no forward pass copies ids back from the device
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts])
    slots = torch.arange(longest, device=device)[None, :]
    positions = (slots - pad[:, None]).clamp(min=0)
    key_valid = torch.arange(slots_total, device=device)[None, :] >= pad[:, None]     # [B, slots]
    cache = KVCache(model.cfg, batch, slots_total, model.dtype, device)

    logits = model.forward(tokens, positions, cache, 0, key_valid)
    eos = set(eos_ids)
    if draft is not None:
        return [speculate(model, list(prompts[0]), logits, cache, key_valid, max_new_tokens, sampler,
                          eos, on_tokens, draft, spec_stats if spec_stats is not None else SpecStats())]
    pad_token = min(eos) if eos else 0
    finished = [False] * batch
    out: list[list[int]] = [[] for _ in prompts]
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        step_tokens = sampler(logits).tolist()       # one host sync per token, not per layer
        for row, tok in enumerate(step_tokens):
            if finished[row]:
                step_tokens[row] = pad_token         # finished rows keep feeding EOS
            else:
                out[row].append(tok)
                finished[row] = tok in eos
        if on_tokens is not None:
            on_tokens(step_tokens)
        if all(finished) or step == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        nxt = torch.tensor(step_tokens)
        logits = model.forward(nxt[:, None], last_pos[:, None], cache, longest + step, key_valid)
    return out
