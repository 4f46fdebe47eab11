"""tools/spec_bench (the verification cost curve) end to end on CPU with a tiny random checkpoint,
so that the GPU session's one command does not rot: every timed pass verified exactly its width
through the streaming engine, and the probe's run still decodes exactly what plain greedy
decoding does (transformers)."""
from __future__ import annotations

import json

import pytest
import torch

from ringllm.tools import spec_bench
from tests.conftest import hf_greedy_cached, make_hf_checkpoint, make_model_dir, write_tokenizer


def test_each_pass_verifies_its_width_and_the_tokens_stay_greedy(tmp_path):
    d = tmp_path / "m"
    hf = make_hf_checkpoint(d, num_hidden_layers=3)
    write_tokenizer(d)
    out = tmp_path / "out"
    widths, repeats = (1, 3, 16, 40), 2
    code = spec_bench.main(["--model", str(d), "--out", str(out), "--device", "cpu", "--widths",
                            ",".join(map(str, widths)), "--repeats", str(repeats), "--prompt-tokens", "8",
                            "--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1"])
    assert code == 0
    report = json.loads((out / "spec-bench.json").read_text())
    rows = report["verify_by_width"]
    assert {row["tokens"]: row["passes"] for row in rows} == {w: repeats + 1 for w in widths}
    assert all(row["first_seconds"] > 0 and row["min_seconds"] > 0 for row in rows)
    assert [c["passes"] for c in report["curve"]] == [repeats] * len(widths)
    one = next(c for c in report["curve"] if c["tokens"] == 1)["mean_s"]
    for c, row in zip(report["curve"], rows):
        # round 0 (each width's first pass) left out
        assert c["mean_s"] == pytest.approx((row["seconds"] - row["first_seconds"]) / repeats)
        assert c["min_s"] == row["min_seconds"] <= c["mean_s"]
        assert c["over_1_token"] == c["mean_s"] / one
    assert report["streamed_layers"] == 3 and report["accepted"] == 0
    # the prompt the tool drew, decoded by transformers: the filler never changes the output
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, hf.config.vocab_size, (8,), generator=gen).tolist()
    assert report["tokens"] == hf_greedy_cached(hf, prompt, len(widths) * (repeats + 1) + 1)
    assert "tokens verified" in (out / "spec-bench.txt").read_text()


def test_widths_without_the_one_token_pass_are_refused(tmp_path, capsys):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=2)
    try:
        spec_bench.main(["--model", str(d), "--out", str(tmp_path / "o"), "--widths", "16,64"])
    except SystemExit as e:
        assert e.code == 2
    assert "--widths must be counts >= 1 and include 1" in capsys.readouterr().err
