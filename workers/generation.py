"""Prefill + decode loop and sampling, shared by the resident and the streaming engines."""
from __future__ import annotations

import random
import time
from typing import Callable, Sequence

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.model import KVCache, Llama
from ringllm.workers.sampling import SamplingParams  # noqa: F401  (defined here before; torch-free now)
from ringllm.workers.speculation import PROBE, NgramProposer, SpecStats, WidthProbe, accept_greedy, cache_slots


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
        return [_speculate(model, list(prompts[0]), logits, cache, key_valid, max_new_tokens, sampler,
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


def _speculate(model: Llama, prompt: list[int], logits: torch.Tensor, cache: KVCache, key_valid: torch.Tensor,
               max_new_tokens: int, sampler: Sampler, eos: set[int], on_tokens, draft,
               stats: SpecStats) -> list[int]:
    """Greedy decoding of one row, verifying drafts (prompt lookup or a draft model): each pass runs [last accepted
    token, d1..dk] in one forward and keeps what greedy decoding would have produced.

    KV invariant: cache slots 0..len(seq)-2 hold exactly the accepted sequence (the newest
    accepted token is not in it yet; it leads the next pass). A pass writes slots
    len(seq)-1 .. len(seq)-1+k; the entries of rejected drafts lie at or past the next pass's
    start, and the model writes its slots start..start+T-1 before attending to :start+T, so a
    rejected entry is overwritten before it is ever read, and slots past it are never read.
    Drafts never run past the cache (k <= slots - len(seq)); tokens past max_new_tokens are cut.
    """
    slots = key_valid.shape[1]
    if draft.kind == PROBE:
        proposer = WidthProbe(draft.probe_widths, list(prompt))
    elif draft.model_dir is None:
        proposer = NgramProposer(draft.ngram_max, list(prompt))
    else:
        proposer = DraftModelProposer.load(draft.model_dir, list(prompt), slots, model.dtype, model.device)
    first = sampler(logits).tolist()[0]
    out = [first]
    proposer.seq.append(first)
    stats.draft = draft.kind
    if on_tokens is not None:
        on_tokens([first])
    while out[-1] not in eos and len(out) < max_new_tokens:
        seq = proposer.seq
        t0 = time.perf_counter()
        drafts = proposer.propose(min(draft.spec_tokens, slots - len(seq)))
        t1 = time.perf_counter()
        stats.draft_seconds += t1 - t0
        start = len(seq) - 1
        chain = torch.tensor([[seq[-1], *drafts]])
        positions = torch.arange(start, start + chain.shape[1], device=model.device)[None]
        logits = model.forward(chain, positions, cache, start, key_valid, all_logits=True)   # [1, T, V]
        target = sampler(logits[0]).tolist()           # greedy: the argmax after each position
        stats.pass_log.append([chain.shape[1], time.perf_counter() - t1])   # tolist() waited for the pass
        accepted = accept_greedy(drafts, target)[:max_new_tokens - len(out)]
        emitted = 0
        for tok in accepted:                           # an EOS cuts the accepted run
            out.append(tok)
            seq.append(tok)
            emitted += 1
            if on_tokens is not None:
                on_tokens([tok])
            if tok in eos:
                break
        stats.passes += 1
        stats.tokens += emitted
        stats.drafted += len(drafts)
        stats.accepted += min(len(accepted) - 1, emitted)
    return out


class DraftModelProposer:
    """`--draft DIR`: a small Llama, whole on the compute device, proposing greedily.

    KV invariant (the target's argument, for the draft's own cache): slots 0..cached-1 hold the
    accepted sequence seq[:cached]. A pass first catches up on seq[cached:] (the tokens accepted
    since the last pass, the whole prompt on the first), then feeds its own drafts d1..d(k-1) at
    len(seq).. to get d2..dk. Those draft slots lie at or past the next catch-up's start, which
    writes them before attending to them, so a rejected draft's entry is never read.
    """

    def __init__(self, model: Llama, seq: list[int], max_seq: int):
        self.model, self.seq, self.cached = model, seq, 0
        self.cache = KVCache(model.cfg, 1, max_seq, model.dtype, model.device)
        self.key_valid = torch.ones(1, max_seq, dtype=torch.bool, device=model.device)   # one row, no padding

    @classmethod
    def load(cls, model_dir: str, seq: list[int], max_seq: int, dtype: torch.dtype, device: torch.device):
        """The resident engine's loading: every weight on `device`, in the target's compute dtype
        (an FP8 draft stays FP8)."""
        from ringllm.checkpoint.layout import load_layout
        from ringllm.workers.resident import ResidentSource, load_resident_weights

        layout = load_layout(model_dir)
        if max_seq > layout.config.max_position_embeddings:
            raise RingllmError(f"--draft {model_dir}: prompt + new tokens ({max_seq}) exceed the draft's context of "
                               f"{layout.config.max_position_embeddings} tokens (max_position_embeddings)")
        model = Llama(layout.config, load_resident_weights(layout, dtype, device),
                      ResidentSource(layout, dtype, device), dtype, device)
        return cls(model, seq, max_seq)

    def _step(self, tokens: list[int], start: int) -> int:
        """Feed tokens at positions start.., return the greedy token after the last."""
        positions = torch.arange(start, start + len(tokens), device=self.model.device)[None]
        logits = self.model.forward(torch.tensor([tokens]), positions, self.cache, start, self.key_valid)
        return int(logits[0].argmax())

    def propose(self, limit: int) -> list[int]:
        if limit <= 0:
            return []
        nxt = self._step(self.seq[self.cached:], self.cached)     # catch up: seq[:len(seq)] cached now
        self.cached = len(self.seq)
        drafts = [nxt]
        while len(drafts) < limit:
            drafts.append(self._step([drafts[-1]], self.cached + len(drafts) - 1))
        return drafts
