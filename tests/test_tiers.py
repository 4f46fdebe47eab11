"""Tiers when DRAM is short (CPU_PINNED_LAYERS): GPU-resident layers | layers pinned in the ring
for the whole run | the rest read from disk through a short sliding window. The real CLI on cpu
against the resident engine; the choice of the split; the checks on the parameter; the DRAM the
ring may take (--dram-limit)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from ringllm.autotune import AutoChoice, Machine, auto_tune, disk_window, final_lines, ring_fit, tier_split
from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import load_layout
from ringllm.config import DRAM_HEADROOM, GIB, resolve_config
from tests.conftest import layer_tensor_bytes, make_model_dir

LAYERS = 40
PROMPT = "w5 w9 w17 w33"


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """40 float32 layers of about 0.7 MiB each: enough layers that half of them in DRAM leaves
    room for a disk window, large enough that O_DIRECT alignment (4 KiB at each end of a read)
    stays about 1% of a layer. Weights 10x the usual scale, so that greedy tokens vary (a wrong
    layer shows) instead of repeating one token."""
    d = tmp_path_factory.mktemp("deep") / "deep"
    return make_model_dir(d, num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=344,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.2)


def generate(model_dir, *args, metrics=None, tokens=8):
    cmd = [sys.executable, "-m", "ringllm", "generate", "--model", str(model_dir), "--device", "cpu", "--no-chat",
           "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--loaders", "2", *args]
    if metrics is not None:
        cmd += ["--metrics-json", str(metrics)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    return r, (json.loads(metrics.read_text()) if metrics is not None and r.returncode == 0 else None)


@pytest.fixture(scope="module")
def resident_tokens(deep_model):
    r, _ = generate(deep_model, "--resident")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert len(set(r.stdout.split())) > 4, r.stdout       # varied tokens: a wrong layer would show
    return r.stdout


def test_auto_with_half_the_layers_in_dram_reads_fewer_bytes_per_token(deep_model, resident_tokens, tmp_path):
    """--preset auto with --dram-limit = half the layer bytes: auto pins all but a disk window,
    decode reads <= 0.6 of the layer bytes per token, the tokens are the resident engine's."""
    layer_bytes = layer_tensor_bytes(deep_model)
    limit = layer_bytes // 2
    r, m = generate(deep_model, "--preset", "auto", "--dram-limit", str(limit), metrics=tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    assert r.stdout == resident_tokens
    engine = m["engine"]
    pinned = engine["cpu_pinned_layers"]
    assert 0 < pinned < engine["cpu_cap"] < LAYERS, engine
    per_token = m["disk_bytes_per_token"]
    assert per_token <= 0.6 * layer_bytes, (
        f"decode read {per_token / layer_bytes:.3f} of the layer bytes per token "
        f"(CPU_CAP_VALUE={engine['cpu_cap']}, CPU_PINNED_LAYERS={pinned}, {m['ring_loads']} loads)")
    # the same bound from the totals alone: every byte beyond one read of each layer counts as decode's
    from_totals = (m["disk_bytes"] - layer_bytes) / (m["new_tokens"] - 1)
    assert from_totals <= 0.6 * layer_bytes, f"{from_totals / layer_bytes:.3f} of the layer bytes per token"
    assert f"CPU_PINNED_LAYERS={pinned}: layers 0..{pinned - 1} stay in the ring" in r.stderr
