"""Sampling with a draft keeps the target's distribution (issue #14): many seeded draws of the first
3 tokens, decoded with draft trees (prompt lookup, and a draft model; 4 requests in every pass), pass a chi-square test
against the exact joint distribution that sampling without a draft has (transformers' logits,
processed by temperature/top-k/top-p written out here); sampling without a draft passes the same
test (the reference is right), and a planted bug (a child accepted without its draw) fails it."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from ringllm.workers import engine as engine_module
from ringllm.workers.drafts import DraftModel
from ringllm.workers.generation import Sampler, generate
from ringllm.workers.sampling import SamplingParams
from ringllm.workers.speculation import DraftParams, SpecStats, SpeculativeSampling
from tests.conftest import make_hf_checkpoint, write_tokenizer
from tests.test_speculation import resident_model

CPU = torch.device("cpu")
VOCAB, NEW_TOKENS, DRAWS = 16, 3, 2000
TEMPERATURE, TOP_K, TOP_P = 1.0, 5, 0.9
P_FAIL = 1e-3               # fixed threshold: a correct sampler fails once in a thousand runs


def processed_probs(logits: torch.Tensor) -> torch.Tensor:
    """What sampling draws from, written out independently of workers.generation.Sampler:
    logits / temperature, the top-k kept, then the smallest set of the likeliest tokens holding
    top_p of the mass kept, renormalised."""
    probs = (logits.double() / TEMPERATURE).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, mass, top_k_mass = [], 0.0, probs[order[:TOP_K]].sum().item()
    for tok in order[:TOP_K]:
        if mass / top_k_mass > TOP_P:     # the tokens above it hold more than top_p of the top-k's mass
            break
        keep.append(tok)
        mass += probs[tok].item()
    out = torch.zeros_like(probs)
    out[keep] = probs[keep] / mass
    return out


def sampled_prompt(hf, length: int = 40) -> list[int]:
    """The model's own text (transformers, sampled): every token recurs with the followers the
    model likes, so prompt lookup drafts branching trees that get accepted into."""
    gen, seq = torch.Generator().manual_seed(0), [4]
    with torch.no_grad():
        while len(seq) < length:
            probs = processed_probs(hf(torch.tensor([seq])).logits[0, -1])
            seq.append(int(torch.multinomial(probs, 1, generator=gen)))
    return seq


def exact_joint(hf, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """P(first NEW_TOKENS tokens) of sampling without a draft, from transformers' logits."""
    joint = {(): 1.0}
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            nxt = {}
            for prefix, p in joint.items():
                probs = processed_probs(hf(torch.tensor([prompt + list(prefix)])).logits[0, -1])
                for tok in probs.nonzero().flatten().tolist():
                    nxt[prefix + (tok,)] = p * probs[tok].item()
            joint = nxt
    return joint


def chi_square_p(counts: Counter, expected_p: dict) -> float:
    """Pearson's test of the counts against the expected probabilities; cells expecting fewer
    than 5 draws are pooled into one. A draw outside the support gives 0."""
    n = sum(counts.values())
    if set(counts) - set(expected_p):
        return 0.0
    cells, rare_obs, rare_exp = [], 0, 0.0
    for key, p in expected_p.items():
        if n * p >= 5:
            cells.append((counts[key], n * p))
        else:
            rare_obs, rare_exp = rare_obs + counts[key], rare_exp + n * p
    if rare_exp > 0:
        cells.append((rare_obs, rare_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampling") / "tiny"
    hf = make_hf_checkpoint(d, vocab_size=VOCAB, initializer_range=0.3, num_hidden_layers=2)
    write_tokenizer(d, VOCAB)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # thousands of tiny forwards: threads only wait on each other
    # the draft model: the target's first layer alone, flattened (it agrees often, not always,
    # and hesitates enough that its best-first trees branch)
    draft = copy.deepcopy(hf)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    with torch.no_grad():
        draft.lm_head.weight.mul_(0.3)
    draft.save_pretrained(d.parent / "draft")
    write_tokenizer(d.parent / "draft", VOCAB)
    prompt = sampled_prompt(hf)
    yield d, resident_model(d), prompt, exact_joint(hf, prompt)
    torch.set_num_threads(threads)


BATCH = 4          # requests in one engine: every pass carries 4 requests' trees


def draws_with(model, prompt, draft: str, draws: int = DRAWS, stats: SpecStats | None = None) -> Counter:
    """`draws` generations of NEW_TOKENS tokens, seeds 0.., with the draft, BATCH requests at a
    time in one engine (generate seeds prompt i with seed + i)."""
    params = dict(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
    counts = Counter()
    for seed in range(0, draws, BATCH):
        sampling = SpeculativeSampling(**params, seed=seed, draft=DraftParams(draft, spec_tokens=4))
        counts.update(map(tuple, generate(model, [prompt] * BATCH, NEW_TOKENS, Sampler(sampling, CPU), eos_ids=[],
                                          spec_stats=stats)))
    return counts


def test_sampling_without_a_draft_matches_the_reference(tiny):
    """The reference is sampling without a draft: ringllm's own plain sampler passes (one batch
    of DRAWS rows, one seed)."""
    _, model, prompt, joint = tiny
    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=0)
    rows = generate(model, [prompt] * DRAWS, NEW_TOKENS, Sampler(params, CPU), eos_ids=[])
    p = chi_square_p(Counter(map(tuple, rows)), joint)
    assert p > P_FAIL, f"plain sampling: chi-square p = {p:.2e}"


@pytest.fixture
def draft_loaded_once(tiny, monkeypatch):
    """The draft model's directory; generate() loads it once, not once per draw (the fast path)."""
    draft_dir = tiny[0].parent / "draft"
    draft = resident_model(draft_dir)
    monkeypatch.setattr(DraftModel, "load", classmethod(
        lambda cls, _dir, rows, max_context, spec_tokens, *_: cls(draft, rows, max_context + spec_tokens)))
    return draft_dir


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_sampling_with_draft_trees_keeps_the_targets_distribution(tiny, draft, draft_loaded_once):
    d, model, prompt, joint = tiny
    stats = SpecStats()
    counts = draws_with(model, prompt, "ngram" if draft == "ngram" else str(draft_loaded_once), stats=stats)
    p = chi_square_p(counts, joint)
    assert p > P_FAIL, f"--draft {draft}: chi-square p = {p:.2e} over {DRAWS} draws, {stats.as_dict()}"
    # the trees branched and were accepted into: the rule was exercised, not bypassed
    assert stats.branched > DRAWS // 2 and stats.accepted > DRAWS // 2, stats.as_dict()


def test_a_child_accepted_without_its_draw_fails_the_test(tiny, draft_loaded_once, monkeypatch):
    """The planted bug: the walk moves to the first child whether the draw carries it or not
    (drafts accepted as if greedy). The same test must reject it."""
    d, model, prompt, joint = tiny
    walk = engine_module.walk_tree

    def first_child_taken(tree, target):
        first = {p: i + 1 for i, p in reversed(list(enumerate(tree.parents)))}     # parent -> first child
        forced = list(target)
        for at, child in first.items():
            forced[at + 1] = tree.tokens[child - 1]
        return walk(tree, forced)

    monkeypatch.setattr(engine_module, "walk_tree", first_child_taken)
    p = chi_square_p(draws_with(model, prompt, str(draft_loaded_once), draws=DRAWS // 4), joint)
    assert p < P_FAIL, f"the planted bug passed: chi-square p = {p:.2e}"


def test_cli_sampling_with_a_draft_is_deterministic_with_a_seed(tmp_path):
    """--seed fixes the draws: the same tokens twice, and on both engines (same model code, same
    generator); another seed draws other tokens."""
    from tests.conftest import make_model_dir
    from tests.test_speculation import ringllm

    d = make_model_dir(tmp_path / "m", num_hidden_layers=2)
    common = ["generate", "--model", str(d), "--device", "cpu", "--no-chat", "--max-new-tokens", "16",
              "--prompt", "w3 w9 w14 w3 w9 w20 w3 w9", "--draft", "ngram", "--temperature", "1.0"]
    runs = [ringllm(*common, "--seed", seed, *engine) for seed, engine in
            (("7", ["--resident"]), ("7", ["--resident"]), ("7", ["--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1"]),
             ("8", ["--resident"]))]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout and runs[0].stdout.strip()
    assert runs[3].stdout != runs[0].stdout
