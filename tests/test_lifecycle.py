"""How a run ends: Ctrl-C, SIGTERM, a dead child. Exit codes, messages, and nothing left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import posix_ipc
import psutil
import pytest

from tests.conftest import make_model_dir


@pytest.fixture
def long_run_model(tmp_path):
    """A model whose runs take seconds: 8 layers through a 2-slot ring, no EOS token at all."""
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=8, hidden_size=128, intermediate_size=256, max_position_embeddings=1024)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return d


def start(model_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "ringllm", "generate", "--model", str(model_dir), "--device", "cpu",
         "--no-chat", "--prompt", "w5 w6", "--max-new-tokens", "400", "--loaders", "2",
         "--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_children(proc, names, timeout=60):
    """Wait until the run's processes exist; return {name: psutil.Process} and the run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = {p.name(): p for p in psutil.Process(proc.pid).children() if p.is_running()}
        rings = [p.name for p in Path("/dev/shm").glob(f"ringllm-{proc.pid}-*-ring")]
        if set(names) <= set(kids) and rings:
            return kids, rings[0][len("ringllm-"):-len("-ring")]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"processes {names} did not appear")


def wait_for_tokens(proc):
    """Block until the first token byte arrives on stdout (read unbuffered: communicate() reads
    the same file descriptor afterwards, so nothing may sit in a Python-side buffer)."""
    assert os.read(proc.stdout.fileno(), 1) != b""


def assert_nothing_left(run_id, kids):
    base = f"/ringllm-{run_id}"
    for suffix in ("-sup", "-coord", "-gpu", "-load0", "-load1"):
        with pytest.raises(posix_ipc.ExistentialError):
            posix_ipc.MessageQueue(base + suffix)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(base + "-ring")
    assert not list(Path("/dev/shm").glob(f"ringllm-{run_id}*"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE
                                              for k in kids.values()):
        time.sleep(0.05)
    assert not [k for k in kids.values() if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


ALL = ("ringllm-coord", "ringllm-gpu", "ringllm-load0", "ringllm-load1")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_decode(long_run_model, sig, code):
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    wait_for_tokens(proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - t0 < 10
    assert_nothing_left(run_id, kids)


@pytest.mark.parametrize("victim", ["ringllm-gpu", "ringllm-coord"])
def test_dead_gpu_or_coordinator_ends_the_run(long_run_model, victim):
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    wait_for_tokens(proc)
    t0 = time.monotonic()
    kids[victim].kill()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 5
    role = {"ringllm-gpu": "gpu", "ringllm-coord": "coordinator"}[victim]
    assert f"ringllm: error: the {role} process exited unexpectedly" in err.strip().splitlines()[-1]
    assert_nothing_left(run_id, kids)


def test_killed_loader_is_restarted_and_tokens_are_unchanged(long_run_model):
    args = ("--max-new-tokens", "60")
    reference = subprocess.run(
        [sys.executable, "-m", "ringllm", "generate", "--model", str(long_run_model), "--device", "cpu",
         "--no-chat", "--prompt", "w5 w6", "--resident", *args], capture_output=True, text=True, timeout=120)
    proc = start(long_run_model, *args)
    kids, run_id = wait_for_children(proc, ALL)
    wait_for_tokens(proc)
    kids["ringllm-load1"].kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == reference.stdout[1:]            # the first byte was read by wait_for_tokens
    assert sum("ringllm-load1 died" in line or "loader1 died" in line for line in err.splitlines()) == 1
    assert_nothing_left(run_id, kids)
