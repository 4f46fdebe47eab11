"""--preset auto: its choices follow the GPU budget and the DRAM limit, on real 70B layer sizes; what
it prints is what runs. The ring without a preset, and its cap at the streamed layers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from ringllm.autotune import Machine, auto_tune
from ringllm.checkpoint.layout import load_layout
from ringllm.config import GIB, PARAMETERS, build_config, resolve_config
from ringllm.tools.make_checkpoint import make_checkpoint
from tests.conftest import layer_tensor_bytes


@pytest.fixture(scope="module")
def l70(tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("l70") / "l70", "llama-3.1-70b", 80, progress=False, sparse=True)
    return load_layout(d)


def choose(layout, gpu_gib, dram_gib, loaders=4):
    choice = auto_tune(layout, Machine(int(gpu_gib * GIB), int(dram_gib * GIB), loaders), 1, 2048 + 256,
                       "bfloat16", embed_on_host=True)
    values = choice.values
    # every choice passes the engine's own validation
    resolve_config(streamed_layers=layout.config.num_layers - values["gpu_resident_layers"], **values)
    return values, choice.reasons


def test_gpu_budget_sets_the_class_and_the_resident_layers(l70):
    small, _ = choose(l70, 24, 64)
    mid, _ = choose(l70, 40, 64)
    big, reasons = choose(l70, 80, 128)
    assert (small["gpu_ahead_layers"], small["gpu_max_groups"]) == (2, 7)
    assert (mid["gpu_ahead_layers"], mid["gpu_max_groups"]) == (4, 11)
    assert (big["gpu_ahead_layers"], big["gpu_max_groups"]) == (6, 15)
    assert small["gpu_resident_layers"] < mid["gpu_resident_layers"] < big["gpu_resident_layers"] < 80
    assert reasons["gpu_ahead_layers"].startswith("80.00 GiB GPU budget (--gpu-mem), 80 GB class")


def test_dram_sets_the_ring(l70):
    tight, reasons = choose(l70, 24, 12)     # Machine.dram_available: what the ring may take
    roomy, _ = choose(l70, 24, 200)
    streamed = 80 - roomy["gpu_resident_layers"]
    slot = l70.max_group_bytes["attn"] + l70.max_group_bytes["ffn"]   # a slot is at least a layer
    assert tight["cpu_cap"] == 12 * GIB // slot == 7                      # the ring's DRAM, in slots
    assert "disk-fed" in reasons["cpu_cap"]
    # short of DRAM: all but a disk window of max(look-ahead 2, 2) slots pinned
    assert tight["cpu_pinned_layers"] == 7 - max(tight["gpu_ahead_layers"], 2) == 5
    assert roomy["cpu_cap"] == streamed == 71                 # every streamed layer: DRAM-fed
    assert roomy["cpu_pinned_layers"] == 0                    # nothing is evicted: nothing to pin
    assert tight["cpu_cap"] >= tight["gpu_ahead_layers"]
    # the window offset is not auto's choice: it follows the look-ahead that runs
    assert "cpu_ring_offset" not in tight and build_config(**tight).cpu_ring_offset == tight["gpu_ahead_layers"]


def test_small_gpu_lowers_the_look_ahead(l70):
    values, reasons = choose(l70, 8, 64)
    assert values["gpu_ahead_layers"] == 1
    assert "lowered from 2" in reasons["gpu_ahead_layers"]


# --- the CLI: what it prints against what really ran (--metrics-json "engine") --------------------
def generate(model_dir, *args, env=None, metrics=None):
    """`ringllm generate` on cpu; returns (process, metrics dict or None)."""
    cmd = [sys.executable, "-m", "ringllm", "generate", "--model", str(model_dir), "--device", "cpu", "--no-chat",
           "--prompt", "t5 t6", "--max-new-tokens", "6", "--loaders", "2", *args]
    if metrics is not None:
        cmd += ["--metrics-json", str(metrics)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    return r, (json.loads(metrics.read_text()) if metrics is not None and r.returncode == 0 else None)


def printed_values(stderr: str) -> dict:
    """NAME -> value of the lines --preset auto printed ('[ringllm]   NAME=VALUE...')."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^\[ringllm\]   (\w+)=(\d+)", stderr, re.M)}


def engine_value(engine: dict, name: str) -> int:
    return engine[PARAMETERS.get(name, name)]


@pytest.fixture(scope="module")
def tiny14(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("t14") / "t14", "tiny", 14, progress=False)


@pytest.fixture(scope="module")
def tiny14_tokens(tiny14):
    """What the in-process reference engine prints for generate()'s prompt."""
    r, _ = generate(tiny14, "--resident")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return r.stdout


def test_preset_auto_on_cpu_speaks_of_dram_and_streams_every_layer(tiny14, tiny14_tokens, tmp_path):
    r, m = generate(tiny14, "--preset", "auto", "--gpu-mem", "300MiB", metrics=tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    block = r.stderr[r.stderr.index("--preset auto for"):]
    assert "GPU budget" not in block and "on the GPU" not in block
    assert "compute device's memory is DRAM" in block
    assert printed_values(r.stderr)["GPU_RESIDENT_LAYERS"] == 0
    assert m["engine"]["gpu_resident_layers"] == 0 and m["gpu_resident_layers"] == 0
    assert r.stdout == tiny14_tokens


def test_preset_auto_prints_the_values_that_run_and_marks_the_users(tiny14, tmp_path):
    env = {**os.environ, "WSM_CPU_BACK_MARGIN": "1"}
    r, m = generate(tiny14, "--preset", "auto", "--set", "CPU_CAP_VALUE=5", "--set", "GPU_RESIDENT_LAYERS=1",
                    env=env, metrics=tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    shown = printed_values(r.stderr)
    assert {name: engine_value(m["engine"], name) for name in shown} == shown
    assert set(shown) >= {"GPU_AHEAD_LAYERS", "GPU_MAX_GROUPS", "GPU_RESIDENT_LAYERS", "CPU_CAP_VALUE",
                          "CPU_RING_OFFSET", "WSM_BALANCE_AHEAD", "loaders"}
    assert shown["CPU_CAP_VALUE"] == 5 and "ring: 5 slots" in r.stderr
    assert "CPU_CAP_VALUE=5 (yours, --set CPU_CAP_VALUE)" in r.stderr
    assert "GPU_RESIDENT_LAYERS=1 (yours, --set GPU_RESIDENT_LAYERS)" in r.stderr
    assert "layers 0..0 stay on cpu, loaded once (1 of 14)" in r.stderr and m["gpu_resident_layers"] == 1
    assert "(yours" not in r.stderr.split("GPU_AHEAD_LAYERS=", 1)[1].splitlines()[0]
    assert shown["CPU_RING_OFFSET"] == shown["GPU_AHEAD_LAYERS"]


def test_preset_auto_ring_offset_follows_the_look_ahead(tmp_path):
    """auto chose CPU_RING_OFFSET = min(look-ahead, cap - 1) (1 on 2 layers) and called it the end
    of the look-ahead; a look-ahead set by the user left auto's offset behind."""
    d = make_checkpoint(tmp_path / "t2", "tiny", 2, progress=False)
    r, m = generate(d, "--preset", "auto", "--set", "GPU_AHEAD_LAYERS=3", metrics=tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    shown = printed_values(r.stderr)
    assert m["engine"]["gpu_ahead_layers"] == shown["GPU_AHEAD_LAYERS"] == 3
    assert shown["CPU_RING_OFFSET"] == m["engine"]["cpu_ring_offset"] == 3
    assert "CPU_RING_OFFSET=3: = the look-ahead (3 layers)" in r.stderr


def test_default_ring_holds_every_streamed_layer(tiny14, tiny14_tokens, tmp_path):
    """No preset: the ring gets a slot per streamed layer (DRAM allows it), each layer is read
    from disk once. The guide's presets and the user's own values still win."""
    layer_bytes = layer_tensor_bytes(tiny14)
    r, m = generate(tiny14, metrics=tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if "the ring holds every streamed layer" in l]
    assert len(lines) == 1 and lines[0].startswith("[ringllm] CPU_CAP_VALUE=14: "), r.stderr
    assert m["engine"]["cpu_cap"] == 14 and (m["engine"]["cpu_hwm"], m["engine"]["cpu_lwm"]) == (17, 11)
    assert m["ring_loads"] == 14 and m["ring_evictions"] == 0
    # each layer once: its tensors plus the O_DIRECT alignment at the edges of its read
    assert layer_bytes <= m["disk_bytes"] < layer_bytes + 14 * 2 * 4096
    assert r.stdout == tiny14_tokens

    r, m = generate(tiny14, "--preset", "conservative", metrics=tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert m["engine"]["cpu_cap"] == 10 and "the ring holds every" not in r.stderr
    assert m["ring_loads"] > 14                     # a 10-slot ring over 14 layers reads again
    r, m = generate(tiny14, env={**os.environ, "CPU_CAP_VALUE": "6"}, metrics=tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    assert m["engine"]["cpu_cap"] == 6 and "the ring holds every" not in r.stderr


def test_ring_is_capped_at_the_streamed_layers(tiny14, tiny14_tokens, tmp_path):
    """CPU_CAP_VALUE=40 on 14 layers, 4 of them GPU-resident: 10 slots, said in one line."""
    r, m = generate(tiny14, "--set", "CPU_CAP_VALUE=40", "--set", "GPU_RESIDENT_LAYERS=4", metrics=tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("[ringllm] CPU_CAP_VALUE=40")]
    assert len(lines) == 1 and "more than the 10 layers that stream" in lines[0], r.stderr
    assert m["engine"]["cpu_cap"] == 10 and "ring: 10 slots" in r.stderr
    assert (m["engine"]["cpu_hwm"], m["engine"]["cpu_lwm"]) == (13, 7)      # the water marks follow
    assert m["ring_loads"] == 10 and m["gpu_resident_layers"] == 4
    assert r.stdout == tiny14_tokens


def test_ring_larger_than_dram_is_refused(tmp_path):
    """The cap at the streamed layers leaves the DRAM check in place: a 70B-shaped checkpoint
    (sparse files: real sizes, no disk) with more layers than DRAM holds."""
    import psutil

    slot = 1_712_324_608                 # one llama-3.1-70b layer in bf16 (bytes)
    layers = int(psutil.virtual_memory().available // slot) + 2
    d = make_checkpoint(tmp_path / "big", "llama-3.1-70b", layers, progress=False, sparse=True)
    r, _ = generate(d, "--set", f"CPU_CAP_VALUE={layers}", "--set", "GPU_AHEAD_LAYERS=1")
    errors = [l for l in r.stderr.splitlines() if l.startswith("ringllm: error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert f"(CPU_CAP_VALUE={layers} slots)" in errors[0] and "of DRAM is available (keeping 4 GiB free)" in errors[0]


def test_with_ranks_the_gpu_plans_its_share_and_the_ring_whole_layers(l70):
    """--preset auto --tensor-parallel 2: each 24 GiB GPU holds half of every resident layer (and
    half-size group buffers), so at least twice the layers stay on the GPUs; the DRAM ring still
    holds whole layers, one slot per streamed layer."""
    from ringllm.checkpoint.sharding import shard_layout

    machine = Machine(24 * GIB, 512 * GIB, 4)
    one = auto_tune(l70, machine, 1, 2048 + 256, "bfloat16", embed_on_host=True)
    two = auto_tune(l70, machine, 1, 2048 + 256, "bfloat16", embed_on_host=True, gpu_layout=shard_layout(l70, 0, 2))
    r1, r2 = one.values["gpu_resident_layers"], two.values["gpu_resident_layers"]
    assert 0 < r1 and r2 >= 2 * r1
    assert two.values["cpu_cap"] == 80 - r2 and two.layer_bytes == one.layer_bytes == layer_tensor_bytes(
        l70.model_dir, first_layer=79)
    resolve_config(streamed_layers=80 - r2, **two.values)
