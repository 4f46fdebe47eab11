"""Start-up (issue #12): the ring fills while the GPU process is still starting, on the
supervisor's estimate of the GPU-resident layers, and --metrics-json times each phase."""
from __future__ import annotations

import json

import pytest

from ringllm.checkpoint.layout import load_layout
from ringllm.config import EngineConfig, build_config
from ringllm.faults import FaultPlan
from ringllm.supervisor.supervisor import Supervisor
from ringllm.workers.generation import SamplingParams
from ringllm.supervisor import startup
from ringllm.workers.memory_plan import planned_resident_layers
from tests.conftest import layer_tensor_bytes, make_model_dir
from tests.test_cli_streaming import ringllm
from tests.test_streaming import assert_run_cleaned, resident_tokens

PHASES = ("spawn", "attach", "fill", "resident_load", "warm_up", "first_pass")


def test_the_ring_fills_before_the_gpu_process_is_up_and_every_phase_is_timed(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=6)
    out = tmp_path / "metrics.json"
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--prompt", "w9 w10", "--max-new-tokens", "3",
                "--loaders", "2", "--set", "GPU_RESIDENT_LAYERS=2", "--set", "CPU_CAP_VALUE=4",
                "--metrics-json", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    s = m["startup"]
    assert set(PHASES) <= set(s), s
    # loading started before the GPU process had even imported torch, let alone said which
    # layers it keeps (the estimate is exact here: GPU_RESIDENT_LAYERS is set)
    assert s["fill"]["start"] < s["spawn"]["seconds"] <= s["attach"]["start"]
    assert "the ring adjusts" not in r.stderr
    # the first fill read the four streamed layers, each once (O_DIRECT alignment at the edges)
    streamed = layer_tensor_bytes(d, first_layer=2)
    assert streamed <= s["fill"]["bytes"] < streamed + 4 * 2 * 2 * 4096
    # the phases follow each other as the GPU process runs them, and end at the first token
    assert s["attach"]["start"] <= s["resident_load"]["start"] <= s["warm_up"]["start"]
    assert s["warm_up"]["start"] + s["warm_up"]["seconds"] <= s["first_pass"]["start"]
    first = s["first_pass"]["start"] + s["first_pass"]["seconds"]
    assert first <= s["first_token_s"] <= m["first_token_wall_s"] + 1e-3
    assert all(v["seconds"] >= 0 for k, v in s.items() if k in PHASES)
    # what the GPU process reads itself (the head and its 2 layers) was warmed by the supervisor
    # from the start, before the GPU process had started (supervisor.prefetch.WeightWarmer)
    warmed = sum(e.nbytes for e in load_layout(d).resident_extents(2))
    assert s["warm"]["bytes"] == warmed and s["warm"]["start"] < s["spawn"]["seconds"]


@pytest.mark.parametrize("estimate", [0, 3])
def test_a_wrong_estimate_is_corrected_by_the_gpu_process(tmp_path, estimate):
    """The coordinator starts loading on the estimate; the GPU process's ResidentLayers (1 layer)
    wins, and the tokens are the resident engine's."""
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=5)
    layout = load_layout(d)
    engine = build_config(loaders=2, cpu_cap=3, gpu_ahead_layers=1, gpu_resident_layers=1)
    sup = Supervisor(layout, engine, "cpu", "float32", faults=FaultPlan(resident_estimate=estimate))
    result = sup.run([[3, 4, 5]], 10, SamplingParams(), (), lambda i, t: None)
    assert result.outputs == resident_tokens(d, [[3, 4, 5]], 10)
    assert result.gpu_info["resident_layers"] == 1
    assert_run_cleaned(sup)


def test_the_estimate_is_what_the_gpu_process_will_choose(tmp_path, monkeypatch):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=6)
    layout = load_layout(d)
    for engine, device in ((EngineConfig(gpu_resident_layers=4), "cuda"), (EngineConfig(), "cpu"),
                           (EngineConfig(gpu_mem=200 << 20), "cuda")):
        assert startup.resident_estimate(layout, engine, 1, 64, "float32", device) == \
            planned_resident_layers(layout, engine, 1, 64, "float32", device)
    # cuda, auto, no --gpu-mem: nvidia-smi's free memory less the context; none without it
    monkeypatch.setattr(startup, "free_gpu_bytes_nvidia_smi", lambda timeout_s=5.0: None)
    assert startup.resident_estimate(layout, EngineConfig(), 1, 64, "float32", "cuda") is None
    monkeypatch.setattr(startup, "free_gpu_bytes_nvidia_smi", lambda timeout_s=5.0: (1 << 30) + (50 << 20))
    assert startup.resident_estimate(layout, EngineConfig(), 1, 64, "float32", "cuda") == \
        planned_resident_layers(layout, EngineConfig(), 1, 64, "float32", "cuda", 50 << 20)
