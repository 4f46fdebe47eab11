"""Speculative decoding: `--draft ngram` (prompt lookup: the n-gram proposer) or `--draft DIR` (a
small draft model: workers.generation.DraftModelProposer), and the greedy accept rule. Torch-free: the supervisor's
side of a run imports the parameters and checks a draft model's vocabulary.

One decode pass verifies a chain [last accepted token, d1..dk] in a single forward (one weight
pass, streamed or not). The target's argmax after each position says what greedy decoding would
have produced there; the run of drafts equal to it is accepted, plus the target's own token after
that run. So the output is exactly greedy decoding's, whatever the drafts were.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.sampling import SamplingParams

DRAFTS = ("ngram",)
PROBE = "probe"           # tools.spec_bench only: fixed-width passes of filler drafts (no user flag)


@dataclass(frozen=True)
class DraftParams:
    kind: str = "ngram"
    spec_tokens: int = 8      # drafts verified per pass at most (K)
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
            if self.temperature > 0:
                raise RingllmError(f"--draft {self.draft.kind} with --temperature {self.temperature}: "
                                   "sampling with a draft is not supported yet (use --temperature 0)")


def cache_slots(longest_prompt: int, max_new_tokens: int, sampling) -> int:
    """KV cache slots (and the memory plan's sequence length) of a run: prompt + new tokens, plus
    room for one pass's drafts with a draft, so that the last passes verify as many drafts as the
    first (their surplus tokens are cut at max_new_tokens, never written past the cache)."""
    draft = getattr(sampling, "draft", None)
    return longest_prompt + max_new_tokens + (draft.spec_tokens if draft is not None else 0)


@dataclass
class SpecStats:
    """What `--metrics-json` reports under `speculation`."""
    draft: str = "ngram"
    passes: int = 0           # decode passes (the prefill not counted)
    tokens: int = 0           # tokens those passes produced
    drafted: int = 0          # draft tokens verified
    accepted: int = 0         # of those, accepted
    draft_seconds: float = 0.0  # time spent proposing (a draft model's forwards; ngram's lookups)
    # per pass: [tokens the target verified (1 + drafts), seconds of its forward and accept step]
    pass_log: list = field(default_factory=list)

    def as_dict(self) -> dict:
        verify = sum(s for _, s in self.pass_log)
        per = (lambda x: x / self.passes if self.passes else None)
        return {"draft": self.draft, "passes": self.passes, "tokens": self.tokens, "draft_seconds": self.draft_seconds,
                "tokens_per_pass": per(self.tokens),
                "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else None,
                "draft_seconds_per_pass": per(self.draft_seconds), "verify_seconds_per_pass": per(verify),
                "pass_log": self.pass_log}


@dataclass
class WidthProbe:
    """tools.spec_bench's proposer: pass i verifies widths[i % len] tokens, its drafts filler
    (the prompt's tokens over and over). A random-weight target rejects them, so each pass
    verifies exactly its width and yields one token: a pass's cost as a function of its width."""
    widths: tuple[int, ...]
    seq: list[int] = field(default_factory=list)
    turn: int = 0

    def propose(self, limit: int) -> list[int]:
        width = self.widths[self.turn % len(self.widths)]
        self.turn += 1
        filler = self.seq * (1 + width // max(1, len(self.seq)))
        return filler[:min(limit, width - 1)]


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
