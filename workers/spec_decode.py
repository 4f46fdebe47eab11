"""Speculative decoding, the torch side: one forward verifies a draft tree (workers.speculation:
the tree, the accept rule, the prompt-lookup proposer), the KV cache is compacted to the accepted
path, and the draft model proposes trees best-first. Resident and streaming engines alike: only
the tokens, positions, mask and cache of the forward differ from a plain decode step.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.model import KVCache, Llama
from ringllm.workers.speculation import PROBE, DraftTree, NgramProposer, SpecStats, WidthProbe, walk_tree

if TYPE_CHECKING:
    from ringllm.workers.generation import Sampler


def ancestor_mask(parents: list[int], device) -> torch.Tensor:
    """[N, N] bool: row i sees column j iff j is i or one of its ancestors; parents[i] < i is an
    index into the same list, or -1 (a parent outside it, which every row sees anyway)."""
    n = len(parents)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            seen[i] = seen[parent]
        seen[i, i] = True
    return seen.to(device)


def tree_attend(tree: DraftTree, device) -> torch.Tensor | None:
    """The verification pass's mask over [root, nodes...] (Llama.forward's `attend`); None for a
    chain, whose causal mask is the same."""
    if tree.is_chain:
        return None
    return ancestor_mask([-1] + [parent + 1 for parent in tree.parents], device)


def compact_kv(cache: KVCache, start: int, path: list[int]) -> None:
    """The pass wrote pass position j's K/V (every layer) at slot start+j; the accepted nodes sit
    at positions path[0] < path[1] < ... Move the i-th to slot start+1+i, where the accepted
    sequence continues (its rotary position start+1+i is the node's depth already). Entries left
    past the path are rejected nodes: the next pass starts at or before them and overwrites them."""
    moves = [(start + 1 + i, start + p) for i, p in enumerate(path) if p != i + 1]
    if not moves:                   # a chain's accepted prefix is in place already
        return
    dst = torch.tensor([d for d, _ in moves], device=cache.k.device)
    src = torch.tensor([s for _, s in moves], device=cache.k.device)
    # the right side is gathered into a new tensor first: overlapping slots are safe
    cache.k[:, :, :, dst] = cache.k[:, :, :, src]
    cache.v[:, :, :, dst] = cache.v[:, :, :, src]


def speculate(model: Llama, prompt: list[int], logits: torch.Tensor, cache: KVCache, key_valid: torch.Tensor,
              max_new_tokens: int, sampler: Sampler, eos: set[int], on_tokens, draft,
              stats: SpecStats) -> list[int]:
    """Decode one row (after its prefill gave `logits`), verifying a draft tree per pass: greedy
    or sampling, exactly as decoding without a draft would (speculation.walk_tree).

    KV invariant, restored by compact_kv after every pass: cache slots 0..len(seq)-2 hold exactly
    the accepted sequence (the newest accepted token is not in it yet; it is the next pass's
    root). A pass writes slots len(seq)-1 .. len(seq)-1+nodes; the accepted nodes are moved to
    the slots right after the root, the rest lie at or past the next pass's start, and the model
    writes its slots start..start+T-1 before attending to :start+T, so a rejected entry is
    overwritten before it is ever read and slots past it are never read. Trees never run past the
    cache (nodes <= slots - len(seq)); tokens past max_new_tokens are cut.
    """
    slots = key_valid.shape[1]
    temperature = 0.0 if sampler.params.greedy else sampler.params.temperature
    proposer = make_proposer(draft, prompt, model, slots, temperature)
    first = sampler(logits).tolist()[0]
    out = [first]
    proposer.seq.append(first)
    stats.draft = draft.kind
    if on_tokens is not None:
        on_tokens([first])
    while out[-1] not in eos and len(out) < max_new_tokens:
        seq = proposer.seq
        t0 = time.perf_counter()
        # With ranks, rank 0 drafts for all: every rank must verify the same tree (the verify
        # pass is a chain of gathers of its shape), and a draft model's forward on each GPU need
        # not round alike; prompt lookup would agree, but one rule serves both
        tree = None
        if not isinstance(proposer, RankFollower):
            tree = proposer.propose(min(draft.spec_tokens, slots - len(seq)))
        if model.tp is not None:
            tree = model.tp.from_rank_0(tree, model.device)
        t1 = time.perf_counter()
        stats.draft_seconds += t1 - t0
        start = len(seq) - 1
        tokens = torch.tensor([[seq[-1], *tree.tokens]])
        positions = (start + torch.tensor([0, *tree.depths()], device=model.device))[None]
        logits = model.forward(tokens, positions, cache, start, key_valid, all_logits=True,
                               attend=tree_attend(tree, model.device))             # [1, T, V]
        # one independent draw per node (the argmax when greedy); the walk reads those on its path
        target = sampler(logits[0]).tolist()
        stats.record_verify(tokens.shape[1], time.perf_counter() - t1)   # tolist() waited for the pass
        emitted, path = walk_tree(tree, target)
        compact_kv(cache, start, path)
        taken = 0
        for tok in emitted[:max_new_tokens - len(out)]:     # an EOS cuts the accepted run
            out.append(tok)
            seq.append(tok)
            taken += 1
            if on_tokens is not None:
                on_tokens([tok])
            if tok in eos:
                break
        stats.passes += 1
        stats.tokens += taken
        stats.drafted += len(tree)
        stats.accepted += min(len(path), taken)
        stats.branched += not tree.is_chain
    return out


# Greedy verification accepts a node when it is the target's argmax, which a draft's top token is
# far more often than the draft's probability for it says: ranked by the plain probabilities, the
# tree spends its nodes on shallow alternatives. Sharpened, it goes deeper. Measured (SmolLM2-135M
# drafted by its FP8 copy, 3 prompts, --spec-tokens 4 and 8): tokens per pass 3.0-6.5 at 1.0,
# 3.55-6.5 at 0.5, about the same at 0.25 and 0.1; 0.5 keeps some width for weaker drafts.
GREEDY_RANK_TEMPERATURE = 0.5


class RankFollower:
    """Tensor-parallel ranks 1..: rank 0 drafts for every rank and hands its tree over
    (speculate), so these keep only the sequence, and no draft model."""

    def __init__(self, seq: list[int]):
        self.seq = seq


def make_proposer(draft, prompt: list[int], model: Llama, slots: int, temperature: float):
    if model.tp is not None and model.tp.rank > 0:
        return RankFollower(list(prompt))
    if draft.kind == PROBE:
        return WidthProbe(draft.probe_widths, list(prompt))
    if draft.model_dir is None:
        return NgramProposer(draft.ngram_max, list(prompt))
    # sampling accepts child c with the target's probability of c at --temperature: the draft's
    # probability at that temperature estimates it
    rank_temperature = temperature if temperature > 0 else GREEDY_RANK_TEMPERATURE
    return DraftModelProposer.load(draft.model_dir, list(prompt), slots, draft.spec_tokens, rank_temperature,
                                   model.dtype, model.device)


class DraftModelProposer:
    """`--draft DIR`: a small Llama, whole on the compute device, proposing a tree best-first by
    cumulative draft probability (SpecExec-style; its logits at rank_temperature), `limit` nodes
    at most.

    Level by level: the frontier (the nodes added last level) is fed to the draft in one forward
    with a tree mask over the nodes fed so far; each frontier node's `limit` likeliest children
    join the candidates, and the `limit` likeliest nodes found so far (a node's cumulative log
    probability is its path's sum; ties go to the earlier node, so a parent ranks before its
    child and the set is always a tree) are kept: the next frontier is the new ones among them.
    It stops at depth `limit`, when no new node makes the cut, or when the draft's cache is full.

    KV invariant (the draft's own cache): slots 0..cached-1 hold seq[:cached]. A proposal first
    catches up on seq[cached:] (the tokens accepted since the last proposal, the whole prompt on
    the first), then feeds tree nodes at slots cached.. . Those slots lie at or past the next
    catch-up's start, which writes them before attending to them (causally), so a node's entry
    is never read by a later proposal. The accepted nodes are re-fed by that catch-up rather than
    compacted: the catch-up runs anyway (for the target's own last token), and it spares mapping
    the target's accepted path onto the draft's fed nodes, a few tokens of a small model's pass.
    """

    def __init__(self, model: Llama, seq: list[int], max_seq: int, rank_temperature: float = 1.0):
        self.model, self.seq, self.cached, self.rank_temperature = model, seq, 0, rank_temperature
        self.cache = KVCache(model.cfg, 1, max_seq, model.dtype, model.device)
        self.key_valid = torch.ones(1, max_seq, dtype=torch.bool, device=model.device)   # one row, no padding

    @classmethod
    def load(cls, model_dir: str, seq: list[int], max_seq: int, spec_tokens: int, rank_temperature: float,
             dtype: torch.dtype, device: torch.device):
        """The resident engine's loading: every weight on `device`, in the target's compute dtype
        (an FP8 draft stays FP8). Its cache: the target's slots plus spec_tokens, so a tree may
        feed twice its nodes (wider levels) past the sequence."""
        from ringllm.checkpoint.layout import load_layout
        from ringllm.workers.resident import ResidentSource, load_resident_weights

        layout = load_layout(model_dir)
        if max_seq > layout.config.max_position_embeddings:
            raise RingllmError(f"--draft {model_dir}: prompt + new tokens ({max_seq}) exceed the draft's context of "
                               f"{layout.config.max_position_embeddings} tokens (max_position_embeddings)")
        model = Llama(layout.config, load_resident_weights(layout, dtype, device),
                      ResidentSource(layout, dtype, device), dtype, device)
        return cls(model, seq, max_seq + spec_tokens, rank_temperature)

    def _forward(self, tokens: list[int], positions: list[int], start: int, attend=None) -> torch.Tensor:
        """Log probabilities [T, V] (float32) after each token fed at slots start.. (after the last
        only, [1, V], without a tree: the catch-up)."""
        pos = torch.tensor([positions], device=self.model.device)
        logits = self.model.forward(torch.tensor([tokens]), pos, self.cache, start, self.key_valid,
                                    all_logits=attend is not None, attend=attend)
        return (logits.view(-1, logits.shape[-1]) / self.rank_temperature).log_softmax(-1)

    def propose(self, limit: int) -> DraftTree:
        if limit <= 0:
            return DraftTree()
        seq, cached = self.seq, self.cached
        logp = self._forward(seq[cached:], list(range(cached, len(seq))), cached)   # the root's
        self.cached = cached = len(seq)
        room = self.cache.max_seq - cached           # slots for fed nodes
        tok: list[int] = []                          # per node (ids in creation order)
        parent: list[int] = []                       # a node id, -1 for the root
        depth: list[int] = []
        kept: list[int] = []                         # the likeliest nodes so far, in id order
        kept_logp = torch.zeros(0, device=logp.device)
        frontier, frontier_logp = [-1], torch.zeros(1, device=logp.device)
        fed: dict[int, int] = {}                     # node id -> its slot past `cached`
        k = min(limit, logp.shape[-1])
        for level in range(1, limit + 1):
            top, top_tok = logp.topk(k, dim=-1)                                      # [F, k]
            top_tok = top_tok.tolist()
            pool = torch.cat((kept_logp, (frontier_logp[:, None] + top).flatten()))
            best = torch.sort(pool, descending=True, stable=True).indices[:limit].sort().values.tolist()
            old = [i for i in best if i < len(kept)]
            new_ids = []
            for c in (i - len(kept) for i in best if i >= len(kept)):   # candidate (frontier f, child j)
                f, j = divmod(c, k)
                new_ids.append(len(tok))
                tok.append(top_tok[f][j])
                parent.append(frontier[f])
                depth.append(level)
            kept_logp = pool[torch.tensor(best, dtype=torch.long, device=pool.device)]
            kept = [kept[i] for i in old] + new_ids
            frontier = new_ids[:room - len(fed)]
            if level == limit or not frontier:
                break
            frontier_logp = kept_logp[len(old):len(old) + len(frontier)]
            start = cached + len(fed)
            for n in frontier:
                fed[n] = len(fed)
            attend = torch.zeros(len(frontier), len(fed), dtype=torch.bool)
            for row, n in enumerate(frontier):
                while n >= 0:                        # every ancestor was fed (a frontier node once)
                    attend[row, fed[n]] = True
                    n = parent[n]
            logp = self._forward([tok[n] for n in frontier], [cached - 1 + depth[n] for n in frontier], start,
                                 attend.to(self.model.device))
        index = {n: i for i, n in enumerate(kept)}
        return DraftTree(tuple(tok[n] for n in kept), tuple(index[parent[n]] if parent[n] >= 0 else -1 for n in kept))
