"""Speculative decoding: `--draft ngram` (prompt lookup: the n-gram proposer) or `--draft DIR` (a
small draft model: workers.spec_decode.DraftModelProposer), the draft tree, and the accept rule.
Torch-free: the supervisor's side of a run imports the parameters and checks a draft model's
vocabulary; the torch side (the verification pass, the KV compaction) is workers.spec_decode.

A pass verifies a draft TREE: its root is the last accepted token, each node a drafted token
whose parent is the token before it (a chain is a tree with one branch). One forward runs every
node, each seeing only its ancestors (a tree attention mask, position = start + depth). The
target's token at each node is then drawn as decoding without a draft would draw it there (the
argmax when greedy, a sample of its processed distribution otherwise), and the walk from the root
follows the child carrying that token, stopping where no child does: the path's tokens plus the
target's token at its end are emitted. Greedy: exactly greedy decoding's output, whatever the
drafts were. Sampling: the drafts are a deterministic function of the sequence, so moving to the
child c whose token was drawn is accepting c with probability p(c) and otherwise emitting a draw
from p restricted to the non-children, renormalised: the standard rule, which keeps the target's
distribution exactly (SpecExec).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.sampling import SamplingParams

DRAFTS = ("ngram",)
PROBE = "probe"           # tools.spec_bench only: fixed-width passes of filler drafts (no user flag)


@dataclass(frozen=True)
class DraftParams:
    kind: str = "ngram"
    spec_tokens: int = 8      # draft tree nodes verified per pass at most (K)
    ngram_max: int = 3        # longest suffix looked up
    # kind "probe": the tokens each pass verifies, in turn (the verification cost curve)
    probe_widths: tuple[int, ...] = ()

    @property
    def model_dir(self) -> str | None:
        """The draft model's directory, or None for prompt lookup (and the bench's probe)."""
        return None if self.kind in DRAFTS or self.kind == PROBE else self.kind

    def validate(self) -> None:
        if self.kind == PROBE and not all(w >= 1 for w in self.probe_widths or (0,)):
            raise RingllmError(f"probe widths must be >= 1 tokens, got {self.probe_widths}")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise RingllmError(f"--draft {self.kind}: neither 'ngram' (prompt lookup) nor a model directory "
                               "(no config.json there)")
        if self.spec_tokens < 1:
            raise RingllmError(f"--spec-tokens must be >= 1, got {self.spec_tokens}")
        if self.ngram_max < 1:
            raise RingllmError(f"--ngram-max must be >= 1, got {self.ngram_max}")


@dataclass(frozen=True)
class SpeculativeSampling(SamplingParams):
    """SamplingParams that also carry the draft: it reaches the GPU process the way sampling does
    (the supervisor passes it through untouched)."""
    draft: DraftParams | None = None

    def validate(self) -> None:
        super().validate()
        if self.draft is not None:
            self.draft.validate()


def cache_slots(longest_prompt: int, max_new_tokens: int, sampling) -> int:
    """KV cache slots (and the memory plan's sequence length) of a run: prompt + new tokens, plus
    room for one pass's drafts with a draft, so that the last passes verify as many drafts as the
    first (their surplus tokens are cut at max_new_tokens, never written past the cache)."""
    draft = getattr(sampling, "draft", None)
    return longest_prompt + max_new_tokens + (draft.spec_tokens if draft is not None else 0)


@dataclass
class WidthTimes:
    """The verify passes of one width (tokens the target verified: 1 + tree nodes). The first
    pass of a width warms its kernels up (tools.spec_bench leaves it out): it has its own field."""
    passes: int = 0
    seconds: float = 0.0                  # all of them
    first_seconds: float = 0.0
    min_seconds: float | None = None      # the fastest after the first

    def add(self, seconds: float) -> None:
        if self.passes == 0:
            self.first_seconds = seconds
        else:
            self.min_seconds = seconds if self.min_seconds is None else min(self.min_seconds, seconds)
        self.passes += 1
        self.seconds += seconds


@dataclass
class SpecStats:
    """What `--metrics-json` reports under `speculation`. Its size does not grow with the run:
    the verify passes are summed per width, at most spec_tokens + 1 rows ([P12])."""
    draft: str = "ngram"
    passes: int = 0           # decode passes (the prefill not counted)
    tokens: int = 0           # tokens those passes produced
    drafted: int = 0          # draft tokens (tree nodes) verified
    accepted: int = 0         # of those, accepted
    branched: int = 0         # passes whose draft tree had more than one branch
    draft_seconds: float = 0.0  # time spent proposing (a draft model's forwards; ngram's lookups)
    # width -> the seconds of the target's forward and accept step in passes of that width
    verify_by_width: dict = field(default_factory=dict)

    def merge(self, other: "SpecStats") -> None:
        """Adds another run's counts (and its widths' times) into these."""
        for name in ("passes", "tokens", "drafted", "accepted", "branched", "draft_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.draft = other.draft
        for width, times in other.verify_by_width.items():
            mine = self.verify_by_width.setdefault(width, WidthTimes())
            if mine.passes == 0:
                mine.first_seconds = times.first_seconds
            mine.passes += times.passes
            mine.seconds += times.seconds
            if times.min_seconds is not None:
                mine.min_seconds = times.min_seconds if mine.min_seconds is None else min(mine.min_seconds, times.min_seconds)

    def record_verify(self, width: int, seconds: float) -> None:
        self.verify_by_width.setdefault(width, WidthTimes()).add(seconds)

    def as_dict(self) -> dict:
        verify = sum(t.seconds for t in self.verify_by_width.values())
        per = (lambda x: x / self.passes if self.passes else None)
        return {"draft": self.draft, "passes": self.passes, "tokens": self.tokens, "draft_seconds": self.draft_seconds,
                "tokens_per_pass": per(self.tokens),
                "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else None, "branched": self.branched,
                "draft_seconds_per_pass": per(self.draft_seconds), "verify_seconds_per_pass": per(verify),
                "verify_by_width": [{"tokens": w, **asdict(t)} for w, t in sorted(self.verify_by_width.items())]}


@dataclass(frozen=True)
class DraftTree:
    """The drafted tokens of one pass, below the root (the last accepted token): node i carries
    tokens[i] and hangs below parents[i] (-1: the root). Parents come before their children and
    siblings carry distinct tokens. In the verification pass node i sits at position i + 1
    (position 0 is the root), at depth depths()[i] below the root."""
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens, {len(self.parents)} parents")
        seen = set()
        for i, (tok, parent) in enumerate(zip(self.tokens, self.parents)):
            if not -1 <= parent < i or (parent, tok) in seen:
                raise ValueError(f"node {i}: parent {parent} not an earlier node, or a sibling carries {tok} too")
            seen.add((parent, tok))

    @classmethod
    def chain(cls, tokens) -> "DraftTree":
        tokens = tuple(tokens)
        return cls(tokens, tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    def depths(self) -> list[int]:
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 + (depth[parent] if parent >= 0 else 0))
        return depth

    def children(self) -> list[dict[int, int]]:
        """Per pass position (0 = the root): {token: pass position} of its children."""
        kids: list[dict[int, int]] = [{} for _ in range(len(self) + 1)]
        for i, (tok, parent) in enumerate(zip(self.tokens, self.parents)):
            kids[parent + 1][tok] = i + 1
        return kids


def walk_tree(tree: DraftTree, target: Sequence[int]) -> tuple[list[int], list[int]]:
    """The accept rule, greedy and sampling alike. target[j] is the target's token drawn at pass
    position j (0 = the root, i + 1 = node i) as decoding without a draft draws it there: its
    argmax, or a sample of its processed distribution (independent draws per position). From the
    root, move to the child carrying the drawn token while there is one; emit each drawn token.

    Returns (the emitted tokens: the accepted nodes' tokens and the target's token at the last
    one, pass positions of the accepted nodes). Only the draws along the path are read: each is
    made at a node the walk reached, so the output has the target's distribution whatever the
    (deterministic) tree was."""
    kids = tree.children()
    emitted, path, at = [], [], 0
    while True:
        tok = target[at]
        emitted.append(tok)
        at = kids[at].get(tok, 0)
        if not at:
            return emitted, path
        path.append(at)


def branch_tree(continuations: Sequence[Sequence[int]], limit: int) -> DraftTree:
    """Merge continuations (the likelier first) into one tree of at most `limit` nodes, sharing
    common prefixes. Grown level by level, so every branch gets as deep as the others before the
    budget runs out; one continuation gives a chain."""
    tokens: list[int] = []
    parents: list[int] = []
    node_of: dict[tuple[int, ...], int] = {}     # a continuation's prefix -> its node
    for depth in range(max(map(len, continuations), default=0)):
        for cont in continuations:
            key = tuple(cont[:depth + 1])
            if len(cont) <= depth or key in node_of:
                continue
            if len(tokens) == limit:
                return DraftTree(tuple(tokens), tuple(parents))
            node_of[key] = len(tokens)
            tokens.append(cont[depth])
            parents.append(node_of[key[:-1]] if depth else -1)
    return DraftTree(tuple(tokens), tuple(parents))


@dataclass
class WidthProbe:
    """tools.spec_bench's proposer: pass i verifies widths[i % len] tokens, a chain of filler
    drafts (the prompt's tokens over and over). A random-weight target rejects them, so each pass
    verifies exactly its width and yields one token: a pass's cost as a function of its width."""
    widths: tuple[int, ...]
    seq: list[int] = field(default_factory=list)
    turn: int = 0

    def propose(self, limit: int) -> DraftTree:
        width = self.widths[self.turn % len(self.widths)]
        self.turn += 1
        filler = self.seq * (1 + width // max(1, len(self.seq)))
        return DraftTree.chain(filler[:min(limit, width - 1)])


@dataclass
class NgramProposer:
    """Prompt lookup. The longest suffix of the sequence (n = ngram_max down to 1) that occurred
    earlier: what followed each earlier occurrence, the most recent first, merged into a tree
    (branch_tree): one branch per distinct continuation, a chain when there is one."""
    ngram_max: int
    seq: list[int] = field(default_factory=list)

    def propose(self, limit: int) -> DraftTree:
        seq, end = self.seq, len(self.seq)
        if limit <= 0:
            return DraftTree()
        for n in range(min(self.ngram_max, end - 1), 0, -1):
            suffix = seq[end - n:]
            follows: list[list[int]] = []
            # earlier occurrences end before the suffix itself does, so each has a continuation
            for at in range(end - n - 1, -1, -1):
                if seq[at:at + n] == suffix and seq[at + n:at + n + limit] not in follows:
                    follows.append(seq[at + n:at + n + limit])
                    if len(follows) == limit:       # more branches than nodes: never used
                        break
            if follows:
                return branch_tree(follows, limit)
        return DraftTree()


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_draft_vocab(target_dir, draft_dir) -> None:
    """A draft model must speak the target's tokens: same config.json vocab_size and special ids,
    same tokenizer vocabulary (added tokens included). Refuses with one line otherwise."""
    from tokenizers import Tokenizer

    def describe(d):
        d = Path(d)
        try:
            raw = json.loads((d / "config.json").read_text())
            vocab = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True)
        except Exception as err:   # tokenizers raises a plain Exception on a bad file
            raise RingllmError(f"--draft {draft_dir}: cannot read {d}'s config.json or tokenizer.json ({err})") from None
        return {"vocab_size": raw.get("vocab_size"), **{k: raw.get(k) for k in SPECIAL_IDS}}, vocab

    (t_cfg, t_vocab), (d_cfg, d_vocab) = describe(target_dir), describe(draft_dir)
    for key in t_cfg:
        if t_cfg[key] != d_cfg[key]:
            raise RingllmError(f"--draft {draft_dir}: config.json {key} is {d_cfg[key]}, the model's "
                               f"({target_dir}) is {t_cfg[key]}: a draft model must share the vocabulary")
    if t_vocab != d_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(d_vocab.items()), key=lambda kv: kv[1])
        raise RingllmError(f"--draft {draft_dir}: its tokenizer's vocabulary differs from the model's ({target_dir}): "
                           f"{len(differ)} token/id pairs differ, e.g. {differ[0]!r}")
