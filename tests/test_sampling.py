"""Sampling: greedy, temperature, top-k and top-p obey their definitions; seeds reproduce."""
from __future__ import annotations

import pytest
import torch

from ringllm.workers.generation import Sampler, SamplingParams

CPU = torch.device("cpu")


def draws(params, logits, n=400):
    s = Sampler(params, CPU)
    return torch.stack([s(logits) for _ in range(n)])


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(Sampler(SamplingParams(), CPU)(logits), logits.argmax(-1))


def test_seed_reproduces_and_differs():
    logits = torch.zeros(1, 1000)
    a = draws(SamplingParams(temperature=1.0, seed=7), logits, 20)
    b = draws(SamplingParams(temperature=1.0, seed=7), logits, 20)
    c = draws(SamplingParams(temperature=1.0, seed=8), logits, 20)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_limits_support():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    got = set(draws(SamplingParams(temperature=2.0, top_k=5, seed=1), logits).flatten().tolist())
    assert got <= allowed and len(got) > 1


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2), logits).flatten().tolist())
    assert got == {0, 1}   # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.1, seed=3), logits).flatten().tolist())
    assert got == {0}


def test_temperature_frequencies():
    logits = torch.tensor([[0.0, 1.0]])
    hits = draws(SamplingParams(temperature=1.0, seed=4), logits, 4000).float().mean().item()
    assert abs(hits - torch.softmax(logits, -1)[0, 1].item()) < 0.03


def support_per_row(params, logits, n) -> list[set[int]]:
    """The tokens drawn for each row of logits [B, V] in n draws. The rows are repeated n times in
    one batch (one Sampler call instead of n: the sampler treats rows independently)."""
    rows = logits.shape[0]
    samples = Sampler(params, CPU)(logits.repeat(n, 1)).view(n, rows)
    return [set(samples[:, row].tolist()) for row in range(rows)]


def distinct_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    assert all(len(set(r.tolist())) == vocab for r in logits), "ties would make 'the top k' ambiguous"
    return logits


@pytest.mark.parametrize("k", [2, 3, 5, 17, 50, 100, 103])
def test_top_k_support_is_exactly_the_top_k(k):
    """At temperature 50 the kept tokens are almost equally likely, so 3000 draws show every one
    of them: the support must be the k largest logits, all of them and nothing else (a threshold
    one off keeps k-1 or k+1). k >= vocab keeps everything."""
    vocab = 100
    logits = distinct_logits(4, vocab, seed=k)
    got = support_per_row(SamplingParams(temperature=50.0, top_k=k, seed=k), logits, 3000)
    for row, support in enumerate(got):
        expected = set(torch.topk(logits[row], min(k, vocab)).indices.tolist())
        assert support == expected, (f"row {row}: {len(support)} tokens drawn for top_k={k}; missing "
                                     f"{sorted(expected - support)}, outside the top k {sorted(support - expected)}")


@pytest.mark.parametrize("temperature", [0.01, 1.0, 50.0, 1e4])
def test_top_k_1_is_argmax_for_every_row(temperature):
    logits = distinct_logits(64, 300, seed=int(temperature * 100))
    s = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=5), CPU)
    for _ in range(10):
        assert torch.equal(s(logits), logits.argmax(-1))


def reference_nucleus(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """Tokens the definition keeps, computed in float64 from scratch: the top_k largest logits,
    then (on the temperature-scaled, renormalized distribution over those) the smallest set of
    most likely tokens whose mass reaches top_p. Also returns how close top_p lies to a
    cumulative mass (a sampled test cannot tell keep from drop at a tie)."""
    scaled = logits_row.double() / temperature
    order = torch.argsort(scaled, descending=True).tolist()
    kept = order[:top_k] if top_k else order
    probs = torch.softmax(scaled[kept], -1).tolist()
    nucleus, mass, margin = [], 0.0, float("inf")
    for token, p in zip(kept, probs):
        nucleus.append(token)
        mass += p
        margin = min(margin, abs(mass - top_p))
        if mass >= top_p:
            break
    return set(nucleus), margin


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 0.5), (1.0, 0, 0.9), (0.5, 0, 0.8), (2.0, 0, 0.6), (1.0, 0, 0.999),
    (1.0, 4, 0.7), (0.7, 5, 0.8), (2.0, 6, 0.5), (3.0, 3, 0.95),
])
def test_top_p_support_is_exactly_the_nucleus(temperature, top_k, top_p):
    """Top-p works on the distribution after temperature and top-k: the support is exactly the
    smallest most-likely set holding top_p of that mass, row by row."""
    logits = distinct_logits(12, 8, seed=int(top_p * 1000) + top_k) / 3
    got = support_per_row(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=9), logits,
                          20000)
    checked = 0
    for row, support in enumerate(got):
        expected, margin = reference_nucleus(logits[row], temperature, top_k, top_p)
        if margin < 1e-3:
            continue      # top_p (almost) equals a cumulative mass: either answer is fair
        checked += 1
        assert support == expected, (f"row {row}: drew {sorted(support)}, the nucleus is {sorted(expected)} "
                                     f"(temperature={temperature}, top_k={top_k}, top_p={top_p})")
    assert checked >= 8
