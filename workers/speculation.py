"""Prompt-lookup speculative decoding (`--draft ngram`): the n-gram proposer and the greedy
accept rule. Torch-free: the supervisor's side of a run imports the parameters.

One decode pass verifies a chain [last accepted token, d1..dk] in a single forward (one weight
pass, streamed or not). The target's argmax after each position says what greedy decoding would
have produced there; the run of drafts equal to it is accepted, plus the target's own token after
that run. So the output is exactly greedy decoding's, whatever the drafts were.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.sampling import SamplingParams

DRAFTS = ("ngram",)


@dataclass(frozen=True)
class DraftParams:
    kind: str = "ngram"
    spec_tokens: int = 8      # drafts verified per pass at most (K)
    ngram_max: int = 3        # longest suffix looked up

    def validate(self) -> None:
        if self.kind not in DRAFTS:
            raise RingllmError(f"--draft {self.kind}: only 'ngram' (prompt lookup) is supported; "
                               "a draft model directory is not supported yet")
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
            if self.temperature > 0:
                raise RingllmError(f"--draft {self.draft.kind} with --temperature {self.temperature}: "
                                   "sampling with a draft is not supported yet (use --temperature 0)")


@dataclass
class SpecStats:
    """What `--metrics-json` reports under `speculation`."""
    draft: str = "ngram"
    passes: int = 0           # decode passes (the prefill not counted)
    tokens: int = 0           # tokens those passes produced
    drafted: int = 0          # draft tokens verified
    accepted: int = 0         # of those, accepted

    def as_dict(self) -> dict:
        return {"draft": self.draft, "passes": self.passes, "tokens": self.tokens,
                "tokens_per_pass": self.tokens / self.passes if self.passes else None,
                "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else None}


@dataclass
class NgramProposer:
    """Proposes what followed the most recent earlier occurrence of the sequence's longest
    suffix (n = ngram_max down to 1)."""
    ngram_max: int
    seq: list[int] = field(default_factory=list)

    def propose(self, limit: int) -> list[int]:
        seq, end = self.seq, len(self.seq)
        if limit <= 0:
            return []
        for n in range(min(self.ngram_max, end - 1), 0, -1):
            suffix = seq[end - n:]
            # most recent earlier occurrence: it must end before the suffix itself does
            for at in range(end - n - 1, -1, -1):
                if seq[at:at + n] == suffix:
                    follow = seq[at + n:at + n + limit]
                    if follow:
                        return follow
        return []


def accept_greedy(drafts: Sequence[int], target: Sequence[int]) -> list[int]:
    """target[i] is the target's argmax after the pass's position i (position 0 = the last
    accepted token, i >= 1 = draft i). Returns the tokens greedy decoding produces: the drafts
    while they equal the target's choice, then the target's token where they first differ (or
    after the last draft)."""
    out = []
    for i, d in enumerate(drafts):
        if target[i] != d:
            break
        out.append(d)
    out.append(target[len(out)])
    return out
