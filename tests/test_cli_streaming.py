"""`ringllm generate` end to end as a user runs it: separate processes, stdout, exit codes."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import layer_tensor_bytes, make_model_dir


def ringllm(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_streams_by_default_and_matches_resident(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=4)
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
    make_model_dir(d, num_hidden_layers=2)
    env = {**os.environ, "GPU_AHEAD_LAYERS": "2", "group_prefetch_depth": "3"}
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--max-new-tokens", "2", env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("ringllm: error: GPU_AHEAD_LAYERS=2 and group_prefetch_depth=3")
    env = {**os.environ, "WSM_CPU_CACHE_LWM_LAYERS": "9", "WSM_CPU_CACHE_HWM_LAYERS": "5"}
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--max-new-tokens", "2", env=env)
    assert r.returncode == 1 and "WSM_CPU_CACHE_LWM_LAYERS=9 must be below WSM_CPU_CACHE_HWM_LAYERS=5" in r.stderr


def test_gpu_mem_cap_too_small_names_the_minimum(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=2)
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--gpu-mem", "1MiB", "--max-new-tokens", "2")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "--gpu-mem 1.0 MiB is below the minimum working set of" in last


def test_metrics_json_agrees_with_the_checkpoint_and_the_output(tmp_path):
    """--metrics-json: the byte counts against the checkpoint's own tensor sizes (read here with
    safetensors), the token count against what was printed, one entry per process."""
    import json

    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=4)
    layer_bytes = layer_tensor_bytes(d)
    out = tmp_path / "metrics.json"
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--prompt", "w9 w10", "--max-new-tokens", "6",
                "--loaders", "2", "--set", "CPU_CAP_VALUE=4", "--metrics-json", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    printed = r.stdout.split()
    assert m["new_tokens"] == len(printed) == 6
    assert m["tokens_per_second"] == m["new_tokens"] / m["seconds"] and m["seconds_per_token"] > 0
    assert 0 < m["time_to_first_token_s"] <= m["seconds"]
    assert 0 < m["startup_s"] < m["first_token_wall_s"] < m["wall_s"]
    # the ring holds all 4 layers: each is read from disk once (plus O_DIRECT alignment at the edges)
    assert m["ring_loads"] == 4 and m["ring_evictions"] == 0
    assert layer_bytes <= m["disk_bytes"] < layer_bytes + 4 * 2 * 2 * 4096
    # every pass copies every streamed layer once: 6 passes, and no look-ahead past the last
    assert m["h2d_bytes"] == 6 * layer_bytes
    assert set(m["processes"]) == {"supervisor", "coordinator", "loader0", "loader1", "gpu"}
    assert len({p["pid"] for p in m["processes"].values()}) == 5
    assert all(p["peak_rss"] > 0 for p in m["processes"].values())
    assert m["pinned_registered_bytes"] == 0 and m["pinned_left_after_run_bytes"] in (0, None)
    assert m["engine"]["loaders"] == 2 and m["engine"]["cpu_cap"] == 4
    assert m["loader_restarts"] == 0 and m["stale_chunk_reports"] == 0
