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


def test_auto_pins_for_your_ring_and_the_default_ring_pins_too(deep_model, resident_tokens, tmp_path):
    """Under --preset auto the split follows the ring that runs, yours included (auto's own split
    for 19 slots would not fit in 12). Without a preset, DRAM short: the ring takes what the
    limit allows and pins all but the disk window, said in one line. A guide preset keeps P = 0."""
    limit = str(layer_tensor_bytes(deep_model) // 2)
    r, m = generate(deep_model, "--preset", "auto", "--dram-limit", limit, "--set", "CPU_CAP_VALUE=12",
                    metrics=tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    lookahead = m["engine"]["gpu_ahead_layers"]
    assert m["engine"]["cpu_pinned_layers"] == 12 - max(lookahead, 2), m["engine"]
    assert r.stdout == resident_tokens

    r, m = generate(deep_model, "--dram-limit", limit, metrics=tmp_path / "d.json")
    assert r.returncode == 0, r.stderr
    cap, pinned = m["engine"]["cpu_cap"], m["engine"]["cpu_pinned_layers"]
    assert 16 <= cap < LAYERS and pinned == cap - max(m["engine"]["gpu_ahead_layers"], 2), m["engine"]
    lines = [l for l in r.stderr.splitlines() if l.startswith(f"[ringllm] CPU_PINNED_LAYERS={pinned}: ")]
    assert len(lines) == 1 and f"layers 0..{pinned - 1} stay in the ring" in lines[0], r.stderr
    assert r.stdout == resident_tokens

    r, m = generate(deep_model, "--preset", "conservative", "--dram-limit", limit, metrics=tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert m["engine"]["cpu_pinned_layers"] == 0 and "CPU_PINNED_LAYERS" not in r.stderr


def test_bad_pinned_count_is_one_error_line(deep_model):
    """More pinned layers than the ring can hold beside the look-ahead: exit 1, one line naming the
    parameters, nothing left behind (the autouse fixture checks /dev/shm and child processes)."""
    r, _ = generate(deep_model, "--set", "CPU_CAP_VALUE=10", "--set", "CPU_PINNED_LAYERS=8")
    errors = [l for l in r.stderr.splitlines() if l.startswith("ringllm: error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "CPU_CAP_VALUE=10 - CPU_PINNED_LAYERS=8 leaves 2 slot(s)" in errors[0]
    assert "look-ahead of 4 layers" in errors[0]


@pytest.mark.parametrize("settings, message", [
    (dict(CPU_PINNED_LAYERS=-1), "CPU_PINNED_LAYERS=-1: must be >= 0"),
    (dict(CPU_CAP_VALUE=10, CPU_PINNED_LAYERS=10), "CPU_PINNED_LAYERS=10 must be below CPU_CAP_VALUE=10"),
    (dict(CPU_CAP_VALUE=10, CPU_PINNED_LAYERS=12), "CPU_PINNED_LAYERS=12 must be below CPU_CAP_VALUE=10"),
    (dict(CPU_CAP_VALUE=10, CPU_PINNED_LAYERS=7, GPU_AHEAD_LAYERS=4),
     "CPU_CAP_VALUE=10 - CPU_PINNED_LAYERS=7 leaves 3 slot(s) for the disk-fed layers, fewer than the GPU "
     "look-ahead of 4 layers"),
])
def test_pinned_count_is_checked(settings, message):
    with pytest.raises(RingllmError) as err:
        resolve_config(overrides=settings, streamed_layers=40)
    assert message in str(err.value)


def test_pinned_count_within_the_rules():
    """P = cap - look-ahead is the least disk window allowed; a ring holding every streamed layer
    may pin them all; P above the streamed layers is lowered with one note; the water marks
    count the disk part."""
    cfg = resolve_config(overrides=dict(CPU_CAP_VALUE=10, CPU_PINNED_LAYERS=6, GPU_AHEAD_LAYERS=4),
                         streamed_layers=40).engine
    assert (cfg.cpu_pinned_layers, cfg.disk_slots, cfg.cpu_hwm, cfg.cpu_lwm) == (6, 4, 7, 1)
    assert resolve_config(overrides=dict(CPU_CAP_VALUE=12, CPU_PINNED_LAYERS=12), streamed_layers=12).engine \
        .cpu_pinned_layers == 12
    # a disk part that holds every disk layer may be smaller than the look-ahead
    assert resolve_config(overrides=dict(CPU_CAP_VALUE=12, CPU_PINNED_LAYERS=10), streamed_layers=12).engine \
        .disk_slots == 2
    lowered = resolve_config(overrides=dict(CPU_CAP_VALUE=30, CPU_PINNED_LAYERS=50), streamed_layers=20)
    assert lowered.engine.cpu_pinned_layers == 20 and lowered.engine.cpu_cap == 20
    notes = [n for n in lowered.notes if n.startswith("CPU_PINNED_LAYERS=")]
    assert notes == ["CPU_PINNED_LAYERS=50 (--set CPU_PINNED_LAYERS) is more than the 20 layers that stream "
                     "(GPU-resident layers need no slot); using CPU_PINNED_LAYERS=20"]


def test_dram_limit_is_what_the_ring_may_take(deep_model, monkeypatch):
    """--dram-limit is the ring's budget: a limit of 6 slots gives 6 slots (the 4 GiB headroom
    guards the machine's DRAM, not the limit); the headroom applies when the machine has less."""
    import psutil

    from ringllm.choose import _dram_for_ring

    layout = load_layout(deep_model)
    available = 64 * GIB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: argparse.Namespace(available=available))
    slot = ring_fit(layout, LAYERS, GIB).slot_bytes
    limit = 6 * slot + 64 * 1024               # six slots and the header
    room, where = _dram_for_ring(argparse.Namespace(dram_limit=str(limit)), layout)
    assert (room, where) == (limit, f"--dram-limit {limit}")
    assert ring_fit(layout, LAYERS, room, where).fits == 6
    room, where = _dram_for_ring(argparse.Namespace(dram_limit="1TiB"), layout)
    assert room == available - DRAM_HEADROOM and "available minus 4 GiB" in where
    assert _dram_for_ring(argparse.Namespace(dram_limit=None), layout)[0] == available - DRAM_HEADROOM


def test_each_rank_past_the_first_keeps_its_embedding_copy_and_process_out_of_the_ring(deep_model, monkeypatch):
    """--tensor-parallel N: every rank holds the whole embedding table in host memory (it is not
    split) and runs its own torch: the ring leaves room for N - 1 more of those."""
    import psutil
    from safetensors import safe_open

    from ringllm.choose import _dram_for_ring
    from ringllm.config import RANK_PROCESS_BYTES

    layout = load_layout(deep_model)
    with safe_open(str(deep_model / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    embed_bytes = embed.numel() * embed.element_size()
    available = 64 * GIB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: argparse.Namespace(available=available))
    for world in (1, 2, 4):
        room, where = _dram_for_ring(argparse.Namespace(dram_limit=None, tensor_parallel=world), layout)
        assert room == available - DRAM_HEADROOM - (world - 1) * (embed_bytes + RANK_PROCESS_BYTES), world
        assert where.startswith("available minus ")


def test_disk_window_and_split():
    """W = max(look-ahead, 1 + ceil(disk / H2D)): two slots while copying out is faster than
    reading; more when H2D is the slower side. No pinning when the ring holds everything or has
    no slot to spare."""
    assert disk_window(1) == disk_window(2) == 2 and disk_window(4) == 4
    assert disk_window(2, disk_gbps=6.0, h2d_gbps=25.0) == 2
    assert disk_window(2, disk_gbps=6.0, h2d_gbps=2.5) == 4     # a copy takes 2.4 reads: 3 slots copy out
    assert tier_split(35, 70, 2) == 33 and tier_split(70, 70, 2) == 0 and tier_split(2, 70, 2) == 0
    assert tier_split(35, 70, 2, disk_gbps=6.0, h2d_gbps=2.5) == 31


def test_auto_explains_the_split_with_the_measured_rates(deep_model):
    """With --measure's rates, the CPU_PINNED_LAYERS line says how fast a layer reads and copies,
    and the expected floor counts only the disk-fed layers (streamed minus pinned) against the
    disk: max(every streamed layer over H2D, disk-fed layers over the disk)."""
    import re

    layout = load_layout(deep_model)
    layer = layer_tensor_bytes(deep_model) / LAYERS
    room = ring_fit(layout, LAYERS, GIB).slot_bytes * 20 + 64 * 1024          # 20 slots of 40
    machine = Machine(gpu_budget=GIB, dram_available=room, loaders=2, h2d_gbps=0.5, disk_gbps=0.02, device="cpu",
                      budget_from="test", dram_from="--dram-limit test")
    choice = auto_tune(layout, machine, 1, 64, "float32", embed_on_host=False)
    assert isinstance(choice, AutoChoice)
    values = {k: v for k, v in choice.values.items() if k != "loaders"}
    resolved = resolve_config(preset_values=values, streamed_layers=LAYERS, loaders=2)
    pinned = resolved.engine.cpu_pinned_layers
    assert resolved.engine.cpu_cap == 20 and pinned == 20 - max(resolved.engine.lookahead_layers, 2)
    lines = final_lines(choice, resolved, LAYERS)
    pin_line = next(l for l in lines if l.startswith("CPU_PINNED_LAYERS="))
    assert f"{LAYERS - pinned} disk-fed layers" in pin_line and "at the measured 0.02 GB/s" in pin_line
    assert "H2D 0.5 GB/s" in pin_line, pin_line
    floor = float(re.search(r"^expected floor: ([\d.]+) s/token", lines[-1]).group(1))
    expect = max(LAYERS * layer / 0.5e9, (LAYERS - pinned) * layer / 0.02e9)
    assert floor == pytest.approx(expect, rel=0.02), lines[-1]
    assert f"for {LAYERS - pinned} of {LAYERS} streamed layers" in lines[-1]
