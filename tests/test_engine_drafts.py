"""The request engine with drafts, driven directly (workers.engine.Engine and Request): several
requests, each with its own draft tree, verified in the same passes, on a tiny float32 checkpoint
on the CPU with transformers as the reference.

- 4 prompts with prompt lookup in one engine: each exactly transformers' greedy text, drafts
  accepted, more than one token per pass, every pass carrying every request (and, with fewer rows
  than requests and small prefill chunks, trees verified in the passes that prefill newcomers);
- the same with a draft model (a random one that shares the vocabulary, and the target itself,
  which must give long accepts for every request, also in rows that earlier requests used);
- seeded sampling with a draft in a batch of 4 repeats run to run, rows with other seeds differ,
  and a seeded request draws the same whatever shares its passes;
- the sampled distribution with draft trees equals the target's when each pass also carries other
  requests' trees (prompts of other lengths): the chi-square test of test_spec_tree_sampling.py;
- requests with and without a draft and one with a presence penalty (which gets no draft) in one
  engine: transformers' greedy text, and the penalty's reference computed on transformers' logits.
(test_spec_tree_sampling.py holds the chi-square test with 4 copies of one prompt in every pass;
test_one_engine.py the same engine through `ringllm generate` and `ringllm serve`.)"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from ringllm.workers.drafts import DraftModel
from ringllm.workers.engine import LENGTH, STOP, Engine, Request
from ringllm.workers.model import ALL, LAST, NO_LOGITS
from ringllm.workers.sampling import SamplingParams
from ringllm.workers.speculation import DraftParams
import tests.test_spec_tree_sampling as ts
from tests.conftest import hf_greedy_cached, make_hf_checkpoint, write_tokenizer
from tests.test_model_vs_transformers import ringllm_model

EOS = 2
NEW = 32
CONTEXT = 64
# four prompts of different lengths; the first two repeat themselves, and the model's greedy text
# loops (seed 1), so prompt lookup drafts and gets accepted
PROMPTS = [[3, 9, 14, 3, 9, 14, 3, 9], [5, 17, 40, 8, 5, 17, 40], [7, 99, 23, 61],
           [11, 12, 13, 50, 60, 70, 80, 90, 33, 11, 12]]
NGRAM = DraftParams("ngram", spec_tokens=8)


def cut_at_eos(tokens: list[int]) -> list[int]:
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def checkpoint_with_references(tmp_path_factory, name: str, **config):
    """(dir, transformers model, each prompt's greedy continuation cut after EOS)."""
    d = tmp_path_factory.mktemp("engine-drafts") / name
    hf = make_hf_checkpoint(d, **config)
    write_tokenizer(d)
    return d, hf, [cut_at_eos(hf_greedy_cached(hf, p, NEW)) for p in PROMPTS]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return checkpoint_with_references(tmp_path_factory, "target", seed=1)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """Like `target`, with large random weights: its greedy token is likely, so a best-first tree
    of the target drafting for itself is mostly its greedy chain (the near-uniform `target` spends
    its nodes on its root's alternatives, and accepts one node a pass whatever the tree's depth)."""
    return checkpoint_with_references(tmp_path_factory, "peaked", initializer_range=1.0)


@pytest.fixture(scope="module")
def random_draft(target):
    """A 1-layer draft with other random weights and the target's vocabulary."""
    d = target[0].parent / "random-draft"
    make_hf_checkpoint(d, seed=5, num_hidden_layers=1)
    write_tokenizer(d)
    return d


class PassLog:
    """Wraps a model's forward: the segments of every pass, for checks on how passes were made."""

    def __init__(self, model):
        self.passes = []
        self.forward = forward = model.forward        # the model's own (to put back)

        def logged(cache, segments):
            self.passes.append(list(segments))
            return forward(cache, segments)

        model.forward = logged

    def trees_per_pass(self) -> list[int]:
        """Per pass: how many of its segments verify a draft (a decode step with nodes after its root)."""
        return [sum(s.logits == ALL and len(s.tokens) > 1 for s in p) for p in self.passes]


def run(engine: Engine, requests, submit_every: int = 0):
    """Submits the requests (all at once, or one more every `submit_every` steps) and steps the
    engine until idle. Returns ({id: tokens}, {id: RequestStats}); every request must finish by
    EOS or its max_tokens, its finish event's counts matching its tokens."""
    out, stats, pending, steps = {}, {}, list(requests), 0
    if not submit_every:
        for r in pending:
            engine.submit(r)
        pending = []
    while pending or not engine.idle():
        if pending and steps % submit_every == 0:
            engine.submit(pending.pop(0))
        for e in engine.step():
            if e.token is not None:
                out.setdefault(e.id, []).append(e.token)
            if e.finish is not None:
                assert e.finish in (STOP, LENGTH), e
                assert e.completion_tokens == len(out[e.id]) and e.stats is not None, e
                stats[e.id] = e.stats
        steps += 1
    return out, stats


def greedy_requests(n: int = len(PROMPTS), **kw) -> list[Request]:
    return [Request(str(i), tuple(PROMPTS[i % len(PROMPTS)]), NEW, SamplingParams(), (EOS,), **kw) for i in range(n)]


def tokens_per_pass(tokens: list[int], stats) -> float:
    """A request's tokens per decode pass (its first token comes from the prefill pass)."""
    return (len(tokens) - 1) / stats.passes


# --- a. prompt lookup ------------------------------------------------------------------------------

def test_four_prompts_with_prompt_lookup_in_one_engine(target):
    """4 requests in one engine of 4 rows: every prompt prefilled in the first pass, then every
    pass verifies each request's tree (until the request finishes); each request gives exactly
    transformers' greedy text, with drafts accepted and more than one token per pass."""
    d, _, refs = target
    model = ringllm_model(d)
    log = PassLog(model)
    engine = Engine(model, 4, CONTEXT, draft=NGRAM)
    out, stats = run(engine, greedy_requests())
    for i, ref in enumerate(refs):
        assert out[str(i)] == ref, f"prompt {i}"
    # all requests in the same passes: one prefill pass, then as many as the longest needs
    assert engine.passes == 1 + max(s.passes for s in stats.values()), (engine.passes, stats)
    # a decode pass gives the root's draw and one token per accepted node, the last pass perhaps cut
    # (by EOS or max_tokens) before its bonus token
    assert all(s.passes + s.accepted - 1 <= len(out[i]) - 1 <= s.passes + s.accepted for i, s in stats.items()), stats
    assert sum(s.accepted for s in stats.values()) > 0, stats
    assert max(tokens_per_pass(out[i], s) for i, s in stats.items()) > 1, stats
    assert max(log.trees_per_pass()) >= 2, "no pass verified two requests' trees together"
    # the engine's totals are the requests'
    assert engine.spec.drafted == sum(s.drafted for s in stats.values())
    assert engine.spec.accepted == sum(s.accepted for s in stats.values())
    assert engine.spec.tokens == sum(len(t) - 1 for t in out.values())


def test_prompt_lookup_with_rows_reused_and_prompts_chunked_between_trees(target):
    """8 requests (each prompt twice) through 3 rows, one submitted every other step, prompts
    prefilled 3 tokens a pass: newcomers' prompt chunks share passes with the others' trees, rows
    are reused; each request still gives transformers' greedy text."""
    d, _, refs = target
    model = ringllm_model(d)
    log = PassLog(model)
    engine = Engine(model, 3, CONTEXT, prefill_chunk=3, draft=NGRAM)
    out, stats = run(engine, greedy_requests(8), submit_every=2)
    for i in range(8):
        assert out[str(i)] == refs[i % 4], f"request {i} (prompt {i % 4})"
    assert sum(s.accepted for s in stats.values()) > 0, stats
    mixed = [p for p in log.passes if any(s.logits == ALL and len(s.tokens) > 1 for s in p)
             and any(s.logits in (NO_LOGITS, LAST) and s.start == 0 for s in p)]
    assert mixed, "no pass verified a tree while it prefilled a prompt"


# --- b. a draft model ------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [4, 2])
@pytest.mark.parametrize("draft", ["random", "identical"])
def test_four_prompts_with_a_draft_model_in_one_engine(request, draft, rows):
    """4 requests with a draft model (loaded by the engine, one KV row per engine row, its trees
    proposed for all requests together): each gives transformers' greedy text. With 2 rows, two
    requests wait and then take rows that the draft model drafted in for others. A random draft
    that shares the vocabulary is rarely right; the (peaked) target drafting for itself must give
    long accepts to every request: a draft whose catch-up, tree positions or mask were off, or
    whose row kept its previous request's text, proposes worse trees."""
    if draft == "random":
        (d, _, refs), draft_dir = request.getfixturevalue("target"), request.getfixturevalue("random_draft")
    else:
        d, _, refs = request.getfixturevalue("peaked")
        draft_dir = d
    model = ringllm_model(d)
    log = PassLog(model)
    engine = Engine(model, rows, CONTEXT, draft=DraftParams(str(draft_dir), spec_tokens=8))
    assert isinstance(engine.draft_model, DraftModel)
    out, stats = run(engine, greedy_requests())
    for i, ref in enumerate(refs):
        assert out[str(i)] == ref, f"prompt {i}"
    assert all(s.drafted > 0 for s in stats.values()), stats
    assert max(log.trees_per_pass()) >= 2, "no pass verified two requests' trees together"
    if draft == "identical":     # measured: 6.2 to 9 tokens a pass (2 with tree positions off by 3)
        assert all(tokens_per_pass(out[i], s) > 4 for i, s in stats.items()), stats


# --- c. seeded sampling ----------------------------------------------------------------------------

def sampled_requests(seeds, prompt_of=lambda i: 0):
    return [Request(f"r{i}", tuple(PROMPTS[prompt_of(i)]), NEW,
                    SamplingParams(temperature=0.8, seed=seed), (EOS,)) for i, seed in enumerate(seeds)]


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_seeded_requests_with_a_draft_repeat_in_fresh_engines(target, draft):
    """4 requests sampled at temperature 0.8 with a draft in one engine: two fresh engines give
    the same tokens; the requests with other seeds (one prompt) differ from each other."""
    d, _, _ = target
    params = NGRAM if draft == "ngram" else DraftParams(str(d), spec_tokens=8)
    seeds = [11, 12, 13, 11]
    prompt_of = lambda i: 0 if i < 3 else 1         # noqa: E731
    runs = [run(Engine(ringllm_model(d), 4, CONTEXT, draft=params), sampled_requests(seeds, prompt_of))
            for _ in range(2)]
    (first, stats), (second, _) = runs
    assert first == second
    assert len({tuple(first[f"r{i}"]) for i in range(3)}) == 3, first
    assert sum(s.drafted for s in stats.values()) > 0, stats


def test_a_seeded_request_draws_the_same_whatever_shares_its_passes(target):
    """Each request has its own generator and (prompt lookup) a tree that depends on its own text
    only: seed 11 alone in an engine draws what it draws among 3 other sampling requests."""
    d, _, _ = target
    alone, _ = run(Engine(ringllm_model(d), 1, CONTEXT, draft=NGRAM), sampled_requests([11]))
    shared, _ = run(Engine(ringllm_model(d), 4, CONTEXT, draft=NGRAM),
                    sampled_requests([11, 5, 6, 7], prompt_of=lambda i: i))
    assert shared["r0"] == alone["r0"]


# --- d. the sampled distribution, other requests' trees in every pass ------------------------------

CHI_DRAWS = 1000        # of the test prompt: 2 per engine


@pytest.fixture(scope="module")
def sampling_model(tmp_path_factory):
    """test_spec_tree_sampling.py's tiny model (vocabulary 16), its sampled prompt and the exact
    joint distribution of the first tokens of sampling without a draft (transformers' logits)."""
    d = tmp_path_factory.mktemp("chi-square") / "tiny"
    hf = make_hf_checkpoint(d, vocab_size=ts.VOCAB, initializer_range=0.3, num_hidden_layers=2)
    write_tokenizer(d, ts.VOCAB)
    prompt = ts.sampled_prompt(hf)
    return ringllm_model(d), prompt, ts.exact_joint(hf, prompt)


def test_sampling_with_draft_trees_beside_other_requests_keeps_the_targets_distribution(sampling_model):
    """test_spec_tree_sampling.py's chi-square test with each engine holding two requests of the
    test prompt and two of other prompts (other lengths: their rows' slots and trees differ), all
    with prompt lookup: the first 3 tokens of the test prompt's requests follow the exact joint
    distribution of sampling without a draft."""
    model, prompt, joint = sampling_model
    params = dict(temperature=ts.TEMPERATURE, top_k=ts.TOP_K, top_p=ts.TOP_P)
    others = [prompt[5:12], prompt[:30] + prompt[:9]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # thousands of tiny forwards: threads only wait on each other
    try:
        counts, shared, accepted = Counter(), 0, 0
        for seed in range(0, CHI_DRAWS, 2):
            reqs = [Request(f"t{k}", tuple(prompt), ts.NEW_TOKENS, SamplingParams(**params, seed=seed + k))
                    for k in range(2)]
            reqs[1:1] = [Request(f"o{k}", tuple(p), ts.NEW_TOKENS, SamplingParams(**params, seed=seed + k))
                         for k, p in enumerate(others)]
            engine = Engine(model, 4, 64, draft=DraftParams("ngram", spec_tokens=4))
            log = PassLog(model)
            out, stats = run(engine, reqs)
            model.forward = log.forward
            counts.update(tuple(out[f"t{k}"]) for k in range(2))
            accepted += sum(stats[f"t{k}"].accepted for k in range(2))
            shared += sum(n >= 2 for n in log.trees_per_pass())
    finally:
        torch.set_num_threads(threads)
    p = ts.chi_square_p(counts, joint)
    assert p > ts.P_FAIL, f"chi-square p = {p:.2e} over {CHI_DRAWS} draws"
    # drafts were accepted into, in passes that verified several requests' trees
    assert accepted > CHI_DRAWS // 4 and shared > CHI_DRAWS // 4, (accepted, shared)


# --- e. with and without a draft in one engine -----------------------------------------------------

def hf_greedy_with_presence_penalty(hf, prompt, steps: int, penalty: float) -> list[int]:
    """transformers' logits, OpenAI's presence penalty written out: the argmax of the last logits
    minus `penalty` for every token generated so far (the prompt's tokens are not penalized)."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([seq])).logits[0, -1].double()
            if out:
                logits[sorted(set(out))] -= penalty
            tok = int(logits.argmax())
            out.append(tok)
            seq.append(tok)
            if tok == EOS:
                break
    return out


def test_requests_with_and_without_a_draft_and_a_penalized_one_share_passes(target):
    """One engine with prompt lookup and 4 requests in the same passes: two that use the draft,
    one that declines it (draft=False) and one with a presence penalty (which decodes without a
    draft): the first three give transformers' greedy text, the fourth the penalized greedy
    reference; only the first two verified drafts."""
    d, hf, refs = target
    model = ringllm_model(d)
    log = PassLog(model)
    engine = Engine(model, 4, CONTEXT, draft=NGRAM)
    penalty = 1.5
    requests = [Request("drafted0", tuple(PROMPTS[0]), NEW, SamplingParams(), (EOS,)),
                Request("declined", tuple(PROMPTS[1]), NEW, SamplingParams(), (EOS,), draft=False),
                Request("penalized", tuple(PROMPTS[1]), NEW, SamplingParams(presence_penalty=penalty), (EOS,)),
                Request("drafted3", tuple(PROMPTS[3]), NEW, SamplingParams(), (EOS,))]
    out, stats = run(engine, requests)
    assert out["drafted0"] == refs[0] and out["drafted3"] == refs[3]
    assert out["declined"] == refs[1]
    penalized = hf_greedy_with_presence_penalty(hf, PROMPTS[1], NEW, penalty)
    assert penalized != refs[1], "the penalty changes nothing here: pick another prompt or penalty"
    assert out["penalized"] == penalized
    assert stats["declined"].drafted == 0 and stats["penalized"].drafted == 0
    assert stats["declined"].passes == len(out["declined"]) - 1
    assert stats["drafted0"].drafted > 0 and stats["drafted3"].drafted > 0
    # the undrafted requests decoded in passes that verified trees
    assert any(n >= 1 and len(p) >= 3 for n, p in zip(log.trees_per_pass(), log.passes)), log.trees_per_pass()
