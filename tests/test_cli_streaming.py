"""`ringllm generate` end to end as a user runs it: separate processes, stdout, exit codes."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import make_hf_checkpoint, write_tokenizer


def ringllm(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_streams_by_default_and_matches_resident(tmp_path):
    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=4)
    write_tokenizer(d)
    common = ["generate", "--model", str(d), "--device", "cpu", "--prompt", "w9 w10 w11", "--max-new-tokens", "12"]
    streamed = ringllm(*common, "--loaders", "2", "--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=1")
    resident = ringllm(*common, "--resident")
    assert streamed.returncode == 0, streamed.stderr
    assert resident.returncode == 0, resident.stderr
    assert streamed.stdout == resident.stdout and streamed.stdout.strip()
    assert "[WSM] CPU ring window: advancing to layer" in streamed.stderr
    assert "summary:" in streamed.stderr and "ring hits" in streamed.stderr


def test_environment_parameters_and_contradictions(tmp_path):
    import os

    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=2)
    write_tokenizer(d)
    env = {**os.environ, "GPU_AHEAD_LAYERS": "2", "group_prefetch_depth": "3"}
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--max-new-tokens", "2", env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("ringllm: error: GPU_AHEAD_LAYERS=2 and group_prefetch_depth=3")
    env = {**os.environ, "WSM_CPU_CACHE_LWM_LAYERS": "9", "WSM_CPU_CACHE_HWM_LAYERS": "5"}
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--max-new-tokens", "2", env=env)
    assert r.returncode == 1 and "WSM_CPU_CACHE_LWM_LAYERS=9 must be below WSM_CPU_CACHE_HWM_LAYERS=5" in r.stderr


def test_gpu_mem_cap_too_small_names_the_minimum(tmp_path):
    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=2)
    write_tokenizer(d)
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--gpu-mem", "1MiB", "--max-new-tokens", "2")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "--gpu-mem 1.0 MiB is below the minimum working set of" in last
