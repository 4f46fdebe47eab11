"""On a CUDA machine only (the GPU machine runs these; CI has no GPU and skips them): the
registered ring is really pinned while the run lasts and every pinned byte is returned after it."""
from __future__ import annotations

import json

import pytest
import torch

from ringllm.shm.resources import pinned_above, system_pinned_bytes
from tests.conftest import layer_tensor_bytes, make_model_dir
from tests.test_cli_streaming import ringllm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU machine)")


@pytest.mark.parametrize("resident", [0, 2])
def test_pinned_ring_is_returned_and_tokens_match_the_cpu(tmp_path, resident):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=6)
    common = ["generate", "--model", str(d), "--prompt", "w3 w4 w5", "--max-new-tokens", "8",
              "--loaders", "2", "--set", "CPU_CAP_VALUE=3", "--set", "GPU_AHEAD_LAYERS=1",
              "--set", f"GPU_RESIDENT_LAYERS={resident}"]
    before = system_pinned_bytes()
    out = tmp_path / "metrics.json"
    gpu = ringllm(*common, "--device", "cuda", "--metrics-json", str(out), timeout=300)
    assert gpu.returncode == 0, gpu.stderr
    after = pinned_above(before) if before is not None else None
    cpu = ringllm(*common, "--device", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert gpu.stdout == cpu.stdout and gpu.stdout.strip()
    m = json.loads(out.read_text())
    # 8 passes copy each streamed layer once (the checkpoint's own sizes, read with safetensors)
    assert m["gpu_resident_layers"] == resident and m["h2d_bytes"] == 8 * layer_tensor_bytes(d, resident)
    assert m["pinned_registered_bytes"] > 0
    # the measurement sees the registration (machine-wide FOLL_PIN counters, or VmLck/VmPin)
    assert m["pinned_bytes"] >= m["pinned_registered_bytes"]
    assert m["pinned_left_after_run_bytes"] in (0, None)
    if before is not None:
        assert after == 0, f"{after / 2**20:.2f} MiB still pinned after the run"
