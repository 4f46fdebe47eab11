"""Draft trees for the request engine (workers.engine), the torch side: the verification
segment of a tree, and the draft model, which proposes a tree for every drafting request of a pass
in one batched forward per level. The tree, the accept rule and prompt lookup are torch-free
(workers.speculation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.model import ALL, LAST, KVCache, Llama, Segment
from ringllm.workers.speculation import DraftTree

# Greedy verification accepts a node when it is the target's argmax, which a draft's top token is
# far more often than the draft's probability for it says: ranked by the plain probabilities, the
# tree spends its nodes on shallow alternatives. Sharpened, it goes deeper. Measured (SmolLM2-135M
# drafted by its FP8 copy, 3 prompts, --spec-tokens 4 and 8): tokens per pass 3.0-6.5 at 1.0,
# 3.55-6.5 at 0.5, about the same at 0.25 and 0.1; 0.5 keeps some width for weaker drafts.
GREEDY_RANK_TEMPERATURE = 0.5


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[N, N] bool on the cpu: row i sees column j iff j is i or one of its ancestors; parents[i] < i
    is an index into the same list, or -1 (a parent outside it, which every row sees anyway)."""
    n = len(parents)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            seen[i] = seen[parent]
        seen[i, i] = True
    return seen


def verify_segment(row: int, root: int, start: int, tree: DraftTree) -> Segment:
    """The target's pass over [root, nodes...] at slots start.. of `row`: node i at pass position
    i + 1, rotary position start + its depth, seeing itself and its ancestors; every token's logits."""
    if not len(tree):
        return Segment(row, [root], start)
    attend = None if tree.is_chain else ancestor_mask([-1] + [p + 1 for p in tree.parents])
    return Segment(row, [root, *tree.tokens], start, [start + d for d in (0, *tree.depths())], attend, ALL)


def accepted_moves(start: int, path: list[int]) -> tuple[list[int], list[int]]:
    """(destination, source) slots that put a verified tree's accepted nodes (pass positions
    path[0] < path[1] < ...) right after the root at `start`, where the sequence continues (the
    rotary position there is the node's depth already). Nodes left past the path are rejected:
    the next pass starts at or before them and writes them before anything attends to them."""
    moves = [(start + 1 + i, start + p) for i, p in enumerate(path) if p != i + 1]
    return [d for d, _ in moves], [s for _, s in moves]


@dataclass
class _Search:
    """One request's best-first tree search (DraftModel.propose): `limit` nodes at most, by
    cumulative draft log probability (ties to the earlier node, so a parent ranks before its
    child and the set is always a tree)."""
    row: int
    cached: int                      # the draft's slots holding the sequence; fed nodes follow
    limit: int
    room: int                        # slots for fed nodes
    rank_temperature: float
    tok: list = field(default_factory=list)       # per node, in creation order
    parent: list = field(default_factory=list)    # a node id, -1 for the root
    depth: list = field(default_factory=list)
    kept: list = field(default_factory=list)      # the likeliest nodes so far, in id order
    kept_logp: torch.Tensor | None = None
    frontier: list = field(default_factory=lambda: [-1])
    frontier_logp: torch.Tensor | None = None
    fed: dict = field(default_factory=dict)       # node id -> its slot past `cached`

    def grow(self, level: int, logits: torch.Tensor) -> bool:
        """Take the frontier's logits [F, V]; True while another level should be fed."""
        logp = (logits / self.rank_temperature).log_softmax(-1)
        if self.kept_logp is None:
            self.kept_logp = logp.new_zeros(0)
            self.frontier_logp = logp.new_zeros(1)
        k = min(self.limit, logp.shape[-1])
        top, top_tok = logp.topk(k, dim=-1)                                      # [F, k]
        top_tok = top_tok.tolist()
        pool = torch.cat((self.kept_logp, (self.frontier_logp[:, None] + top).flatten()))
        best = torch.sort(pool, descending=True, stable=True).indices[:self.limit].sort().values.tolist()
        kept = len(self.kept)
        old = [i for i in best if i < kept]
        new_ids = []
        for c in (i - kept for i in best if i >= kept):       # candidate (frontier f, child j)
            f, j = divmod(c, k)
            new_ids.append(len(self.tok))
            self.tok.append(top_tok[f][j])
            self.parent.append(self.frontier[f])
            self.depth.append(level)
        self.kept_logp = pool[torch.tensor(best, dtype=torch.long, device=pool.device)]
        self.kept = [self.kept[i] for i in old] + new_ids
        self.frontier = new_ids[:self.room - len(self.fed)]
        if level == self.limit or not self.frontier:
            return False
        self.frontier_logp = self.kept_logp[len(old):len(old) + len(self.frontier)]
        return True

    def frontier_segment(self) -> Segment:
        """The frontier fed at the next fed slots, each node seeing its fed ancestors."""
        start = self.cached + len(self.fed)
        for n in self.frontier:
            self.fed[n] = len(self.fed)
        attend = torch.zeros(len(self.frontier), len(self.fed), dtype=torch.bool)
        for i, n in enumerate(self.frontier):
            while n >= 0:                 # every ancestor was fed (a frontier node once)
                attend[i, self.fed[n]] = True
                n = self.parent[n]
        return Segment(self.row, [self.tok[n] for n in self.frontier], start,
                       [self.cached - 1 + self.depth[n] for n in self.frontier], attend, ALL)

    def tree(self) -> DraftTree:
        index = {n: i for i, n in enumerate(self.kept)}
        return DraftTree(tuple(self.tok[n] for n in self.kept),
                         tuple(index[self.parent[n]] if self.parent[n] >= 0 else -1 for n in self.kept))


class DraftModel:
    """`--draft-model DIR`: a small Llama, whole on the compute device, with a KV row for each of
    the engine's rows. It proposes a tree for each drafting request best-first (SpecExec-style),
    all requests together: one forward catches every request up, then one forward per level feeds
    every request's frontier (its nodes added last level).

    KV invariant (per row of the draft's own cache): slots 0..cached-1 hold seq[:cached]. A
    proposal first catches up on seq[cached:] (the tokens accepted since the last proposal, the
    whole prompt on the first), then feeds tree nodes at slots cached.. . Those slots lie at or
    past the next catch-up's start, which writes them before attending to them (causally), so a
    node's entry is never read by a later proposal. The accepted nodes are re-fed by that catch-up
    rather than moved: it runs anyway (for the target's own last token)."""

    def __init__(self, model: Llama, rows: int, max_seq: int):
        self.model = model
        self.cache = KVCache(model.cfg, rows, max_seq, model.dtype, model.device)
        self.cached = [0] * rows

    @classmethod
    def load(cls, model_dir: str, rows: int, max_context: int, spec_tokens: int, dtype: torch.dtype,
             device: torch.device) -> "DraftModel":
        """Every weight on `device`, in the target's compute dtype (an FP8 draft stays FP8). Its
        rows hold max_context slots plus spec_tokens, so a tree may feed twice its nodes (wider
        levels) past the sequence."""
        from ringllm.checkpoint.layout import load_layout
        from ringllm.workers.resident import ResidentSource, load_resident_weights

        layout = load_layout(model_dir)
        if max_context > layout.config.max_position_embeddings:
            raise RingllmError(f"--draft {model_dir}: a context of {max_context} tokens exceeds the draft's "
                               f"{layout.config.max_position_embeddings} (max_position_embeddings)")
        model = Llama(layout.config, load_resident_weights(layout, dtype, device),
                      ResidentSource(layout, dtype, device), dtype, device)
        return cls(model, rows, max_context + spec_tokens)

    def reset(self, row: int) -> None:
        """A new request took the row: nothing of it is cached."""
        self.cached[row] = 0

    def propose(self, asks: list[tuple[int, list[int], int, float]]) -> list[DraftTree]:
        """asks: (row, sequence, node limit, rank temperature) per drafting request -> its tree."""
        trees = [DraftTree()] * len(asks)
        live = [i for i, (_, _, limit, _) in enumerate(asks) if limit > 0]
        if not live:
            return trees
        searches, catch_up = {}, []
        for i in live:
            row, seq, limit, rank_temperature = asks[i]
            cached = self.cached[row]
            catch_up.append(Segment(row, seq[cached:], cached, logits=LAST))
            self.cached[row] = len(seq)
            searches[i] = _Search(row, len(seq), limit, self.cache.max_seq - len(seq), rank_temperature)
        logits = self.model.forward(self.cache, catch_up)                    # [R, V]: each root's
        parts = {i: logits[j:j + 1] for j, i in enumerate(live)}
        level = 1
        while parts:
            growing = [i for i, part in parts.items() if searches[i].grow(level, part)]
            if not growing:
                break
            segments = [searches[i].frontier_segment() for i in growing]
            logits = self.model.forward(self.cache, segments)
            parts, offset = {}, 0
            for i, seg in zip(growing, segments):
                parts[i] = logits[offset:offset + len(seg.tokens)]
                offset += len(seg.tokens)
            level += 1
        for i in live:
            trees[i] = searches[i].tree()
        return trees
