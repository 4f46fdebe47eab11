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


# --- FP8 Linears by torch._scaled_mm (workers.quantized; EngineConfig.fp8_matmul) -------------------
def _fp8_mm_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) and not torch.version.hip


needs_fp8_mm = pytest.mark.skipif(not _fp8_mm_capable(), reason="torch._scaled_mm FP8 needs CUDA sm_89 or newer")


@pytest.fixture(scope="module")
def tiny_fp8_dir(tmp_path_factory):
    from ringllm.cli import main

    root = tmp_path_factory.mktemp("fp8gpu")
    src = make_model_dir(root / "bf16", dtype=torch.bfloat16, num_hidden_layers=4)
    assert main(["convert", "--to", "fp8", str(src), str(root / "fp8")]) == 0
    return root / "fp8"


def _cuda_model(fp8_dir, way):
    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.model import Llama
    from ringllm.workers.resident import ResidentSource, load_resident_weights

    layout, dev = load_layout(fp8_dir), torch.device("cuda")
    return Llama(layout.config, load_resident_weights(layout, torch.bfloat16, dev),
                 ResidentSource(layout, torch.bfloat16, dev), torch.bfloat16, dev, way)


@needs_fp8_mm
def test_scaled_mm_logits_match_dequant_and_transformers(tiny_fp8_dir):
    """Both ways on the GPU in bf16 against transformers + compressed-tensors on CPU in float32
    (the FP8 weights decompressed): dequant within bf16 rounding (0.006 on CPU), scaled_mm within
    what per-token e4m3 activations cost (0.031 on CPU with torch's CPU kernel)."""
    # the reference: without the package, transformers cannot read the checkpoint (the GPU image
    # lacks it: carry its wheel, with pydantic's and loguru's, to run this there)
    pytest.importorskip("compressed_tensors", reason="transformers' FP8 reference needs compressed-tensors")
    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.quantized import choose_fp8_matmul
    from tests.test_fp8_engine import transformers_fp8
    from tests.test_fp8_matmul import SCALED_MM_LOGITS_TOL
    from tests.test_model_vs_transformers import full_logits, rel_err

    assert choose_fp8_matmul("scaled_mm", load_layout(tiny_fp8_dir), torch.device("cuda"), torch.bfloat16) == "scaled_mm"
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = transformers_fp8(tiny_fp8_dir)(tokens).logits

    def logits(way):
        return full_logits(_cuda_model(tiny_fp8_dir, way), tokens).cpu()
    dequant, scaled = logits("dequant"), logits("scaled_mm")
    assert rel_err(dequant, ref) < 0.02
    assert rel_err(scaled, ref) < SCALED_MM_LOGITS_TOL
    assert 1e-3 < rel_err(scaled, dequant) < SCALED_MM_LOGITS_TOL     # the activations did go through e4m3
    assert (scaled.argmax(-1) == dequant.argmax(-1)).float().mean() >= 0.85   # 0.95 on CPU


@needs_fp8_mm
@pytest.mark.parametrize("way", ["scaled_mm", "dequant"])
def test_streaming_tokens_equal_the_in_process_engine_for_each_fp8_way(tiny_fp8_dir, way):
    """The streaming engine (FP8 bytes and scales through the ring and the GPU group buffers) with
    fp8_matmul=way gives the in-process engine's tokens computed the same way, and reports the way
    it ran. (scaled_mm and dequant are different numerics: their free-running greedy tokens part
    after some tokens even on SmolLM2-135M, so the two ways are compared on logits above.)"""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.config import build_config
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.generation import Sampler, SamplingParams, generate

    prompt, dev = [9, 10, 11, 12], torch.device("cuda")
    engine = build_config(loaders=2, overrides={"CPU_CAP_VALUE": "2", "GPU_AHEAD_LAYERS": "1",
                                                "GPU_RESIDENT_LAYERS": "1"}, fp8_matmul=way)
    result = Supervisor(load_layout(tiny_fp8_dir), engine, "cuda", "bfloat16").run(
        [prompt], 12, SamplingParams(), (), lambda i, t: None)
    assert result.gpu_info["fp8_matmul"] == way
    resident = generate(_cuda_model(tiny_fp8_dir, way), [prompt], 12, Sampler(SamplingParams(), dev), (),
                        lambda i, t: None, 256)
    assert result.outputs == resident and len(resident[0]) == 12


# --- tensor parallel ranks on CUDA (issue #16) -------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_on_cuda_give_transformers_tokens(tmp_path, world):
    """N ranks, each registering the one ring in its own CUDA context and copying its share of every
    layer: NCCL on N GPUs when the machine has them, else gloo with the ranks sharing GPU 0 (the
    CUDA path checked on a one-GPU machine)."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.config import build_config
    from ringllm.supervisor.parallel import TensorParallelPlan
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.generation import SamplingParams
    from tests.conftest import hf_greedy_cached, make_hf_checkpoint, write_tokenizer
    from tests.test_streaming import assert_run_cleaned
    from tests.test_tensor_parallel_engine import PROMPT, THREE_KV

    d = tmp_path / "m"
    hf = make_hf_checkpoint(d, max_shard_size="60KB", **THREE_KV)
    write_tokenizer(d)
    want = hf_greedy_cached(hf, PROMPT, 10)
    own_gpus = torch.cuda.device_count() >= world
    plan = TensorParallelPlan(world) if own_gpus else TensorParallelPlan(world, (0,) * world, backend="gloo")
    engine = build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1, gpu_resident_layers=0)
    sup = Supervisor(load_layout(d), engine, "cuda", "float32", parallel=plan)
    result = sup.run([PROMPT], 10, SamplingParams(), (), lambda i, t: None)
    assert result.outputs == [want]
    assert result.gpu_info["world"] == world
    assert result.gpu_info["tp_backend"] == ("nccl" if own_gpus else "gloo")
    assert result.coordinator["ring_evictions"] > 0
    assert_run_cleaned(sup)


def test_a_device_index_the_machine_lacks_is_one_line(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=2)
    missing = torch.cuda.device_count()
    r = ringllm("generate", "--model", str(d), "--device", "cuda", "--prompt", "w3", "--max-new-tokens", "2",
                "--tensor-parallel", "2", "--devices", f"0,{missing}", "--tp-backend", "gloo", timeout=300)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ringllm: error: gpu1: --devices: rank 1's CUDA device") and "does not exist" in last, r.stderr
