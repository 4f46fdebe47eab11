"""tools/tp_bench on cpu: 1 and 2 ranks of a tiny model, the same text, and a copy ceiling whose
bytes are every streamed tensor's once plus the replicated norms once more per extra rank (counted
from the checkpoint's own files)."""
from __future__ import annotations

import json

from safetensors import safe_open

from tests.conftest import make_hf_checkpoint, write_tokenizer
from tests.test_tensor_parallel_engine import THREE_KV


def layer_bytes(model_dir, norms_only=False) -> int:
    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k.startswith("model.layers.") and (not norms_only or k.endswith("layernorm.weight")):
                    t = f.get_tensor(k)
                    total += t.numel() * t.element_size()
    return total


def test_tp_bench_on_cpu(tmp_path):
    from ringllm.tools.tp_bench import main

    d = tmp_path / "m"
    make_hf_checkpoint(d, **THREE_KV)
    write_tokenizer(d)
    out = tmp_path / "out"
    assert main(["--model", str(d), "--out", str(out), "--ranks", "1,2", "--device", "cpu", "--dtype", "float32",
                 "--new-tokens", "4", "--loaders", "2"]) == 0
    r = json.loads((out / "tp-bench.json").read_text())
    one, two = r["runs"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and two["text_same_as_first"] and one["text"].strip()
    assert one["resident_layers"] == two["resident_layers"] == 0          # cpu: every layer streams
    assert one["ceiling"]["bytes"] == layer_bytes(d)
    assert two["ceiling"]["bytes"] == layer_bytes(d) + layer_bytes(d, norms_only=True)
    assert len(two["ceiling"]["bytes_per_rank"]) == 2 and min(two["ceiling"]["bytes_per_rank"]) > 0
    for row in (one, two):
        assert row["seconds_per_token"] == row["metrics"]["seconds_per_token"] > 0
        assert row["floor_over_achieved"] == row["ceiling"]["seconds"] / row["seconds_per_token"]
    assert (one["metrics"]["tensor_parallel"], two["metrics"]["tensor_parallel"]) == (1, 2)
    assert two["speedup_over_1"] == one["seconds_per_token"] / two["seconds_per_token"]
    assert "tensor parallel on cpu" in (out / "tp-bench.txt").read_text()
