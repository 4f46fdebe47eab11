"""Prefill + decode loop and sampling, shared by the resident and the streaming engines."""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.model import KVCache, Llama
from ringllm.workers.sampling import SamplingParams  # noqa: F401  (defined here before; torch-free now)


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        params.validate()
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> next tokens [B]."""
        p = self.params
        if p.temperature == 0:
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
             max_context: int | None = None) -> list[list[int]]:
    """Left-pad the prompts, prefill, then decode until every row hit EOS or max_new_tokens.

    on_tokens(step_tokens) is called after every step with one token per row (finished rows
    repeat their EOS). Returns each row's new tokens, EOS included when it was produced.
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
    device = model.device
    pad = torch.tensor([longest - n for n in lengths], device=device)
    # token ids stay on the host: the embedding gathers them where its table lives (DRAM for the
    # streaming engine on cuda), so no forward pass copies ids back from the device
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts])
    slots = torch.arange(longest, device=device)[None, :]
    positions = (slots - pad[:, None]).clamp(min=0)
    key_valid = torch.arange(total, device=device)[None, :] >= pad[:, None]     # [B, total]
    cache = KVCache(model.cfg, batch, total, model.dtype, device)

    logits = model.forward(tokens, positions, cache, 0, key_valid)
    eos = set(eos_ids)
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
