"""The GPU memory plan against what the GPU process really allocates, for a bf16 checkpoint
computed in float32: group buffers hold checkpoint bytes, GPU-resident layers are converted to the
compute dtype, and compute on a streamed group converts one weight at a time. Element counts come
from the safetensors files themselves."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringllm.shm.slot_plan import plan_model

from ringllm.checkpoint.layout import load_layout
from ringllm.checkpoint.text import TextCodec
from ringllm.config import build_config
from ringllm.workers.gpu_process import GpuArgs, resident_layer_count
from ringllm.workers.memory_plan import layers_that_fit, plan_gpu_memory
from ringllm.workers.model import _w
from ringllm.workers.resident import load_groups
from ringllm.workers.streaming import StreamingSource
from ringllm.workers.weights import group_weights
from tests.conftest import make_model_dir

CPU = torch.device("cpu")
LAYERS = 4


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    d = make_model_dir(tmp_path_factory.mktemp("bf16") / "m", dtype=torch.bfloat16, num_hidden_layers=LAYERS)
    assert load_layout(d).dtype == "BF16"
    return d


def layer_elements(model_dir: Path) -> dict[int, dict[str, int]]:
    """layer -> tensor name -> element count, read from the safetensors headers."""
    from safetensors import safe_open

    out: dict[int, dict[str, int]] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name.startswith("model.layers."):
                    out.setdefault(int(name.split(".")[2]), {})[name] = math.prod(f.get_slice(name).get_shape())
    return out


def test_plan_counts_what_the_gpu_process_allocates(bf16):
    layout, engine = load_layout(bf16), build_config()
    plan = plan_gpu_memory(layout, engine, 1, 32, "float32", embed_on_host=False)
    elements = layer_elements(bf16)
    # GPU-resident layers: converted to float32 once, at load
    groups = load_groups(layout, range(LAYERS), torch.float32, CPU)
    for layer, kinds in groups.items():
        allocated = sum(t.nbytes for weights in kinds.values() for t in weights)
        assert allocated == 4 * sum(elements[layer].values()) == plan.layer_bytes
    # group buffers: raw checkpoint bytes (bf16 here), whatever the compute dtype
    source = StreamingSource(layout, plan_model(layout), engine, None, None, CPU, None, None)
    buffers = [b for bufs in source.buffers.values() for b in bufs]
    assert sum(b.nbytes for b in buffers) == plan.group_buffers
    assert plan.group_buffers == plan_gpu_memory(layout, engine, 1, 32, "bfloat16", False).group_buffers
    n_attn, n_ffn = engine.group_budget
    attn = max(sum(v for k, v in e.items() if "self_attn" in k or "input_layernorm" in k) for e in elements.values())
    ffn = max(sum(v for k, v in e.items() if "mlp" in k or "post_attention" in k) for e in elements.values())
    assert 2 * (n_attn * attn + n_ffn * ffn) <= plan.group_buffers < 2 * (n_attn * attn + n_ffn * ffn) + 256 * 9 * (n_attn + n_ffn)
    # compute on a streamed group: one weight at a time converted to float32 (model._w)
    converted = max(_w(w, torch.float32).nbytes for kind in ("attn", "ffn")
                    for w in group_weights(source.buffers[kind][0], layout.group(0, kind)))
    assert converted == 4 * max(v for e in elements.values() for v in e.values()) == plan.conversion
    assert plan_gpu_memory(layout, engine, 1, 32, "bfloat16", False).conversion == 0


def test_resident_layers_that_fit_are_counted_in_the_compute_dtype(bf16):
    layout = load_layout(bf16)
    float32_layer = 4 * sum(layer_elements(bf16)[0].values())
    prompts, new = ((5, 6, 7),), 4
    engine = build_config()
    plan = plan_gpu_memory(layout, engine, 1, 3 + new, "float32", embed_on_host=True)
    budget = plan.total + 3 * float32_layer + float32_layer // 2      # room for 3 float32 layers, not 4
    assert layers_that_fit(layout, plan, budget) == 3
    # what the GPU process keeps under --gpu-mem with GPU_RESIDENT_LAYERS=-1 (auto)
    args = GpuArgs(0, "", "", "", "", layout, (), build_config(gpu_mem=budget), "cuda", "float32", prompts, new,
                   None, ())
    assert resident_layer_count(args, "cuda", free_bytes=10 * budget) == 3


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ringllm", "generate", *args], capture_output=True, text=True,
                          timeout=120)


def test_gpu_mem_below_the_float32_working_set_fails_the_pre_check(bf16):
    """GPU_RESIDENT_LAYERS=2 of a bf16 checkpoint computed in float32: a --gpu-mem that holds
    them in checkpoint bytes is refused before anything starts; the float32 working set runs."""
    layout = load_layout(bf16)
    new = 4
    max_seq = len(TextCodec(bf16, layout.config).encode("w5 w6", chat=False)) + new
    plan = plan_gpu_memory(layout, build_config(), 1, max_seq, "float32", embed_on_host=False)
    rest = plan.resident + plan.group_buffers + plan.kv_cache + plan.workspace   # not about the conversion
    elements = layer_elements(bf16)
    layer, biggest = sum(elements[0].values()), max(elements[0].values())
    args = ["--model", str(bf16), "--device", "cpu", "--no-chat", "--prompt", "w5 w6", "--max-new-tokens", str(new),
            "--dtype", "float32", "--set", "GPU_RESIDENT_LAYERS=2"]
    float32_set = rest + 2 * 4 * layer + 4 * biggest
    for short_by, cap in (("checkpoint bytes", rest + 2 * 2 * layer + 2 * biggest), ("one byte", float32_set - 1)):
        r = cli(*args, "--gpu-mem", str(cap))
        errors = [l for l in r.stderr.splitlines() if l.startswith("ringllm: error:")]
        assert r.returncode == 1 and len(errors) == 1, f"--gpu-mem short by {short_by}: {r.stderr}"
        assert "is too small for GPU_MAX_GROUPS" in errors[0] and "GPU_RESIDENT_LAYERS=2 x" in errors[0]
    r = cli(*args, "--gpu-mem", str(float32_set))
    assert r.returncode == 0, r.stderr
    reference = cli(*args[:-2], "--resident")
    assert r.stdout == reference.stdout and r.stdout.strip()
