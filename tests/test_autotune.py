"""--preset auto: its choices follow the GPU budget and the DRAM limit, on real 70B layer sizes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ringllm.checkpoint.layout import load_layout
from ringllm.autotune import GIB, Machine, auto_tune
from ringllm.config import build_config
from ringllm.tools.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def l70(tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("l70") / "l70", "llama-3.1-70b", 80, progress=False, sparse=True)
    return load_layout(d)


def choose(layout, gpu_gib, dram_gib, loaders=4):
    values, reasons = auto_tune(layout, Machine(int(gpu_gib * GIB), int(dram_gib * GIB), loaders), 1, 2048 + 256,
                                "bfloat16", embed_on_host=True)
    build_config(**values)              # every choice passes the engine's own validation
    return values, reasons


def test_gpu_budget_sets_the_class_and_the_resident_layers(l70):
    small, _ = choose(l70, 24, 64)
    mid, _ = choose(l70, 40, 64)
    big, reasons = choose(l70, 80, 128)
    assert (small["gpu_ahead_layers"], small["gpu_max_groups"]) == (2, 7)
    assert (mid["gpu_ahead_layers"], mid["gpu_max_groups"]) == (4, 11)
    assert (big["gpu_ahead_layers"], big["gpu_max_groups"]) == (6, 15)
    assert small["gpu_resident_layers"] < mid["gpu_resident_layers"] < big["gpu_resident_layers"] < 80
    assert any(r.startswith("GPU_AHEAD_LAYERS=6: 80.00 GiB GPU budget, 80 GB class") for r in reasons)


def test_dram_sets_the_ring(l70):
    tight, reasons = choose(l70, 24, 16)
    roomy, _ = choose(l70, 24, 200)
    streamed = 80 - roomy["gpu_resident_layers"]
    slot = l70.max_group_bytes["attn"] + l70.max_group_bytes["ffn"] + 8192
    assert tight["cpu_cap"] == (16 - 4) * GIB // slot == 7     # DRAM minus 4 GiB headroom, in slots
    assert any("disk-fed" in r for r in reasons)
    assert roomy["cpu_cap"] == streamed == 71                 # every streamed layer: DRAM-fed
    assert tight["cpu_cap"] >= tight["gpu_ahead_layers"] and tight["cpu_ring_offset"] == 2


def test_small_gpu_lowers_the_look_ahead(l70):
    values, reasons = choose(l70, 8, 64)
    assert values["gpu_ahead_layers"] == 1
    assert any("lowered from 2" in r for r in reasons)


def test_preset_auto_on_cpu_prints_choices_and_runs(tmp_path):
    d = make_checkpoint(tmp_path / "t", "tiny", 4, progress=False)
    common = [sys.executable, "-m", "ringllm", "generate", "--model", str(d), "--device", "cpu", "--no-chat",
              "--prompt", "t5 t6", "--max-new-tokens", "6", "--preset", "auto"]
    a = subprocess.run(common + ["--gpu-mem", "300MiB"], capture_output=True, text=True, timeout=120)
    b = subprocess.run(common + ["--gpu-mem", "300MiB", "--set", "CPU_CAP_VALUE=3", "--set", "GPU_RESIDENT_LAYERS=1"],
                       capture_output=True, text=True, timeout=120)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "--preset auto for" in a.stderr and "GPU_RESIDENT_LAYERS=" in a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "GPU_RESIDENT_LAYERS=4:" in a.stderr and "layers 0..3 stay on the GPU" in a.stderr
    # explicit settings win over the auto choices
    assert "ring: 3 slots" in b.stderr and "layers 0..0 stay on the GPU (1 of 4)" in b.stderr
