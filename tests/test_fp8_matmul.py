"""The two ways to compute an FP8 Linear (workers.quantized; EngineConfig.fp8_matmul), on CPU.

Production CPU runs always dequantize (torch._scaled_mm's fast path is CUDA sm_89+). This torch
also has a CPU kernel for torch._scaled_mm, so the scaled_mm code (per-token activation scales,
row-wise weight scales, the column-major weight) is checked here against an FP8 product computed
independently in float64, and through the whole model; tests/test_gpu.py checks it on CUDA.
"""
from __future__ import annotations

import logging

import pytest
import torch

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import load_layout
from ringllm.cli import main
from ringllm.workers.quantized import Fp8Weight, choose_fp8_matmul
from tests.conftest import make_model_dir
from tests.test_fp8_quality import smollm2_bf16_scores, smollm2_windows  # noqa: F401  (session fixtures)
from tests.test_model_vs_transformers import full_logits, rel_err

CPU = torch.device("cpu")
E4M3_MAX = 448.0
# scaled_mm against dequantize-then-matmul, relative logit error on the tiny FP8 model: the
# per-token e4m3 activations (3 mantissa bits) are the difference; measured 0.031 in bf16
SCALED_MM_LOGITS_TOL = 0.06


def _cpu_scaled_mm_works() -> bool:
    try:
        one = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(one, one.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


needs_cpu_kernel = pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="this torch has no CPU torch._scaled_mm")


def fp8_weight(w: torch.Tensor, per_tensor: bool) -> Fp8Weight:
    amax = w.abs().amax() if per_tensor else w.abs().amax(dim=1, keepdim=True)
    scale = (amax / E4M3_MAX).reshape(1, 1) if per_tensor else amax / E4M3_MAX
    return Fp8Weight((w / scale).to(torch.float8_e4m3fn), scale.to(torch.bfloat16))


@needs_cpu_kernel
@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_channel", "per_tensor"])
def test_scaled_mm_is_the_fp8_product_of_per_token_activations(per_tensor):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=gen) * torch.linspace(0.1, 3, 48)[:, None]   # channels of different size
    x = (torch.randn(2, 5, 64, generator=gen) * torch.linspace(0.01, 10, 10).reshape(2, 5, 1)).to(torch.bfloat16)
    x[1, 2] = 0                                    # an all-zero token must not become NaN
    weight = fp8_weight(w, per_tensor)
    got = weight.matmul(x, torch.bfloat16, "scaled_mm")
    assert got.shape == (2, 5, 48) and got.dtype == torch.bfloat16
    # the definition, in float64: each token scaled to e4m3 by its own absmax, times the
    # dequantized weight; the kernel may differ by its bf16 output rounding
    xd = x.double().reshape(10, 64)
    sx = (xd.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-300)
    x8 = (xd / sx).float().to(torch.float8_e4m3fn).double() * sx
    ref = (x8 @ (weight.data.double() * weight.scale.double()).T).reshape(2, 5, 48)
    assert torch.equal(got[1, 2], torch.zeros(48, dtype=torch.bfloat16))
    err = (got.double() - ref).abs() / ref.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    assert err.max() < 2 ** -7, err.max()
    # and it is not the weight-only product: the activations really went through e4m3
    dequant = weight.matmul(x, torch.bfloat16, "dequant").double()
    assert 1e-3 < rel_err(got.double(), dequant) < 0.1


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8mm")
    src = make_model_dir(root / "bf16", dtype=torch.bfloat16, num_hidden_layers=3)
    assert main(["convert", "--to", "fp8", str(src), str(root / "fp8")]) == 0
    return root / "fp8"


@needs_cpu_kernel
def test_model_logits_scaled_mm_near_dequant(tiny_fp8):
    from ringllm.workers.model import Llama
    from ringllm.workers.resident import ResidentSource, load_resident_weights

    layout = load_layout(tiny_fp8)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))

    def logits(way):
        model = Llama(layout.config, load_resident_weights(layout, torch.bfloat16, CPU),
                      ResidentSource(layout, torch.bfloat16, CPU), torch.bfloat16, CPU, way)
        return full_logits(model, tokens)
    dequant, scaled = logits("dequant"), logits("scaled_mm")
    assert 1e-3 < rel_err(scaled, dequant) < SCALED_MM_LOGITS_TOL


def test_choose_fp8_matmul(tiny_fp8, tmp_path, caplog):
    fp8 = load_layout(tiny_fp8)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16

    def choose(requested, layout=fp8, device=cuda, dtype=bf16, capability=(9, 0)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ringllm"):
            way = choose_fp8_matmul(requested, layout, device, dtype, capability)
        return way, [r.getMessage() for r in caplog.records]

    # auto dequantizes until an H200 shows what scaled_mm buys (it costs agreement with bf16)
    assert choose("auto") == ("dequant", [])
    way, lines = choose("scaled_mm")
    assert way == "scaled_mm" and len(lines) == 1 and "torch._scaled_mm" in lines[0], lines
    assert choose("dequant") == ("dequant", [])
    # scaled_mm asked for where it cannot run says why, in one line
    for case, why in [(dict(device=CPU), "cpu computes FP8 by dequantizing"), (dict(capability=(8, 0)), "sm_80"),
                      (dict(dtype=torch.float32), "bfloat16 only")]:
        assert choose("auto", **case) == ("dequant", []), case
        way, lines = choose("scaled_mm", **case)
        assert way == "dequant" and len(lines) == 1 and why in lines[0] and "fp8_matmul=scaled_mm" in lines[0], lines
    odd_src = make_model_dir(tmp_path / "odd", dtype=torch.bfloat16, num_hidden_layers=1, intermediate_size=120)
    assert main(["convert", "--to", "fp8", str(odd_src), str(tmp_path / "odd8")]) == 0
    way, lines = choose("scaled_mm", layout=load_layout(tmp_path / "odd8"))
    assert way == "dequant" and "[120, 64]" in lines[0] and "multiple of 16" in lines[0], lines
    # a model without FP8 weights has nothing to choose
    assert choose("scaled_mm", layout=load_layout(odd_src)) == ("dequant", [])
    with pytest.raises(RingllmError, match="fp8_matmul='fast'"):
        choose_fp8_matmul("fast", fp8, cuda, bf16, (9, 0))


def test_engine_config_refuses_an_unknown_fp8_matmul():
    from ringllm.config import build_config

    assert build_config().fp8_matmul == "auto"
    assert build_config(fp8_matmul="scaled_mm").fp8_matmul == "scaled_mm"
    with pytest.raises(RingllmError, match=r"fp8_matmul='fast': must be one of auto, dequant, scaled_mm"):
        build_config(fp8_matmul="fast")


def test_streaming_engine_asked_for_scaled_mm_on_cpu_dequantizes_with_one_line(tiny_fp8, capfd):
    """The whole engine on cpu with fp8_matmul=scaled_mm: the GPU process says once why it
    dequantizes, reports the way it ran, and gives the resident engine's tokens."""
    from ringllm.config import build_config
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.generation import Sampler, SamplingParams, generate
    from ringllm.workers.model import Llama
    from ringllm.workers.resident import ResidentSource, load_resident_weights

    layout = load_layout(tiny_fp8)
    prompt = [9, 10, 11, 12]
    engine = build_config(loaders=2, overrides={"CPU_CAP_VALUE": "2", "GPU_AHEAD_LAYERS": "1"}, fp8_matmul="scaled_mm")
    result = Supervisor(layout, engine, "cpu", "bfloat16").run([prompt], 8, SamplingParams(), (), lambda i, t: None)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "fp8_matmul" in line]
    assert len(lines) == 1 and "fp8_matmul=scaled_mm: cpu computes FP8 by dequantizing" in lines[0], err
    assert result.gpu_info["fp8_matmul"] == "dequant"
    model = Llama(layout.config, load_resident_weights(layout, torch.bfloat16, CPU),
                  ResidentSource(layout, torch.bfloat16, CPU), torch.bfloat16, CPU)
    resident = generate(model, [prompt], 8, Sampler(SamplingParams(), CPU), (), lambda i, t: None, 256)
    assert result.outputs == resident and len(resident[0]) == 8


# Top-1 agreement with bf16 (float32 compute) of the FP8 checkpoint computed in bf16. bf16 compute
# rounds every product and sum, and how (the kernel, its blocking of the reductions) is the CPU's:
# dequant measured 0.9207, 0.9194 and 0.9214 on three machines (6 of 3,065 positions apart), around the
# issue's 0.92, which is the bar for float32 compute (test_fp8_quality). The bars below keep a margin
# of 0.01 (about 30 positions) under what was measured; a real FP8 bug is far below them: planted
# (first 512 tokens), every scale doubled gave 0.004 and the scales in the wrong channel order 0.000.
BF16_DEQUANT_MIN_AGREEMENT = 0.91       # measured 0.9194-0.9214
BF16_SCALED_MM_MIN_AGREEMENT = 0.89     # measured 0.9002-0.9057
# torch's CPU threads split the reductions: fixed, so the figure does not move with the core count
# (1 and 2 threads gave the same figure here; CI has 2 cores)
SCORING_THREADS = 2


@needs_cpu_kernel
def test_scaled_mm_loss_against_bf16_on_smollm2(smollm2_fp8_dir, smollm2_windows, smollm2_bf16_scores):
    """What quantizing the activations costs, on the issue's quality measure (test_fp8_quality:
    SmolLM2-135M, teacher-forced over the eval text, against bf16 weights in float32). scaled_mm
    computes in bf16, so the same checkpoint dequantized in bf16 is measured beside it. Measured:
    dequant 0.9207 agreement / ppl ratio 1.0148; scaled_mm 0.9002 / 1.0323: below the issue's 0.92
    agreement bar for this 135M model (the perplexity bar, 1.05, holds)."""
    from tests.test_fp8_quality import compare

    fp8 = smollm2_fp8_dir
    threads = torch.get_num_threads()
    torch.set_num_threads(SCORING_THREADS)
    try:
        dequant = compare(smollm2_bf16_scores, scores_bf16(fp8, smollm2_windows, "dequant"))
        scaled = compare(smollm2_bf16_scores, scores_bf16(fp8, smollm2_windows, "scaled_mm"))
    finally:
        torch.set_num_threads(threads)
    print(f"SmolLM2-135M fp8, bf16 compute: dequant {dequant}; scaled_mm {scaled}")
    assert dequant.agreement >= BF16_DEQUANT_MIN_AGREEMENT and dequant.ppl_ratio <= 1.05, str(dequant)
    assert BF16_SCALED_MM_MIN_AGREEMENT <= scaled.agreement < dequant.agreement and scaled.ppl_ratio <= 1.05, \
        str(scaled)


def scores_bf16(model_dir, windows, way):
    from tests.test_fp8_quality import ringllm_scores

    return ringllm_scores(model_dir, windows, torch.bfloat16, way)
