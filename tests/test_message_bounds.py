"""No message grows with the length of a run ([P12]): speculative decoding on the streaming engine
(child processes, the default) for 2,000 tokens with each draft kind ends with its summary and
metrics, and every message type of shm/channel.py, built at the largest size a run can give it,
encodes within the cap."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import hf_greedy_cached, make_hf_checkpoint, make_model_dir, write_tokenizer

LONG = 2000
PROMPT = [9, 10, 11, 9, 10, 11, 9, 10]
SPECIAL = {0: "<unk>", 1: "<s>"}


def ringllm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A tiny target with room for 2,000 new tokens, a 1-layer draft of its vocabulary, and
    transformers' greedy tokens for the prompt. Seed 1: the target's greedy text never reaches its
    EOS (token 2) within 2,000 tokens (checked below), so every run goes the whole length."""
    root = tmp_path_factory.mktemp("long")
    target, draft = root / "target", root / "draft"
    torch.set_num_threads(1)
    hf = make_hf_checkpoint(target, seed=1, max_position_embeddings=LONG + 64)
    write_tokenizer(target)
    make_model_dir(draft, seed=3, num_hidden_layers=1, max_position_embeddings=LONG + 64)
    reference = hf_greedy_cached(hf, PROMPT, LONG)
    assert 2 not in reference
    return target, draft, reference


@pytest.mark.parametrize("draft_flags", [("--draft", "ngram", "--spec-tokens", "8"),
                                         ("--draft-model", "DRAFT", "--spec-tokens", "3")],
                         ids=["ngram", "draft-model"])
def test_2000_tokens_of_speculative_decoding_on_the_streaming_engine(long_run, tmp_path, draft_flags):
    target, draft, reference = long_run
    flags = [str(draft) if f == "DRAFT" else f for f in draft_flags]
    metrics = tmp_path / "metrics.json"
    r = ringllm("generate", "--model", str(target), "--device", "cpu", "--no-chat", "--dtype", "float32",
                "--prompt", " ".join(f"w{t}" for t in PROMPT), "--max-new-tokens", str(LONG),
                "--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1", *flags, "--metrics-json", str(metrics))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [SPECIAL.get(t, f"w{t}") for t in reference]     # write_tokenizer's words
    spec = json.loads(metrics.read_text())["speculation"]
    assert spec["tokens"] == LONG - 1 and spec["passes"] > 30       # the bug showed after ~30 passes
    assert "tokens per pass" in r.stderr
