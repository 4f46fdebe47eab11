"""--draft DIR (a draft model's greedy chain): token identity with transformers' greedy decoding
on a tiny random pair and on SmolLM2-135M drafted by its own FP8 copy, the draft's KV cache
keeping only the accepted path, the vocabulary refusal."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.workers.generation import Sampler, generate
from ringllm.workers.speculation import DraftParams, SpecStats, SpeculativeSampling
from tests.conftest import hf_greedy_cached, make_hf_checkpoint, make_model_dir, write_tokenizer
from tests.test_speculation import resident_model

CPU = torch.device("cpu")


def with_draft(d, k=4) -> SpeculativeSampling:
    return SpeculativeSampling(draft=DraftParams(str(d), spec_tokens=k))


def ringllm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True, timeout=timeout)


def test_random_draft_model_keeps_transformers_greedy_output(tiny_checkpoint, tmp_path):
    """A draft with other random weights: few drafts accepted, yet every pass must leave the
    output exactly greedy's (and the draft's cache consistent after rejections)."""
    d, hf = tiny_checkpoint
    draft_dir = tmp_path / "draft"
    make_hf_checkpoint(draft_dir, seed=1, num_hidden_layers=2)
    write_tokenizer(draft_dir)
    prompt = [3, 9, 14, 27, 5, 88, 41]
    stats = SpecStats()
    got = generate(resident_model(d), [prompt], 40, Sampler(with_draft(draft_dir), CPU), eos_ids=[],
                   spec_stats=stats)[0]
    assert got == hf_greedy_cached(hf, prompt, 40)
    assert stats.tokens == 39 and stats.drafted > 0 and stats.draft == str(draft_dir)
    assert stats.draft_seconds > 0


def test_identical_draft_model_gives_long_accepts(tmp_path):
    """The target drafting for itself, on a peaked model (large random weights: its greedy token is
    likely), so the best-first tree is mostly the greedy chain: most drafts must be accepted. This
    fails if the draft's catch-up, its tree mask or its cache positions are off (its tree would
    not be the target's likeliest continuations)."""
    d = tmp_path / "peaked"
    hf = make_hf_checkpoint(d, initializer_range=1.0)
    write_tokenizer(d)
    prompt = [3, 9, 14, 27, 5, 88, 41]
    stats = SpecStats()
    got = generate(resident_model(d), [prompt], 31, Sampler(with_draft(d, k=8), CPU), eos_ids=[],
                   spec_stats=stats)[0]
    assert got == hf_greedy_cached(hf, prompt, 31)
    assert stats.accepted >= 0.75 * stats.drafted and stats.passes <= 5, stats.as_dict()


def test_refuses_a_draft_with_another_vocabulary(tmp_path):
    target, draft = tmp_path / "m", tmp_path / "d"
    make_model_dir(target, num_hidden_layers=2)
    make_model_dir(draft, num_hidden_layers=2, vocab_size=96)
    r = ringllm("generate", "--model", str(target), "--device", "cpu", "--prompt", "w3", "--draft", str(draft))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"ringllm: error: --draft {draft}: config.json vocab_size is 96, the model's "
                                f"({target}) is 128: a draft model must share the vocabulary"), r.stderr
    # same sizes, one token renamed in the tokenizer
    make_model_dir(draft, num_hidden_layers=2)
    vocab = json.loads((draft / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["w99x"] = vocab["model"]["vocab"].pop("w99")
    (draft / "tokenizer.json").write_text(json.dumps(vocab))
    r = ringllm("generate", "--model", str(target), "--device", "cpu", "--prompt", "w3", "--draft", str(draft))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "its tokenizer's vocabulary differs" in lines[0], r.stderr


def test_refuses_a_draft_with_a_shorter_context(tiny_checkpoint, tmp_path):
    d, _ = tiny_checkpoint
    draft_dir = tmp_path / "short"
    make_model_dir(draft_dir, max_position_embeddings=32)
    with pytest.raises(RingllmError, match=r"exceeds the draft's 32 \(max_position_embeddings\)"):
        generate(resident_model(d), [[3, 9, 14]], 40, Sampler(with_draft(draft_dir), CPU), eos_ids=[])


def test_cli_draft_model_streaming_and_resident(tmp_path):
    d, draft = tmp_path / "m", tmp_path / "d"
    make_model_dir(d, num_hidden_layers=2)
    make_model_dir(draft, num_hidden_layers=1, seed=3)
    common = ("generate", "--model", str(d), "--device", "cpu", "--no-chat", "--prompt", "w3 w9 w14 w3 w9",
              "--max-new-tokens", "12")
    plain = ringllm(*common, "--resident")
    assert plain.returncode == 0, plain.stderr
    for engine in ((), ("--resident",)):
        metrics = tmp_path / f"m{len(engine)}.json"
        r = ringllm(*common, "--draft", str(draft), "--metrics-json", str(metrics), *engine)
        assert r.returncode == 0, r.stderr
        assert r.stdout == plain.stdout
        spec = json.loads(metrics.read_text())["speculation"]
        assert spec["draft"] == str(draft) and spec["draft_seconds"] > 0 and spec["drafted"] > 0, spec


# --- SmolLM2-135M drafted by its FP8 copy ----------------------------------------------------------

def test_smollm2_fp8_draft_matches_transformers(demo_model_dir, smollm2_fp8_dir):
    from transformers import AutoModelForCausalLM

    from ringllm.checkpoint.text import TextCodec

    model = resident_model(demo_model_dir)
    codec = TextCodec(demo_model_dir, model.cfg)
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    prompt = codec.encode("Write a short poem about the sea.", chat=True)
    stats = SpecStats()
    got = generate(model, [prompt], 40, Sampler(with_draft(smollm2_fp8_dir, k=4), CPU), eos_ids=[],
                   spec_stats=stats)[0]
    assert got == hf_greedy_cached(hf, prompt, 40)
    print(f"SmolLM2-135M drafted by its FP8 copy (K=4): {stats.as_dict()}")
    assert stats.tokens / stats.passes > 1.5, stats.as_dict()
