"""One request engine (issue #24): speculation, batching and serving combine. Several prompts with a
draft in one engine (each its own tree, all verified in the same pass) give each prompt exactly
transformers' greedy text, on the command line and through `ringllm serve --draft` with the
official openai client, and the server reports tokens per pass. float32 on CPU, transformers as the
reference. The engine-level checks (mixed requests, rows reused, seeded batches, the sampled
distribution beside other requests) are tests/test_engine_drafts.py and test_spec_tree_sampling.py."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading

import pytest
from tests.conftest import hf_greedy_cached, make_hf_checkpoint, write_tokenizer

EOS = 2
NEW = 24
# four prompts of different lengths; the first two repeat themselves, so prompt lookup drafts at once
PROMPTS = [[3, 9, 14, 3, 9, 14, 3, 9], [5, 17, 40, 8, 5, 17, 40], [7, 99, 23, 61], [11, 12, 13, 50, 60, 70, 80, 90, 33]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny checkpoint (seed 1: its greedy text soon loops, which prompt lookup then copies) with
    a tokenizer whose words are w<id>, and transformers' greedy continuation of each prompt, cut
    after EOS as generation is."""
    d = tmp_path_factory.mktemp("one-engine") / "target"
    hf = make_hf_checkpoint(d, seed=1)
    write_tokenizer(d)
    refs = []
    for prompt in PROMPTS:
        ref = hf_greedy_cached(hf, prompt, NEW)
        refs.append(ref[:ref.index(EOS) + 1] if EOS in ref else ref)
    return d, hf, refs


def words(ids) -> str:
    return " ".join(f"w{t}" for t in ids)


SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": EOS}       # write_tokenizer's; the other words are w<id>


def ids_of(text: str) -> list[int]:
    return [SPECIAL[w] if w in SPECIAL else int(w[1:]) for w in text.split()]


def ringllm(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_generate_four_prompts_with_a_draft_give_transformers_text(target, tmp_path, draft):
    """`ringllm generate` (the streaming engine) with 4 prompts and --draft ngram / --draft-model:
    one engine, one request per prompt, every pass verifying each request's tree."""
    d, _, refs = target
    flag = ["--draft", "ngram"] if draft == "ngram" else ["--draft-model", str(d)]   # the target drafts for itself
    metrics = tmp_path / "m.json"
    prompts = [arg for p in PROMPTS for arg in ("--prompt", words(p))]
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--dtype", "float32", "--no-chat", *prompts,
                "--max-new-tokens", str(NEW), "--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1", *flag,
                "--spec-tokens", "8", "--metrics-json", str(metrics))
    assert r.returncode == 0, r.stderr[-3000:]
    texts = re.split(r"^--- \[\d\] ---$", r.stdout, flags=re.M)[1:]
    assert len(texts) == 4, r.stdout
    for i, (text, ref) in enumerate(zip(texts, refs)):
        assert ids_of(text) == ref, f"prompt {i}"
    spec = json.loads(metrics.read_text())["speculation"]
    assert spec["accepted"] > 0 and spec["tokens_per_pass"] > 1, spec


# --- ringllm serve --draft -------------------------------------------------------------------------

@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_serve_with_a_draft_answers_8_concurrent_clients_as_transformers(target, draft):
    """`ringllm serve --draft ngram` / `--draft-model DIR` (the streaming engine): 8 concurrent
    greedy completions through the official openai client each get transformers' text; a copying
    request's usage extension and /metrics report more than one token per pass."""
    from tests.test_serve_streaming import ServerProcess

    d, hf, refs = target
    prompts = PROMPTS * 2
    references = refs * 2
    flag = ["--draft", "ngram"] if draft == "ngram" else ["--draft-model", str(d)]
    server = ServerProcess(d, *flag, "--spec-tokens", "8", "--max-batch", "8", "--max-context", "128")
    try:
        client, results = server.client(), [None] * len(prompts)

        def ask(i):
            results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=NEW, temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, (answer, ref) in enumerate(zip(results, references)):
            assert answer is not None, f"request {i} got no answer"
            assert ids_of(answer.choices[0].text) == [t for t in ref if t != EOS], f"request {i}"   # EOS not in the text
        copying = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
        usage = copying.usage.model_extra["ringllm"]
        assert usage["tokens_per_pass"] > 1 and usage["accepted"] > 0, usage
        details = copying.usage.completion_tokens_details
        assert details.accepted_prediction_tokens == usage["accepted"]
        assert server.metric("ringllm_tokens_per_pass_sum") > server.metric("ringllm_tokens_per_pass_count") > 0
        assert server.metric("ringllm_draft_accepted_tokens_total") > 0
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait() == 0, server.err[-3000:]
