"""tools/make_draft: a layer-truncated draft's logits against transformers' own model built from
the source with its decoder layers cut to N (the independent reference), and its refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_model_dir
from ringllm.tools import make_draft as md


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def truncated_reference(src, layers: int):
    """transformers' model of `src` with only its first `layers` decoder layers (final norm and
    lm_head kept): what a draft exiting after layer N computes."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    hf.model.layers = hf.model.layers[:layers]
    hf.config.num_hidden_layers = layers
    return hf


def ringllm_logits(model_dir, tokens):
    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.model import Llama
    from ringllm.workers.resident import ResidentSource, load_resident_weights
    from tests.test_model_vs_transformers import full_logits

    cpu, dtype = torch.device("cpu"), torch.float32
    layout = load_layout(model_dir)
    model = Llama(layout.config, load_resident_weights(layout, dtype, cpu), ResidentSource(layout, dtype, cpu),
                  dtype, cpu)
    return full_logits(model, tokens)


@pytest.mark.parametrize("layers,tied,shard", [(1, False, None), (3, True, None), (2, False, "40KB")])
def test_draft_logits_equal_truncated_transformers(tmp_path, monkeypatch, layers, tied, shard):
    src = make_model_dir(tmp_path / "src", num_hidden_layers=5, tie_word_embeddings=tied, max_shard_size=shard)
    monkeypatch.setattr(md, "COPY_BLOCK", 4096)     # several blocks per tensor: the block loop is exercised
    dst = md.make_draft(src, tmp_path / "draft", layers)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(layers))
    with torch.no_grad():
        ref = truncated_reference(src, layers)(tokens).logits
        full = truncated_reference(src, 5)(tokens).logits
        got = ringllm_logits(dst, tokens)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5, f"draft logits differ from the truncated transformers model: {rel_err(got, ref)}"
    assert rel_err(got, full) > 1e-3, "the draft computes what the full model does: no layer was cut"
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_hidden_layers"] == layers
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_draft_keeps_the_source_sharding(tmp_path):
    src = make_model_dir(tmp_path / "src", num_hidden_layers=5, max_shard_size="40KB")
    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    dst = md.make_draft(src, tmp_path / "draft", 2)
    dst_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {n: f for n, f in src_map.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2}
    assert dst_map == expected, "a kept tensor moved to another shard, or a dropped one is still listed"
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(set(expected.values()))
    assert len(set(expected.values())) < len(set(src_map.values())), "the test needs a shard of dropped layers"


def run_tool(*argv):
    return subprocess.run([sys.executable, "-m", "ringllm.tools.make_draft", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["zero_layers", "all_layers", "no_model_dir", "dst_not_empty"])
def test_bad_input_one_line_exit_1(tmp_path, case):
    src = make_model_dir(tmp_path / "src", num_hidden_layers=3)
    dst, layers = tmp_path / "draft", 1
    if case == "zero_layers":
        layers, needle = 0, "--layers 0"
    elif case == "all_layers":
        layers, needle = 3, "--layers 3"
    elif case == "no_model_dir":
        src, needle = tmp_path / "missing", "missing"
    else:
        dst.mkdir()
        (dst / "keep.txt").write_text("x")
        needle = "not empty"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_tool(src, dst, "--layers", layers)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringllm: error: ") and needle in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was left behind"
    if case == "dst_not_empty":
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]
