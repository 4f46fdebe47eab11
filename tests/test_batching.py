"""Continuous batching (workers.engine): requests that join and leave a running batch produce
the tokens transformers gives each prompt alone (float32), each step is one weight pass, a
cancelled request frees its row, finish reasons, per-request seeded sampling, the context limit."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.engine import Engine, Request
from ringllm.workers.generation import Sampler, generate
from ringllm.workers.sampling import SamplingParams
from tests.conftest import hf_greedy_cached, make_hf_checkpoint
from tests.test_model_vs_transformers import ringllm_model

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, ringllm model) of the tiny checkpoint, float32."""
    d = tmp_path_factory.mktemp("batching") / "tiny"
    hf = make_hf_checkpoint(d, seed=3)
    return hf, ringllm_model(d)


def random_prompts(lengths, seed=0) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, 128, (n,), generator=g).tolist()) for n in lengths]


def poison(engine: Engine) -> None:
    """Garbage in every KV slot: a row that reads a slot it did not write changes its tokens."""
    g = torch.Generator().manual_seed(9)
    for t in (engine.cache.k, engine.cache.v):
        t.copy_(torch.randn(t.shape, generator=g) * 30)


def run(engine: Engine, schedule: dict[int, list[Request]], cancels: dict[int, list[str]] = {},
        max_steps: int = 500):
    """Submit schedule[step] (and cancel cancels[step]) before step `step`; step until idle.
    Returns ({id: tokens}, {id: finish event}, [events per step])."""
    tokens, finished, per_step = {}, {}, []
    step = 0
    while schedule.keys() - set(range(step)) or not engine.idle():
        for req in schedule.get(step, []):
            engine.submit(req)
        for rid in cancels.get(step, []):
            engine.cancel(rid)
        events = engine.step()
        per_step.append(events)
        for e in events:
            if e.token is not None:
                tokens.setdefault(e.id, []).append(e.token)
            if e.finish is not None:
                assert e.id not in finished, f"{e.id} finished twice"
                finished[e.id] = e
        step += 1
        assert step < max_steps, "the engine did not drain"
    return tokens, finished, per_step


def staggered_schedule(prompts, max_tokens):
    """Requests joining at different steps: some while others decode, one before a row is free."""
    at = [0, 0, 2, 3, 5, 6][:len(prompts)]
    schedule: dict[int, list[Request]] = {}
    for i, (p, step) in enumerate(zip(prompts, at)):
        schedule.setdefault(step, []).append(Request(f"r{i}", p, max_tokens, GREEDY))
    return schedule


def test_concurrent_equals_alone_tiny(tiny):
    hf, model = tiny
    prompts = random_prompts([5, 37, 3, 11, 1, 20])     # 37 needs 3 chunks of 16, 20 needs 2
    engine = Engine(model, max_batch=4, max_context=64, prefill_chunk=16)
    poison(engine)
    tokens, finished, per_step = run(engine, staggered_schedule(prompts, 12))
    for i, p in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy_cached(hf, list(p), 12), f"r{i} (prompt of {len(p)}) differs from alone"
        assert finished[f"r{i}"].finish == "length"
    # the long prompt was chunked: its first token came 3 passes after it joined (step 0)
    first = next(s for s, events in enumerate(per_step) if any(e.id == "r1" for e in events))
    assert first == 2, f"r1's first token at step {first}"
    assert engine.free_rows == 4 and engine.kv_tokens_used == 0


def test_concurrent_equals_alone_smollm2(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    texts = ["The capital of France is",
             "Once upon a time, in a small village at the edge of a great forest, there lived an old "
             "woodcutter and his three daughters. Every morning he",
             "def fibonacci(n):",
             "Water boils at"]
    prompts = [tuple(tok(t)["input_ids"]) for t in texts]
    assert len(prompts[1]) > 2 * 12, "the long prompt must need 3 chunks"
    engine = Engine(ringllm_model(demo_model_dir), max_batch=3, max_context=96, prefill_chunk=12)
    tokens, _, _ = run(engine, staggered_schedule(prompts, 8))
    for i, p in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy_cached(hf, list(p), 8), f"{texts[i]!r} differs from alone"


class CountingSource:
    """A WeightSource wrapper counting fetches per (layer, kind)."""

    def __init__(self, inner):
        self.inner, self.fetches = inner, Counter()

    def attn(self, layer):
        self.fetches[layer, "attn"] += 1
        return self.inner.attn(layer)

    def ffn(self, layer):
        self.fetches[layer, "ffn"] += 1
        return self.inner.ffn(layer)

    def release(self, layer, kind):
        self.inner.release(layer, kind)


def test_one_pass_advances_every_request(tiny):
    hf, model = tiny
    counting = CountingSource(model.weights)
    model.weights = counting
    try:
        engine = Engine(model, max_batch=4, max_context=64, prefill_chunk=8)
        prompts = random_prompts([4, 20, 6, 2], seed=1)
        schedule = staggered_schedule(prompts, 6)
        step, widest, expected = 0, 0, {(layer, kind): 1 for layer in range(model.cfg.num_layers)
                                        for kind in ("attn", "ffn")}
        while schedule.keys() - set(range(step)) or not engine.idle():
            for req in schedule.get(step, []):
                engine.submit(req)
            active = engine.running + min(engine.waiting, engine.free_rows)
            counting.fetches.clear()
            events = engine.step()
            assert dict(counting.fetches) == expected, f"step {step} with {active} requests fetched {dict(counting.fetches)}"
            widest = max(widest, len(events))
            step += 1
        assert widest >= 3, "no step advanced several requests"
    finally:
        model.weights = counting.inner


def test_cancel_frees_its_row_for_an_exact_newcomer(tiny):
    hf, model = tiny
    a, b, c, w = random_prompts([6, 9, 14, 5], seed=2)
    engine = Engine(model, max_batch=2, max_context=64, prefill_chunk=8)
    for rid, p in (("a", a), ("b", b), ("w", w)):
        engine.submit(Request(rid, p, 20, GREEDY))
    for _ in range(4):
        engine.step()
    assert (engine.running, engine.free_rows, engine.waiting) == (2, 0, 1)
    engine.cancel("w")          # still waiting
    engine.cancel("a")          # running: its row goes back at the next step
    events = engine.step()
    cancelled = {e.id: e for e in events if e.finish == "cancelled"}
    assert set(cancelled) == {"a", "w"} and all(e.token is None for e in cancelled.values())
    # a shared the first pass's 8 prompt tokens with b (4 each): its first token came at the
    # second pass, then one a pass
    assert cancelled["a"].prompt_tokens == 6 and cancelled["a"].completion_tokens == 3
    assert (engine.running, engine.free_rows, engine.waiting) == (1, 1, 0), "the cancelled row was not freed"
    tokens, finished, _ = run(engine, {0: [Request("c", c, 10, GREEDY)]})
    assert tokens["c"] == hf_greedy_cached(hf, list(c), 10), "the request in the reused row differs from alone"
    assert finished["b"].finish == "length" and finished["b"].completion_tokens == 20
    assert engine.free_rows == 2 and engine.idle()
    engine.cancel("a")          # finished ids: ignored, no event
    assert engine.step() == []


def test_finish_reasons(tiny):
    hf, model = tiny
    p, q = random_prompts([7, 4], seed=4)
    ref = hf_greedy_cached(hf, list(p), 10)
    stop_at = next(i for i in range(2, 10) if ref[i] not in ref[:i])    # EOS first seen mid-way
    eos = ref[stop_at]
    engine = Engine(model, max_batch=2, max_context=64)
    tokens, finished, _ = run(engine, {0: [Request("eos", p, 10, GREEDY, eos_ids=(eos, 127)),
                                           Request("len", q, 5, GREEDY)]})
    assert tokens["eos"] == ref[:stop_at + 1]
    assert finished["eos"].finish == "stop" and finished["eos"].token == eos
    assert (finished["eos"].prompt_tokens, finished["eos"].completion_tokens) == (7, stop_at + 1)
    assert finished["len"].finish == "length" and len(tokens["len"]) == 5
    assert (finished["len"].prompt_tokens, finished["len"].completion_tokens) == (4, 5)


def test_seeded_sampling_is_independent_of_the_batch(tiny):
    hf, model = tiny
    p, others = random_prompts([9], seed=5)[0], random_prompts([3, 12, 6], seed=6)
    params = SamplingParams(temperature=1.5, top_k=50, seed=1234)
    alone = generate(model, [list(p)], 16, Sampler(params, model.device), eos_ids=())[0]
    engine = Engine(model, max_batch=4, max_context=64, prefill_chunk=8)
    schedule = {0: [Request("x0", others[0], 16, SamplingParams(temperature=1.5, seed=1)),
                    Request("x1", others[1], 16, SamplingParams(temperature=1.5, seed=1234))],
                2: [Request("s", p, 16, params)],
                3: [Request("x2", others[2], 16, GREEDY)]}
    tokens, _, _ = run(engine, schedule)
    assert tokens["s"] == alone, "a seeded request drew other tokens in a batch than alone"
    other = generate(model, [list(p)], 16, Sampler(SamplingParams(temperature=1.5, top_k=50, seed=99),
                                                   model.device), eos_ids=())[0]
    assert other != alone, "the seed made no difference: the test cannot see a shared generator"


def test_over_context_is_refused(tiny):
    _, model = tiny
    engine = Engine(model, max_batch=1, max_context=32)
    with pytest.raises(RingllmError, match=r"^request big: prompt of 30 tokens \+ max_tokens 3 = 33 "
                                           r"exceeds max_context 32$"):
        engine.submit(Request("big", tuple(range(3, 33)), 3, GREEDY))
    engine.submit(Request("fits", tuple(range(3, 33)), 2, GREEDY))     # exactly 32: accepted
    assert engine.waiting == 1
    with pytest.raises(RingllmError, match="max_context 300 exceeds the model's context of 256"):
        Engine(model, max_batch=1, max_context=300)


def test_submit_and_cancel_from_another_thread(tiny):
    import threading
    import time

    hf, model = tiny
    prompts = random_prompts([3, 8, 17, 5, 2, 11], seed=7)
    engine = Engine(model, max_batch=3, max_context=64, prefill_chunk=8)
    tokens, finished = {}, {}

    def client():
        for i, p in enumerate(prompts):
            engine.submit(Request(f"t{i}", p, 6, GREEDY))
            time.sleep(0.002)
        engine.submit(Request("gone", prompts[0], 40, GREEDY))
        engine.cancel("gone")

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 60
    while len(finished) < len(prompts) + 1:
        assert time.monotonic() < deadline, f"finished only {sorted(finished)}"
        for e in engine.step():
            if e.token is not None:
                tokens.setdefault(e.id, []).append(e.token)
            if e.finish:
                finished[e.id] = e.finish
    thread.join(timeout=10)
    assert finished["gone"] == "cancelled"
    for i, p in enumerate(prompts):
        assert tokens[f"t{i}"] == hf_greedy_cached(hf, list(p), 6), f"t{i} differs from alone"
    assert engine.idle() and engine.free_rows == 3


def test_a_long_prompt_does_not_starve_newcomers(tiny):
    """The pass's prefill budget is shared: a short prompt that joins while a long one is being
    prefilled gets its first token one pass after it joins, and the chunk boundaries that sharing
    makes (uneven, changing every pass) leave every request's tokens equal to transformers' alone."""
    hf, model = tiny
    long, short, other = random_prompts([200, 3, 8], seed=8)
    engine = Engine(model, max_batch=3, max_context=256, prefill_chunk=16)
    schedule = {0: [Request("long", long, 4, GREEDY)],
                1: [Request("short", short, 4, GREEDY)],
                3: [Request("other", other, 4, GREEDY)]}
    tokens, finished, per_step = run(engine, schedule)
    first = {rid: next(s for s, events in enumerate(per_step) if any(e.id == rid for e in events))
             for rid in schedule_ids(schedule)}
    # joined at step 1 / 3: the first token comes in the pass it joins (its whole prompt fits its share)
    assert first["short"] == 1, f"the 3-token prompt waited {first['short'] - 1} passes behind the long one"
    assert first["other"] == 3, f"the 8-token prompt waited {first['other'] - 3} passes behind the long one"
    # no budget is lost: the long prompt took what the short ones left (211 prompt tokens at 16 a
    # pass: 14 passes, one more than its 200 tokens alone)
    assert first["long"] == 13, f"the long prompt's first token at step {first['long']}"
    for rid, p in (("long", long), ("short", short), ("other", other)):
        assert tokens[rid] == hf_greedy_cached(hf, list(p), 4), f"{rid} differs from alone"
    assert engine.free_rows == 3 and engine.kv_tokens_used == 0


def test_prefill_budget_smaller_than_the_prompts_waiting(tiny):
    """With more prompts prefilling than the pass has budget, each still gets a token a pass, so
    none waits for the others' prompts; the tokens equal transformers' alone."""
    hf, model = tiny
    prompts = random_prompts([7, 5, 6], seed=10)
    engine = Engine(model, max_batch=3, max_context=64, prefill_chunk=2)
    tokens, _, per_step = run(engine, {0: [Request(f"p{i}", p, 3, GREEDY) for i, p in enumerate(prompts)]})
    first = {f"p{i}": next(s for s, events in enumerate(per_step) if any(e.id == f"p{i}" for e in events))
             for i in range(3)}
    assert first == {"p0": 6, "p1": 4, "p2": 5}, first    # one token a pass each: the prompt's length - 1
    for i, p in enumerate(prompts):
        assert tokens[f"p{i}"] == hf_greedy_cached(hf, list(p), 3), f"p{i} differs from alone"


def schedule_ids(schedule: dict[int, list[Request]]) -> list[str]:
    return [req.id for reqs in schedule.values() for req in reqs]
