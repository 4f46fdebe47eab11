"""Sampling: greedy, temperature, top-k and top-p obey their definitions; seeds reproduce."""
from __future__ import annotations

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
