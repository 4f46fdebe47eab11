"""The request engine: every command's tokens come from here (generate, serve, the resident
engine, every tensor-parallel rank). A request is admitted -> prefilling -> decoding -> finished |
cancelled | failed, each in its own row of one KV cache; it joins at a pass boundary and leaves
when done.

The pass is the unit: step() runs ONE forward of the model (workers.model, over segments), which
fetches each layer's weights once and applies them to every running request's newest token plus
its draft tree, and to the prompt chunks of newly admitted ones (their share of the pass's prefill
budget, share_prefill_budget). After the pass each request draws its tokens: without a draft one;
with a tree, the target's draw at every node, walked from the root (speculation.walk_tree), so a
pass may give a request several tokens. The accepted path is moved into the request's KV slots
right after the root; the rejected nodes lie past them, where the next pass writes before it
reads. A request that fails (a bad draw) fails alone.

Thread-safety: submit() and cancel() may be called from any thread; step() and the rows it owns
run on one thread. The lock guards the waiting queue, the cancel set, the live ids and the row
table (changed by step()'s thread only, read by the properties from any thread).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.drafts import GREEDY_RANK_TEMPERATURE, DraftModel, accepted_moves, verify_segment
from ringllm.workers.memory_plan import PREFILL_CHUNK
from ringllm.workers.model import ALL, LAST, NO_LOGITS, KVCache, Llama, Segment
from ringllm.workers.sampler import Sampler
from ringllm.workers.sampling import MAX_TOP_LOGPROBS, SamplingParams
from ringllm.workers.speculation import PROBE, DraftParams, DraftTree, NgramProposer, SpecStats, WidthProbe, walk_tree

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"

log = logging.getLogger("ringllm")


@dataclass(frozen=True)
class Request:
    id: str
    prompt: tuple[int, ...]          # token ids, >= 1
    max_tokens: int                  # >= 1
    sampling: SamplingParams         # per request: temperature, top_p, top_k, seed, penalties, bias
    eos_ids: tuple[int, ...] = ()
    logprobs: int | None = None      # each new token's logprob and this many top alternatives; None: none
    prompt_logprobs: bool = False    # also the prompt's tokens' (echo); then max_tokens may be 0
    draft: bool = True               # use the engine's draft, if it has one (a request may decline it)

    def check(self, max_context: int) -> None:
        """What any engine refuses at submit, in one line naming the limit."""
        if not self.prompt:
            raise RingllmError(f"request {self.id}: the prompt must have at least one token")
        if self.max_tokens < (0 if self.prompt_logprobs else 1):
            raise RingllmError(f"request {self.id}: max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RingllmError(f"request {self.id}: logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs and self.logprobs is None:
            raise RingllmError(f"request {self.id}: prompt_logprobs needs logprobs")
        total = len(self.prompt) + self.max_tokens
        if total > max_context:
            raise RingllmError(
                f"request {self.id}: prompt of {len(self.prompt)} tokens + max_tokens {self.max_tokens} = "
                f"{total} exceeds max_context {max_context}")
        self.sampling.validate()


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (the raw logits: before logit_bias, penalties,
    temperature), with the top alternatives as (token, logprob), best first. None for a prompt's
    first token, which nothing predicts."""
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


class RequestStats(NamedTuple):
    """A request's decode passes (its prefill not counted), the draft nodes verified for it and how
    many of those were accepted: its tokens per pass is (completion_tokens - 1) / passes (the
    first token comes from the prompt's last pass)."""
    passes: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class TokenEvent:
    id: str
    token: int | None                # None only on a finish event without a new token (cancel)
    finish: str | None = None        # None, "stop" (EOS), "length" (max_tokens), "cancelled", "error"
    prompt_tokens: int = 0           # filled on the finish event
    completion_tokens: int = 0       # filled on the finish event
    logprob: TokenLogprob | None = None          # `token`'s, when the request asked for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] = ()   # the next run of prompt tokens' (echo), in order
    stats: RequestStats | None = None            # filled on the finish event


def prompt_requests(prompts, max_tokens: int, sampling: SamplingParams, eos_ids) -> list[Request]:
    """A fixed set of prompts as requests "0", "1", ...: prompt i samples with seed + i when the
    sampling has a seed (each request its own generator: rows draw apart, and alike run to run).
    The draft a SpeculativeSampling carries is the engine's, not the requests'."""
    plain = SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed,
                           sampling.presence_penalty, sampling.frequency_penalty, sampling.logit_bias)
    return [Request(str(i), tuple(prompt), max_tokens,
                    replace(plain, seed=None if plain.seed is None else (plain.seed + i) % 2**64), tuple(eos_ids))
            for i, prompt in enumerate(prompts)]


def share_prefill_budget(needs: list[int], budget: int) -> list[int]:
    """Prompt tokens each prefilling request gets this pass (needs: what each has left, oldest
    first): an even share of the budget, what a short prompt leaves over going to the others, the
    remainder to the oldest. Each gets at least one token, so that no prompt waits behind another's
    (a pass then exceeds the budget by less than the number of rows: at most budget + max_batch
    tokens, which the memory plan counts)."""
    grants = [0] * len(needs)
    wanting = list(range(len(needs)))
    while wanting and budget >= len(wanting):
        share = budget // len(wanting)
        for i in wanting:
            n = min(share, needs[i] - grants[i])
            grants[i] += n
            budget -= n
        wanting = [i for i in wanting if grants[i] < needs[i]]
    for rank, i in enumerate(wanting):      # fewer tokens left than requests wanting more
        if rank < budget or grants[i] == 0:
            grants[i] += 1
    return grants


@dataclass
class _Active:
    """A request holding a KV row. Invariant: slots 0..cached-1 of its row hold seq[:cached]
    (prompt, then the generated tokens); once prefilled, seq[-1] is its newest token, not cached yet."""
    req: Request
    row: int
    sampler: Sampler
    proposer: object | None          # NgramProposer | WidthProbe | DraftModel's marker; None: no draft
    seq: list[int]
    cached: int = 0
    generated: int = 0
    passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.req.prompt)

    def finish_event(self, token: int | None, finish: str, logprob: TokenLogprob | None = None) -> TokenEvent:
        return TokenEvent(self.req.id, token, finish, len(self.req.prompt), self.generated, logprob,
                          stats=RequestStats(self.passes, self.drafted, self.accepted))


@dataclass
class _Draw:
    """One request's part of a pass's logits: rows first..first+count-1, and its tree (None: one
    token without a draft, a prompt's first token included)."""
    a: _Active
    first: int
    count: int
    tree: DraftTree | None = None
    tokens: list = field(default_factory=list)


USES_DRAFT_MODEL = "draft model"     # _Active.proposer of a request the draft model drafts for


class Engine:
    def __init__(self, model: Llama, max_batch: int, max_context: int, prefill_chunk: int = PREFILL_CHUNK,
                 draft: DraftParams | None = None, draft_model: DraftModel | None = None):
        """max_batch rows of max_context slots each; prefill_chunk: the most prompt tokens one
        pass prefills (over all admitted requests), which bounds a pass's time. draft: the
        engine's draft (prompt lookup, the draft model at draft.model_dir, or the bench's probe),
        which every request uses unless it declines it; draft_model: that model, already loaded
        (None: loaded here when the draft names one)."""
        if max_batch < 1:
            raise RingllmError(f"max_batch must be >= 1, got {max_batch}")
        if max_context < 2:
            raise RingllmError(f"max_context must be >= 2, got {max_context}")
        limit = model.cfg.max_position_embeddings
        if max_context > limit:
            raise RingllmError(f"max_context {max_context} exceeds the model's context of {limit} "
                               "tokens (max_position_embeddings)")
        if prefill_chunk < 1:
            raise RingllmError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if draft is not None:
            draft.validate()
        self.model, self.max_batch, self.max_context = model, max_batch, max_context
        self.prefill_chunk, self.draft = prefill_chunk, draft
        # With ranks, rank 0 drafts for all: every rank must verify the same trees (a pass is a
        # chain of gathers of its shape), and a draft model's forward on each GPU need not round alike
        self.follower = model.tp is not None and model.tp.rank > 0
        if draft is not None and draft.model_dir is not None and draft_model is None and not self.follower:
            draft_model = DraftModel.load(draft.model_dir, max_batch, max_context, draft.spec_tokens,
                                          model.dtype, model.device)
        self.draft_model = draft_model
        self.passes = 0          # forwards run: weight passes (a step with nothing to run runs none)
        self.spec = SpecStats(draft=draft.kind) if draft is not None else None   # the run's totals
        self.cache = KVCache(model.cfg, max_batch, max_context, model.dtype, model.device)
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Request, Sampler]] = deque()
        self._cancels: set[str] = set()
        self._live: set[str] = set()                  # ids waiting or running
        self._active: dict[int, _Active] = {}         # row -> request; step()'s thread only
        self._free = list(range(max_batch - 1, -1, -1))   # pop() takes the lowest row first

    # --- any thread --------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request; it joins at the next step with a free row. Everything it needs is
        built here, so that whatever a request holds wrong fails it now, not a pass."""
        req.check(self.max_context)
        vocab = self.model.cfg.vocab_size
        outside = [t for t, _ in req.sampling.logit_bias if not 0 <= t < vocab]
        if outside:
            raise RingllmError(f"request {req.id}: logit_bias names token {outside[0]}, outside the vocabulary of {vocab}")
        try:
            sampler = Sampler(req.sampling, self.model.device)
        except Exception as err:
            raise RingllmError(f"request {req.id}: {err}") from None
        with self._lock:
            if req.id in self._live:
                raise RingllmError(f"request id {req.id!r} is already queued or running")
            self._live.add(req.id)
            self._waiting.append((req, sampler))

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step, which frees its row and returns its
        "cancelled" finish event. An id that is not live (already finished) is ignored."""
        with self._lock:
            if request_id in self._live:
                self._cancels.add(request_id)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def free_rows(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def kv_tokens_used(self) -> int:
        with self._lock:
            return sum(a.cached for a in self._active.values())

    def idle(self) -> bool:
        with self._lock:
            return not self._active and not self._waiting

    # --- step()'s thread ---------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One pass: drop cancelled requests, admit waiting ones into free rows, then one forward
        over every running request's newest token and draft tree, and a chunk of each prompt
        being prefilled."""
        events = self._take_cancels_and_admit()
        decoding = [a for a in self._active.values() if not a.prefilling]
        prefilling = [a for a in self._active.values() if a.prefilling]   # admission order (dict order)
        t0 = time.perf_counter()
        trees = self._propose(decoding)
        t1 = time.perf_counter()
        segments, draws, prompt_chunks = [], [], []
        for a, tree in zip(decoding, trees):
            segments.append(verify_segment(a.row, a.seq[-1], a.cached, tree) if tree is not None
                            else Segment(a.row, [a.seq[-1]], a.cached))
            draws.append(_Draw(a, 0, len(segments[-1].tokens) if tree is not None else 1, tree))
        grants = share_prefill_budget([len(a.req.prompt) - a.cached for a in prefilling], self.prefill_chunk)
        for a, n in zip(prefilling, grants):
            last = a.cached + n == len(a.req.prompt)
            logits = ALL if a.req.prompt_logprobs else LAST if last else NO_LOGITS
            segments.append(Segment(a.row, a.req.prompt[a.cached:a.cached + n], a.cached, logits=logits))
            prompt_chunks.append((a, n, last))
        if not segments:
            return events
        logits = self.model.forward(self.cache, segments)
        self.passes += 1
        offset = 0
        for d in draws:
            d.first, offset = offset, offset + d.count
        for a, n, last in prompt_chunks:
            if a.req.prompt_logprobs:       # a row for each of the chunk's tokens
                events.append(self._prompt_event(a, logits[offset:offset + n]))
            a.cached += n
            offset += n if a.req.prompt_logprobs else int(last)
            if last and a.req.max_tokens == 0:      # echo: the prompt's logprobs were all it asked
                with self._lock:
                    events.append(a.finish_event(None, LENGTH))
                    self._release(a)
            elif last:
                draws.append(_Draw(a, offset - 1, 1))
        if draws:
            events += self._draw(draws, logits)
        if self.spec is not None and trees and any(t is not None for t in trees):
            self.spec.draft_seconds += t1 - t0
            self.spec.record_verify(sum(len(s.tokens) for s in segments), time.perf_counter() - t1)
        return events

    def _propose(self, decoding: list[_Active]) -> list[DraftTree | None]:
        """Each decoding request's draft tree (None without a draft), of at most spec_tokens nodes,
        never past its row's slots (tokens past max_tokens are cut after the pass, so that the last
        passes verify as many drafts as the first)."""
        if self.draft is None:
            return [None] * len(decoding)
        limits = [min(self.draft.spec_tokens, self.max_context - a.cached - 1) for a in decoding]
        trees: list = [None] * len(decoding)
        if not self.follower:
            asks = []
            for i, (a, limit) in enumerate(zip(decoding, limits)):
                if a.proposer is USES_DRAFT_MODEL:
                    temperature = GREEDY_RANK_TEMPERATURE if a.sampler.params.greedy else a.sampler.params.temperature
                    asks.append((i, (a.row, a.seq, max(0, limit), temperature)))
                elif a.proposer is not None:
                    trees[i] = a.proposer.propose(max(0, limit))
            if asks:
                for (i, _), tree in zip(asks, self.draft_model.propose([ask for _, ask in asks])):
                    trees[i] = tree
        if self.model.tp is not None:
            trees = self.model.tp.from_rank_0(trees, self.model.device)
        return trees

    @staticmethod
    def _prompt_event(a: _Active, logits: torch.Tensor) -> TokenEvent:
        """The logprobs of the prompt tokens that a chunk's logits predict (row i: token
        cached + i + 1), led by the prompt's first token (None) in its first chunk."""
        prompt, start = a.req.prompt, a.cached
        predicted = prompt[start + 1:start + 1 + len(logits)]
        entries = token_logprobs(logits[:len(predicted)], predicted, a.req.logprobs)
        if start == 0:
            entries.insert(0, TokenLogprob(prompt[0], None))
        return TokenEvent(a.req.id, None, prompt_logprobs=tuple(entries))

    def _take_cancels_and_admit(self) -> list[TokenEvent]:
        events = []
        with self._lock:
            cancels, self._cancels = self._cancels, set()
            for row, a in list(self._active.items()):
                if a.req.id in cancels:
                    events.append(a.finish_event(None, CANCELLED))
                    self._release(a)
            kept = deque()
            for req, sampler in self._waiting:
                if req.id in cancels:
                    events.append(TokenEvent(req.id, None, CANCELLED, len(req.prompt), 0, stats=RequestStats()))
                    self._live.discard(req.id)
                else:
                    kept.append((req, sampler))
            self._waiting = kept
            while self._waiting and self._free:
                req, sampler = self._waiting.popleft()
                row = self._free.pop()
                seq = list(req.prompt)
                self._active[row] = _Active(req, row, sampler, self._proposer(req, row, seq), seq)
        return events

    def _proposer(self, req: Request, row: int, seq: list[int]):
        """What drafts for a new request, or None: no engine draft, declined, or penalties (they
        change with every token, so each node would need its own logits' adjustment)."""
        draft = self.draft
        if draft is None or not req.draft or req.sampling.presence_penalty or req.sampling.frequency_penalty:
            return None
        if self.follower:
            return USES_DRAFT_MODEL       # a marker: rank 0's trees arrive
        if draft.kind == PROBE:
            return WidthProbe(draft.probe_widths, seq)
        if draft.model_dir is None:
            return NgramProposer(draft.ngram_max, seq)
        self.draft_model.reset(row)
        return USES_DRAFT_MODEL

    def _release(self, a: _Active) -> None:
        """Frees the row (its stale slots need no clearing: a row only sees slots it wrote)."""
        del self._active[a.row]
        self._free.append(a.row)
        self._free.sort(reverse=True)
        self._live.discard(a.req.id)
        self._cancels.discard(a.req.id)     # a cancel that came too late must not hit a reused id

    def _draw(self, draws: list[_Draw], logits: torch.Tensor) -> list[TokenEvent]:
        """Each request's tokens from its logits rows, with its own sampler (own generator: a
        seeded request draws the same tokens whatever else is in the pass): one draw per row
        (independent, the argmax when greedy), walked down its tree. A request whose draw fails
        ends alone, with an "error" finish event."""
        raw = logits
        adjusting = [d for d in draws if d.a.sampler.params.adjusts_logits]
        if adjusting:     # logit_bias and penalties: only the rows of requests that set them
            logits = logits.clone()
            for d in adjusting:
                rows = slice(d.first, d.first + d.count)
                logits[rows] = d.a.sampler.adjust(logits[rows])
        greedy = [d for d in draws if d.a.sampler.params.greedy]
        if greedy:       # one host sync for every greedy row
            index = [r for d in greedy for r in range(d.first, d.first + d.count)]
            best = logits[index].argmax(-1).tolist()
            for d in greedy:
                d.tokens, best = best[:d.count], best[d.count:]
        for d in draws:
            if not d.a.sampler.params.greedy:
                try:
                    d.tokens = d.a.sampler(logits[d.first:d.first + d.count]).tolist()
                except Exception:
                    log.exception("request %s: sampling failed; ending that request", d.a.req.id)
                    d.tokens = None
        events = []
        for d in draws:
            a = d.a
            if d.tokens is None:
                with self._lock:
                    events.append(a.finish_event(None, ERROR))
                    self._release(a)
                continue
            emitted, path = walk_tree(d.tree, d.tokens) if d.tree is not None else (d.tokens[:1], [])
            rows = [d.first] + [d.first + p for p in path]       # where each emitted token was drawn
            events += self._emit(a, emitted, rows, path, d.tree, raw)
        return events

    def _emit(self, a: _Active, emitted: list[int], rows: list[int], path: list[int], tree, raw) -> list[TokenEvent]:
        """A request's tokens of this pass, cut at EOS and max_tokens; its KV set for the next."""
        decoding = a.cached < len(a.seq)      # a decode pass (a prompt's first token: cached == len(seq))
        if tree is not None:
            self.cache.move(a.row, *accepted_moves(a.cached, path))
        if decoding:
            a.passes += 1
            a.cached += 1 + len(path)     # the root and the accepted nodes are in the row now
            if tree is not None:
                a.drafted += len(tree)
        logprobs = (token_logprobs(raw[rows], emitted, a.req.logprobs) if a.req.logprobs is not None
                    else [None] * len(emitted))
        events, taken = [], 0
        with self._lock:
            for tok, logprob in zip(emitted, logprobs):
                a.seq.append(tok)
                a.generated += 1
                taken += 1
                a.sampler.observe(tok, raw.shape[-1], raw.device)
                if tok in a.req.eos_ids or a.generated == a.req.max_tokens:
                    a.accepted += min(len(path), taken)
                    events.append(a.finish_event(tok, STOP if tok in a.req.eos_ids else LENGTH, logprob))
                    self._release(a)
                    break
                events.append(TokenEvent(a.req.id, tok, logprob=logprob))
            else:
                a.accepted += len(path)
        if self.spec is not None and decoding:
            s = self.spec
            s.passes, s.tokens = s.passes + 1, s.tokens + taken
            s.accepted += min(len(path), taken)
            if tree is not None:
                s.drafted += len(tree)
                s.branched += not tree.is_chain
        return events


def token_logprobs(logits: torch.Tensor, tokens, top: int) -> list[TokenLogprob]:
    """Row i's log-softmax at tokens[i], with its `top` best (token, logprob): one host sync."""
    if len(tokens) == 0:
        return []
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(t, v) for t, v in zip(tokens, chosen)]
    best = lp.topk(top, dim=-1)
    return [TokenLogprob(t, v, tuple(zip(ids, vals)))
            for t, v, ids, vals in zip(tokens, chosen, best.indices.tolist(), best.values.tolist())]
