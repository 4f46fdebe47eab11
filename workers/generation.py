"""Sampling (one request's Sampler), and `generate`: the request engine's client for a fixed set
of prompts (tests, tools, the resident `ringllm generate`)."""
from __future__ import annotations

from typing import Callable, Sequence

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.engine import Engine, prompt_requests
from ringllm.workers.model import Llama
from ringllm.workers.sampler import Sampler
from ringllm.workers.sampling import SamplingParams
from ringllm.workers.speculation import SpecStats, cache_slots


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams | Sampler,
             eos_ids: Sequence[int], on_token: Callable[[int, int], None] | None = None,
             max_context: int | None = None, spec_stats: SpecStats | None = None) -> list[list[int]]:
    """A client of the request engine (workers.engine) for a fixed set of prompts: each prompt is
    one request (all in one pass, with the draft the sampling carries, if any), stepped until all
    are done. Returns each prompt's new tokens, EOS included when it was produced.

    on_token(prompt index, token) is called for every token as it comes. Prompt i samples with
    seed + i when the sampling has a seed (each request its own generator: rows draw apart, and
    alike run to run). The engine's speculation totals are added into spec_stats."""
    params = sampling.params if isinstance(sampling, Sampler) else sampling
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RingllmError("every prompt must have at least one token")
    longest = max(len(p) for p in prompts)
    limit = max_context if max_context is not None else model.cfg.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise RingllmError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                           f"{limit} tokens (max_position_embeddings)")
    draft = getattr(params, "draft", None)
    # room for a pass's drafts past the last new token, where the context allows it
    context = min(cache_slots(longest, max_new_tokens, params), model.cfg.max_position_embeddings)
    engine = Engine(model, len(prompts), max(context, 2), draft=draft)
    for req in prompt_requests(prompts, max_new_tokens, params, eos_ids):
        engine.submit(req)
    out: list[list[int]] = [[] for _ in prompts]
    while not engine.idle():
        for event in engine.step():
            if event.finish == "error":
                raise RingllmError(f"prompt {event.id}: sampling failed")
            if event.token is not None:
                out[int(event.id)].append(event.token)
                if on_token is not None:
                    on_token(int(event.id), event.token)
    if spec_stats is not None and engine.spec is not None:
        spec_stats.merge(engine.spec)
    return out
