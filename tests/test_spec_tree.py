"""Draft trees (issue #14): one pass's tree mask against transformers on each root-to-node path,
the KV cache compacted to the accepted path (NaN-poisoned, against transformers from scratch),
greedy token identity with branching trees (prompt lookup and a draft model) on both engines."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from ringllm.workers.drafts import DraftModel, verify_segment
from ringllm.workers.generation import Sampler, generate
from ringllm.workers.model import NO_LOGITS, KVCache, Segment
from ringllm.workers.speculation import DraftParams, DraftTree, SpecStats, SpeculativeSampling
from tests.conftest import hf_greedy_cached, make_hf_checkpoint, make_model_dir, write_tokenizer
from tests.test_speculation import generate_with_poisoned_cache, resident_model, ringllm

CPU = torch.device("cpu")
NGRAM = SpeculativeSampling(draft=DraftParams("ngram", spec_tokens=8, ngram_max=3))
# "3 9" occurs three times, followed by 14, 20 and 31: the first pass's draft branches
BRANCHING_PROMPT = [3, 9, 14, 7, 3, 9, 20, 8, 3, 9, 31, 6, 3, 9]


def path_to(tree: DraftTree, node: int) -> list[int]:
    """The tokens from the root's child down to `node` (-1: the root itself, no tokens)."""
    path = []
    while node >= 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


def test_one_pass_gives_each_node_the_logits_of_its_own_path(tiny_checkpoint):
    """A tree of 7 nodes (3 branches, depth 4) verified in one forward after a prefill: the logits
    at every node equal transformers' logits after prompt + the root-to-node path, as if that
    path had been decoded alone."""
    d, hf = tiny_checkpoint
    model = resident_model(d)
    prompt = [5, 17, 2, 40, 8, 99, 23]
    tree = DraftTree((11, 12, 13, 14, 15, 16, 17), (-1, -1, 0, 0, 2, 1, 5))
    cache = KVCache(model.cfg, 1, 32, model.dtype, CPU)
    model.forward(cache, [Segment(0, prompt[:-1], 0, logits=NO_LOGITS)])
    start = len(prompt) - 1          # the root: the last prompt token
    logits = model.forward(cache, [verify_segment(0, prompt[-1], start, tree)])
    with torch.no_grad():
        for node in range(-1, len(tree)):
            want = hf(torch.tensor([prompt + path_to(tree, node)])).logits[0, -1]
            torch.testing.assert_close(logits[node + 1], want, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"node {node} (path {path_to(tree, node)}): {m}")


class WrongFirstTree:
    """A proposer: transformers' greedy continuation as a tree whose levels each hold a wrong
    sibling (and its own child) BEFORE the right node, so accepted nodes sit at scattered pass
    positions and the KV must be compacted. The right node is left out at a depth that moves
    every pass, so accepts vary in length and rejected subtrees are left behind."""
    reference: list[int] = []
    vocab = 128

    def __init__(self, ngram_max, seq):
        self.seq, self.prompt_len, self.passes = seq, len(seq), 0
        WrongFirstTree.current = self

    def propose(self, limit):
        done = len(self.seq) - self.prompt_len
        right = self.reference[done:done + limit // 3]
        cut = self.passes % (len(right) + 1)         # len(right): the whole chain this time
        self.passes += 1
        tokens, parents, at = [], [], -1
        for depth, tok in enumerate(right):
            wrong = (tok + 1) % self.vocab
            tokens += [wrong, (wrong + 1) % self.vocab]         # a wrong sibling and its child
            parents += [at, len(tokens) - 2]
            if depth == cut:
                break
            tokens.append(tok)
            parents.append(at)
            at = len(tokens) - 1
        self.tree = DraftTree(tuple(tokens), tuple(parents))
        return self.tree


def test_tree_kv_compaction_leaves_only_the_accepted_path(tiny_checkpoint, monkeypatch):
    """Every verify pass's logits, at every node, equal transformers' logits from scratch (no
    cache) on the accepted sequence + the root-to-node path: a rejected node's K/V left in the
    accepted range, or an accepted node's left at its pass position, changes them. And before
    every forward, every cache slot from its start on is set to NaN: one read of such a slot
    (never written, or a rejected node of an earlier pass) makes the logits NaN."""
    hf = tiny_checkpoint[1]

    def check_verify_pass(tokens, logits, start, n):     # tokens: [accepted sequence's last, the tree's nodes]
        seq, tree = WrongFirstTree.current.seq, WrongFirstTree.current.tree
        assert tokens[0, 1:].tolist() == list(tree.tokens)
        with torch.no_grad():
            for node in range(-1, len(tree)):
                want = hf(torch.tensor([seq + path_to(tree, node)])).logits[0, -1]
                torch.testing.assert_close(logits[0, node + 1], want, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"pass {n} (slot {start}), node {node}: differs from "
                                                         f"transformers without a cache: {m}")

    wide = SpeculativeSampling(draft=DraftParams("ngram", spec_tokens=15))     # 5 levels of 3 nodes
    got, stats, checked = generate_with_poisoned_cache(tiny_checkpoint, monkeypatch, WrongFirstTree, wide,
                                                       check_verify_pass)
    assert got == WrongFirstTree.reference
    assert len(checked) == stats.passes and stats.branched >= stats.passes // 2
    assert stats.accepted >= 15 and stats.passes <= 12, stats.as_dict()     # long and short accepts


# --- greedy token identity -------------------------------------------------------------------------

def test_ngram_trees_keep_transformers_greedy_output(tiny_checkpoint):
    d, hf = tiny_checkpoint
    stats = SpecStats()
    got = generate(resident_model(d), [BRANCHING_PROMPT], 40, Sampler(NGRAM, CPU), eos_ids=[], spec_stats=stats)[0]
    assert got == hf_greedy_cached(hf, BRANCHING_PROMPT, 40)
    assert stats.branched > 0 and stats.tokens == 39, stats.as_dict()


def test_draft_model_trees_keep_transformers_greedy_output(tmp_path):
    """A peaked target drafted by a noisy copy of itself: trees branch where the draft hesitates,
    some drafts are right, some wrong."""
    target, draft = tmp_path / "t", tmp_path / "d"
    hf = make_hf_checkpoint(target, initializer_range=1.0)
    noisy = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    noisy.save_pretrained(draft)
    for p in (target, draft):
        write_tokenizer(p)
    prompt = [3, 9, 14, 27, 5, 88, 41]
    stats = SpecStats()
    sampling = SpeculativeSampling(draft=DraftParams(str(draft), spec_tokens=6))
    got = generate(resident_model(target), [prompt], 40, Sampler(sampling, CPU), eos_ids=[], spec_stats=stats)[0]
    assert got == hf_greedy_cached(hf, prompt, 40)
    assert stats.branched > 0 and stats.accepted > 0 and stats.drafted > stats.accepted, stats.as_dict()


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_cli_trees_match_plain_greedy_streaming_and_resident(tmp_path, draft):
    """The draft model: the target itself, peaked enough that its trees are wide and deep and
    accepted paths leave the first branch (so the KV is compacted: it fails without that)."""
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=3, **({"initializer_range": 0.5} if draft == "model" else {}))
    if draft == "model":
        draft = str(d)
    common = ["generate", "--model", str(d), "--device", "cpu", "--no-chat", "--max-new-tokens", "40",
              "--prompt", " ".join(f"w{t}" for t in BRANCHING_PROMPT)]
    plain = ringllm(*common, "--resident")
    assert plain.returncode == 0, plain.stderr
    for engine in (["--resident"], ["--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1"]):
        metrics = tmp_path / "metrics.json"
        r = ringllm(*common, "--draft", draft, "--spec-tokens", "8", "--metrics-json", str(metrics), *engine)
        assert r.returncode == 0, r.stderr
        assert r.stdout == plain.stdout and r.stdout.strip()
        spec = json.loads(metrics.read_text())["speculation"]
        assert spec["branched"] > 0 and spec["tokens"] == 39, spec


def test_draft_model_tree_holds_the_likeliest_continuations(tmp_path):
    """The draft model's tree (its own logits, rank temperature 1) is the `limit` likeliest nodes
    by cumulative probability, found here by a best-first search over transformers' logits (pop
    the likeliest path, push its children: the first `limit` popped are the likeliest). A model
    peaked enough that the trees are both wide and deep."""
    import heapq

    d = tmp_path / "m"
    hf = make_hf_checkpoint(d, initializer_range=0.5)
    prompt, limit = [5, 17, 2, 40, 8, 99, 23], 8
    seq = list(prompt)
    draft = DraftModel(resident_model(d), 1, 64)
    shapes = []                            # (depth, root children) per tree
    for step in range(3):                  # the second and third proposals catch up on 1 and 2 tokens
        tree = draft.propose([(0, seq, limit, 1.0)])[0]
        heap, popped = [], []
        with torch.no_grad():
            def push(path, base):
                logp = hf(torch.tensor([seq + path])).logits[0, -1].log_softmax(-1)
                for tok, lp in enumerate(logp.tolist()):
                    heapq.heappush(heap, (-(base + lp), path + [tok]))
            push([], 0.0)
            while len(popped) <= limit:      # one more: the margin to the first left out
                neg, path = heapq.heappop(heap)
                popped.append((-neg, path))
                push(path, -neg)
        assert popped[limit - 1][0] - popped[limit][0] > 1e-4      # no near-tie at the cut
        assert sorted(path_to(tree, n) for n in range(len(tree))) == sorted(p for _, p in popped[:limit])
        shapes.append((max(tree.depths()), sum(p == -1 for p in tree.parents)))
        seq += [tree.tokens[0]] * (step + 1)      # accept something: the next proposal catches up
    assert max(depth for depth, _ in shapes) >= 3 and max(width for _, width in shapes) >= 2, shapes
