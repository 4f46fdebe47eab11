"""--draft ngram (prompt-lookup speculative decoding): the proposer and accept rule, token identity
with plain greedy decoding against transformers (tiny model and SmolLM2, both engines), the KV
cache holding only the accepted path, tokens per pass on a copying prompt, the refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from ringllm.workers import engine as engine_module
from ringllm.workers.generation import Sampler, generate
from ringllm.workers.model import Llama
from ringllm.workers.resident import ResidentSource, load_resident_weights
from ringllm.workers.sampling import SamplingParams
from ringllm.workers.speculation import DraftParams, DraftTree, NgramProposer, SpecStats, SpeculativeSampling, walk_tree
from tests.conftest import hf_greedy_cached, make_model_dir

CPU = torch.device("cpu")
NGRAM = SpeculativeSampling(draft=DraftParams("ngram", spec_tokens=8, ngram_max=3))
POISON_PROMPT = [5, 17, 2, 40, 8, 99, 23]     # generate_with_poisoned_cache's


def ringllm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True, timeout=timeout)


def resident_model(model_dir, dtype=torch.float32) -> Llama:
    layout = load_layout(model_dir)
    return Llama(layout.config, load_resident_weights(layout, dtype, CPU), ResidentSource(layout, dtype, CPU), dtype, CPU)


# --- the proposer and the accept rule --------------------------------------------------------------

def test_proposer_takes_the_longest_suffix_at_its_most_recent_occurrence():
    # suffix "1 2 3" occurs at 0 and at 5, both followed by different text: two branches, the
    # most recent occurrence's (7 8 0 ...) first, grown level by level
    p = NgramProposer(3, [1, 2, 3, 4, 9, 1, 2, 3, 7, 8, 0, 1, 2, 3])
    assert p.propose(8) == DraftTree((7, 4, 8, 9, 0, 1, 1, 2), (-1, -1, 0, 1, 2, 3, 4, 5))
    assert p.propose(3) == DraftTree((7, 4, 8), (-1, -1, 0))
    # one occurrence: a chain. No 3-gram or 2-gram repeats; the 1-gram "5" does (at 0 and 3:
    # continuations 1 9 5 and 6 2 5)
    assert NgramProposer(3, [1, 2, 3, 4, 1, 2, 3]).propose(8) == DraftTree.chain([4, 1, 2, 3])
    assert NgramProposer(3, [5, 1, 9, 5, 6, 2, 5]).propose(4) == DraftTree((6, 1, 2, 9), (-1, -1, 0, 1))
    # continuations sharing a prefix share its nodes
    assert NgramProposer(1, [7, 3, 4, 7, 3, 5, 7]).propose(5) == DraftTree((3, 5, 4, 7, 7), (-1, 0, 0, 1, 2))
    assert NgramProposer(1, [1, 2, 3]).propose(4) == DraftTree()
    assert NgramProposer(3, [4]).propose(4) == DraftTree()


def test_accept_rule_follows_the_drawn_child():
    # target[j]: the token drawn at pass position j (0 = the root, the last accepted token)
    chain = DraftTree.chain([5, 6, 7])
    assert walk_tree(chain, [5, 6, 9, 1]) == ([5, 6, 9], [1, 2])
    assert walk_tree(chain, [5, 6, 7, 1]) == ([5, 6, 7, 1], [1, 2, 3])
    assert walk_tree(chain, [4, 6, 7, 1]) == ([4], [])
    assert walk_tree(DraftTree(), [3]) == ([3], [])
    #        root
    #       /    \
    #   5 (1)    6 (2)
    #     |      /   \
    #   7 (3)  8 (4)  9 (5)
    tree = DraftTree((5, 6, 7, 8, 9), (-1, -1, 0, 1, 1))
    assert walk_tree(tree, [6, 0, 9, 0, 0, 2]) == ([6, 9, 2], [2, 5])
    assert walk_tree(tree, [5, 7, 0, 4, 0, 0]) == ([5, 7, 4], [1, 3])
    assert walk_tree(tree, [6, 0, 7, 0, 0, 0]) == ([6, 7], [2])        # 7 is 5's child, not 6's
    with pytest.raises(ValueError):
        DraftTree((5, 5), (-1, -1))                                    # siblings carry distinct tokens


# --- exactness and the KV cache --------------------------------------------------------------------

def test_ngram_greedy_matches_transformers_on_a_tiny_model(tiny_checkpoint):
    d, hf = tiny_checkpoint
    model = resident_model(d)
    prompt = [3, 9, 14, 3, 9, 14, 3, 9, 14, 3, 9]       # repeats, so drafts get proposed
    stats = SpecStats()
    got = generate(model, [prompt], 40, Sampler(NGRAM, CPU), eos_ids=[], spec_stats=stats)[0]
    assert got == hf_greedy_cached(hf, prompt, 40)
    assert stats.tokens == 39 and stats.drafted > 0 and stats.passes < 39


class CorruptedReference:
    """A proposer that drafts transformers' own greedy continuation with one wrong token at a
    position that moves every pass: each pass accepts a prefix and leaves rejected KV entries."""
    reference: list[int] = []
    vocab = 128

    def __init__(self, ngram_max, seq):
        self.seq, self.prompt_len, self.passes = seq, len(seq), 0   # seq: the accepted sequence
        CorruptedReference.current = self

    def propose(self, limit):
        done = len(self.seq) - self.prompt_len
        drafts = list(self.reference[done:done + limit])
        if drafts:
            wrong = self.passes % (len(drafts) + 1)      # len(drafts): all correct this time
            if wrong < len(drafts):
                drafts[wrong] = (drafts[wrong] + 1) % self.vocab
        self.passes += 1
        return DraftTree.chain(drafts)


def generate_with_poisoned_cache(tiny_checkpoint, monkeypatch, proposer, sampling, check_verify_pass):
    """30 tokens of POISON_PROMPT on the resident engine with `proposer` in the n-gram proposer's
    place (its .reference set to transformers' greedy continuation first). Before every forward,
    every cache slot of the row from the segment's start on (never written, or holding a rejected
    draft of an earlier pass) is set to NaN, and the logits must stay finite: one read of such a
    slot, even a masked one inside the attended range, makes them NaN. After each verify pass (a
    decode pass: the prompt's is at slot 0), check_verify_pass(tokens [1, T], logits [1, T, V],
    start, n) compares them with transformers (n: the verify passes checked before). Returns
    (tokens, SpecStats, the checked verify passes' start slots)."""
    d, hf = tiny_checkpoint
    model = resident_model(d)
    proposer.reference = hf_greedy_cached(hf, POISON_PROMPT, 30)
    monkeypatch.setattr(engine_module, "NgramProposer", proposer)
    forward, checked = model.forward, []

    def checked_forward(cache, segments):
        (seg,) = segments                  # one request: one segment a pass
        cache.k[:, seg.row, :, seg.start:] = float("nan")
        cache.v[:, seg.row, :, seg.start:] = float("nan")
        logits = forward(cache, segments)
        assert torch.isfinite(logits).all(), f"NaN logits in the pass at slot {seg.start}: a poisoned slot was read"
        if seg.start > 0:
            check_verify_pass(torch.tensor([list(seg.tokens)]), logits[None], seg.start, len(checked))
            checked.append(seg.start)
        return logits

    model.forward = checked_forward
    stats = SpecStats()
    got = generate(model, [POISON_PROMPT], 30, Sampler(sampling, CPU), eos_ids=[], spec_stats=stats)[0]
    return got, stats, checked


def test_kv_cache_never_reads_a_rejected_draft(tiny_checkpoint, monkeypatch):
    """Every verify pass's logits equal transformers' logits for the accepted sequence followed by
    the pass's drafts, computed from scratch (no cache): a rejected draft's K/V read in a later
    pass would change them. And before every forward, every cache slot from its start on (never
    written, or holding a rejected draft of an earlier pass) is set to NaN: one read of such a
    slot, even a masked one inside the attended range, makes the logits NaN."""
    hf = tiny_checkpoint[1]

    def check_verify_pass(tokens, logits, start, n):     # tokens: [accepted sequence's last, drafts...]
        seq = CorruptedReference.current.seq
        with torch.no_grad():
            want = hf(torch.tensor([seq + tokens[0, 1:].tolist()])).logits[0, len(seq) - 1:]
        torch.testing.assert_close(logits[0], want, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"pass {n} (slot {start}) differs from transformers without a cache: {m}")

    got, stats, checked = generate_with_poisoned_cache(tiny_checkpoint, monkeypatch, CorruptedReference, NGRAM,
                                                       check_verify_pass)
    rejected = stats.drafted - stats.accepted
    assert rejected >= 10 and stats.accepted >= 10, stats      # the test exercised both
    assert len(checked) == stats.passes
    assert got == CorruptedReference.reference


def test_eos_and_max_new_tokens_cut_the_accepted_run(tiny_checkpoint):
    d, hf = tiny_checkpoint
    model = resident_model(d)
    prompt = [3, 9, 14, 3, 9, 14, 3, 9, 14, 3, 9]
    reference = hf_greedy_cached(hf, prompt, 40)
    for n in (1, 2, 7):
        assert generate(model, [prompt], n, Sampler(NGRAM, CPU), eos_ids=[])[0] == reference[:n]
    eos = reference[12]              # a token greedy produces: generation stops right after it
    cut = reference.index(eos) + 1
    assert generate(model, [prompt], 40, Sampler(NGRAM, CPU), eos_ids=[eos])[0] == reference[:cut]


def test_last_passes_verify_full_drafts_and_the_surplus_is_cut(tiny_checkpoint):
    """The cache has room for one pass's drafts past the new tokens (speculation.cache_slots):
    a pass near max_new_tokens still verifies spec_tokens drafts, and what it accepts past
    max_new_tokens is dropped. The transformers continuation as drafts: every draft is right."""
    d, hf = tiny_checkpoint
    model = resident_model(d)
    prompt = [5, 17, 2, 40, 8, 99, 23]
    reference = hf_greedy_cached(hf, prompt, 40)

    class Oracle:
        def __init__(self, ngram_max, seq):
            self.seq, self.n = seq, len(seq)

        def propose(self, limit):
            done = len(self.seq) - self.n
            return DraftTree.chain((reference + [0] * 40)[done:done + limit])

    stats = SpecStats()
    params = SpeculativeSampling(draft=DraftParams("ngram", spec_tokens=8))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "NgramProposer", Oracle)
        got = generate(model, [prompt], 12, Sampler(params, CPU), eos_ids=[], spec_stats=stats)[0]
    assert got == reference[:12]
    # the prefill gives token 1; pass 1 verifies 8 drafts and yields 9 (tokens 2..10); pass 2 still
    # verifies 8 drafts, though only 2 more tokens are wanted
    assert {w: t.passes for w, t in stats.verify_by_width.items()} == {9: 2}, stats.verify_by_width
    assert stats.tokens == 11


# --- both engines through the command --------------------------------------------------------------

def test_cli_ngram_matches_plain_greedy_streaming_and_resident(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=4)
    common = ["generate", "--model", str(d), "--device", "cpu", "--prompt", "w9 w10 w11 w9 w10 w11 w9 w10",
              "--max-new-tokens", "30"]
    plain = ringllm(*common, "--resident")
    assert plain.returncode == 0, plain.stderr
    metrics = tmp_path / "metrics.json"
    for engine in (["--resident"], ["--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1"]):
        r = ringllm(*common, "--draft", "ngram", "--metrics-json", str(metrics), *engine)
        assert r.returncode == 0, r.stderr
        assert r.stdout == plain.stdout and r.stdout.strip()
        spec = json.loads(metrics.read_text())["speculation"]
        assert spec["draft"] == "ngram" and spec["tokens"] == 29        # + the prefill's token
        assert spec["passes"] < 29 and spec["tokens_per_pass"] == pytest.approx(29 / spec["passes"])
        assert 0 < spec["accepted"] <= spec["drafted"]
        assert spec["acceptance"] == pytest.approx(spec["accepted"] / spec["drafted"])
        assert "tokens per pass" in r.stderr


@pytest.mark.parametrize("extra, message", [
    (["--spec-tokens", "0"], "--spec-tokens must be >= 1, got 0"),
])
def test_refusals(tmp_path, extra, message):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=2)
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--prompt", "w1", "--max-new-tokens", "4",
                "--draft", "ngram", *extra)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ringllm: error: {message}"), r.stderr


def test_refuses_a_draft_other_than_ngram_or_a_model_directory(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=2)
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--draft", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"ringllm: error: --draft {tmp_path}: neither 'ngram' (prompt lookup) nor a "
                                "model directory (no config.json there)")


# --- SmolLM2-135M ----------------------------------------------------------------------------------

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the great "
             "lens, trimmed the wick, and wrote the weather in a leather book. Ships passed safely because "
             "of his quiet work, though few sailors ever knew his name.")


@pytest.fixture(scope="module")
def smollm2(demo_model_dir):
    from ringllm.checkpoint.text import TextCodec

    model = resident_model(demo_model_dir)
    return model, TextCodec(demo_model_dir, model.cfg)


def test_smollm2_ngram_matches_transformers(demo_model_dir, smollm2):
    from transformers import AutoModelForCausalLM

    model, codec = smollm2
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    prompt = codec.encode("Write a short poem about the sea.", chat=True)
    stats = SpecStats()
    got = generate(model, [prompt], 40, Sampler(NGRAM, CPU), eos_ids=[], spec_stats=stats)[0]
    assert got == hf_greedy_cached(hf, prompt, 40)
    print(f"SmolLM2-135M poem: {stats.as_dict()}")
    assert stats.branched > 0 and stats.accepted > 0, stats.as_dict()        # trees, taken into


def test_smollm2_copying_prompt_reaches_1_5_tokens_per_pass(smollm2):
    model, codec = smollm2
    prompt = codec.encode(f"Repeat this text exactly: {PARAGRAPH}", chat=True)
    stats = SpecStats()
    spec = generate(model, [prompt], 48, Sampler(NGRAM, CPU), codec.eos_ids, spec_stats=stats)[0]
    plain = generate(model, [prompt], 48, Sampler(SamplingParams(), CPU), codec.eos_ids)[0]
    assert spec == plain
    assert "lighthouse keeper" in codec.decode(spec)       # it did copy
    per_pass = stats.tokens / stats.passes
    print(f"SmolLM2-135M copying prompt: {stats.as_dict()}")
    assert per_pass >= 1.5, stats.as_dict()
