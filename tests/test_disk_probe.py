"""The disk ceiling measured by the loader processes themselves (ringllm.disk_probe): it reads the
bytes it claims, stops at its limits, fails with one clear line, and leaves nothing behind on
any exit path (the autouse fixture checks /dev/shm and child processes; these tests also check
the message queues, which /dev/shm does not show)."""
from __future__ import annotations

import os
import re
import signal
import threading

import posix_ipc
import pytest

from ringllm import disk_probe
from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import load_layout
from ringllm.faults import FaultPlan
from ringllm.shm.resources import SHM_DIR, RunNames
from ringllm.shm.slot_plan import plan_model
from ringllm.tools.make_checkpoint import make_checkpoint
from tests.conftest import layer_tensor_bytes

CHUNK = 8192


@pytest.fixture
def checkpoint(tmp_path):
    return make_checkpoint(tmp_path / "c", "tiny", 6, shard_bytes=60_000, progress=False)


@pytest.fixture
def run_names(monkeypatch):
    """The probe's run id, fixed so that the test can look for its queues afterwards."""
    run_id = f"{os.getpid()}-probe{os.urandom(2).hex()}"
    monkeypatch.setattr(disk_probe, "new_run_id", lambda: run_id)
    return RunNames(run_id, 8)


def assert_nothing_left(names: RunNames) -> None:
    for q in names.queues:
        with pytest.raises(posix_ipc.ExistentialError):
            posix_ipc.MessageQueue(q)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(names.segment)
    assert not names.manifest_path.exists()
    assert not [p.name for p in SHM_DIR.glob(f"ringllm-{names.run_id}*")]


def bytes_in_files(plans, chunk_bytes: int) -> tuple[int, int]:
    """(bytes, chunks) that reading every chunk of these layers yields: a chunk's aligned length,
    cut at the end of its file (from the file sizes, not from what the loaders say)."""
    total = count = 0
    for plan in plans:
        for c in plan.chunks(chunk_bytes):
            total += max(0, min(c.length, os.path.getsize(c.path) - c.file_offset))
            count += 1
    return total, count


def test_probe_reads_every_chunk_of_the_layers(checkpoint, run_names):
    layout = load_layout(checkpoint)
    result = disk_probe.measure_disk_with_loaders(layout, 2, chunk_bytes=CHUNK, dispatch_depth=2)
    expected, chunks = bytes_in_files(plan_model(layout), CHUNK)
    assert (result.bytes, result.chunks) == (expected, chunks)
    # and against the checkpoint itself: every layer tensor byte, plus at most the alignment of
    # each read's two ends
    tensors = layer_tensor_bytes(checkpoint)
    reads = sum(len(p.reads) for p in plan_model(layout))
    assert tensors <= result.bytes <= tensors + 2 * 4096 * reads
    assert result.loaders == 2 and result.seconds > 0
    assert result.gbps == pytest.approx(result.bytes / result.seconds / 1e9)
    assert_nothing_left(run_names)


def test_probe_stops_at_max_bytes(checkpoint, run_names):
    plans = plan_model(load_layout(checkpoint))[2:]           # the streamed layers only, say
    # one loader, one job at a time: the limit is reached exactly at the 5th chunk sent
    result = disk_probe.measure_disk_with_loaders(plans, 1, chunk_bytes=CHUNK, dispatch_depth=1,
                                                  max_bytes=4 * CHUNK + 1)
    assert result.chunks == 5
    first_five = [c for p in plans for c in p.chunks(CHUNK)][:5]
    assert result.bytes == sum(min(c.length, os.path.getsize(c.path) - c.file_offset) for c in first_five)
    assert_nothing_left(run_names)


def test_unreadable_file_fails_with_one_line_naming_it(checkpoint, run_names):
    layout = load_layout(checkpoint)
    victim = plan_model(layout)[3].reads[0].path
    os.truncate(victim, 4096)          # the layer's bytes are gone: a short read
    with pytest.raises(RingllmError) as err:
        disk_probe.measure_disk_with_loaders(layout, 2, chunk_bytes=CHUNK)
    text = str(err.value)
    assert "\n" not in text and victim in text and "short read" in text, text
    assert_nothing_left(run_names)


def test_dead_loader_fails_with_one_line(checkpoint, run_names):
    with pytest.raises(RingllmError) as err:
        disk_probe.measure_disk_with_loaders(load_layout(checkpoint), 2, chunk_bytes=CHUNK,
                                             faults=FaultPlan(crash_loaders_at_chunk=2))
    text = str(err.value)
    assert "\n" not in text and "exited unexpectedly (exit code 1)" in text, text
    assert_nothing_left(run_names)


def test_ctrl_c_during_the_probe_leaves_nothing(checkpoint, run_names):
    # slow loaders (a random delay before each chunk), and a Ctrl-C while they read
    faults = FaultPlan(chaos_seed=1, chaos_delay_s=0.2)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            disk_probe.measure_disk_with_loaders(load_layout(checkpoint), 2, chunk_bytes=CHUNK, faults=faults)
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # the caller's handler is back
    assert_nothing_left(run_names)


# --- --preset auto --measure: the loader count from the loader-measured rates ------------------
def test_preset_auto_measure_uses_the_loaders_rates(checkpoint, monkeypatch):
    import argparse

    from ringllm import choose, measure
    from ringllm.config import EngineConfig

    rates = {1: 1.0, 2: 1.9, 4: 2.0, 8: 1.5}     # 2 and 4 within 10% of the best: the most wins
    calls = []

    def fake_probe(plans, loaders, chunk_bytes, dispatch_depth, **limits):
        calls.append((len(plans), loaders, chunk_bytes, dispatch_depth))
        return disk_probe.DiskProbe(rates[loaders], 1, 1.0, True, loaders, 1)

    def threaded(*a, **k):
        raise AssertionError("the threaded disk measurement was used")

    monkeypatch.setattr(disk_probe, "measure_disk_with_loaders", fake_probe)
    monkeypatch.setattr(measure, "measure_disk", threaded)
    monkeypatch.setattr(choose, "_measure_h2d", lambda device: 5.0)
    args = argparse.Namespace(preset="auto", measure=True, dram_limit=None)
    layout = load_layout(checkpoint)
    auto = choose.auto_preset(args, layout, checkpoint, "cpu", 2, None, 1, 256, "bfloat16")
    assert auto.values["loaders"] == 4 and auto.machine.disk_gbps == 2.0
    assert calls == [(6, k, EngineConfig.chunk_bytes, EngineConfig.dispatch_depth) for k in (1, 2, 4, 8)]


def test_generate_preset_auto_measure_on_cpu(checkpoint):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ringllm", "generate", "--model", str(checkpoint), "--device", "cpu",
                        "--no-chat", "--prompt", "t5 t6", "--max-new-tokens", "2", "--preset", "auto", "--measure"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"disk read by the loaders: 1: [\d.]+, 2: [\d.]+, 4: [\d.]+, 8: [\d.]+ GB/s", r.stderr), r.stderr


def test_each_loader_count_reads_layers_the_last_did_not(monkeypatch, checkpoint):
    """measure_loader_counts: count K+1 starts after the layers count K read (wrapping), so the
    drive's cache never serves a count what the previous one just read."""
    plans = plan_model(load_layout(checkpoint))
    first_layers = []

    def fake_probe(order, k, *args, **kwargs):
        first_layers.append(order[0].layer)
        assert sorted(p.layer for p in order) == sorted(p.layer for p in plans)   # every layer, rotated
        return disk_probe.DiskProbe(1.0, order[0].nbytes + order[1].nbytes, 1.0, True, k, 2)   # two layers read

    monkeypatch.setattr(disk_probe, "measure_disk_with_loaders", fake_probe)
    disk_probe.measure_loader_counts(plans, (1, 2, 4), max_bytes=1)
    n = len(plans)
    assert first_layers == [plans[0].layer, plans[2 % n].layer, plans[4 % n].layer]
