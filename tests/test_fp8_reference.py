"""FP8 checkpoints against an independent reference: transformers with compressed-tensors loads
the same directory, dequantizes it, and its float32 logits are what ringllm's float32 logits must
match. Both a checkpoint from `ringllm convert --to fp8` and ones written by tests/fp8_reference.py
(per-channel and per-tensor scales, one file and sharded) are checked, on tiny random Llamas and
on SmolLM2-135M. The first tests check the reference writer itself against compressed-tensors."""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import make_hf_checkpoint, write_tokenizer
from tests.fp8_reference import QUANTIZED, write_fp8_checkpoint
from tests.test_fp8_quality import CPU, eval_windows, ringllm_convert_fp8

# transformers rounds a dequantized weight to the dtype of its scale (compressed-tensors computes
# weight * scale in that dtype); ringllm may keep it in float32. With float32 scales both hold the
# same float32 weights and only the order of the sums differs; with 16-bit scales the weights
# differ by up to one 16-bit rounding. Either tolerance is far below the FP8 error itself, which
# the tests check too (FLOOR_OVER_TOLERANCE).
TOLERANCE_OF_SCALE_DTYPE = {"F32": 1e-4, "BF16": 1e-2, "F16": 2e-3}
FLOOR_OVER_TOLERANCE = 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tensors_of(model_dir: Path) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype tag, shape, shard file) from the safetensors headers."""
    out = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (s.get_dtype(), s.get_shape(), shard.name)
    return out


def scale_dtype_of(model_dir: Path) -> str:
    tags = {tag for name, (tag, _, _) in tensors_of(model_dir).items() if name.endswith(".weight_scale")}
    assert len(tags) == 1, f"{model_dir}: weight_scale dtypes {tags}"
    return tags.pop()


def hf_dequantized(model_dir: Path):
    """transformers + compressed-tensors, the weights dequantized at load, float32, CPU."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # transformers 5 names it dequantize=True; 4.x run_compressed=False (5 still takes it, deprecated)
    params = inspect.signature(CompressedTensorsConfig.__init__).parameters
    qc = CompressedTensorsConfig(dequantize=True) if "dequantize" in params else CompressedTensorsConfig(run_compressed=False)
    with warnings.catch_warnings():   # "the quantization_config from the model will be used": that's the point
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=qc,
                                                    device_map="cpu").eval()


def ringllm_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.model import Llama
    from ringllm.workers.resident import ResidentSource, load_resident_weights
    from tests.test_model_vs_transformers import full_logits

    layout = load_layout(model_dir)
    model = Llama(layout.config, load_resident_weights(layout, torch.float32, CPU),
                  ResidentSource(layout, torch.float32, CPU), torch.float32, CPU)
    return full_logits(model, tokens)


def make_fp8(kind: str, src: Path, dst: Path) -> Path:
    if kind == "converted":
        return ringllm_convert_fp8(src, dst)
    return write_fp8_checkpoint(src, dst, per_tensor=(kind == "reference-tensor"))


def check_against_transformers(fp8_dir: Path, tokens: torch.Tensor, source_logits: torch.Tensor) -> None:
    tolerance = TOLERANCE_OF_SCALE_DTYPE[scale_dtype_of(fp8_dir)]
    with torch.no_grad():
        ref = hf_dequantized(fp8_dir)(tokens).logits.float()
    # the FP8 error must stand well above the tolerance, or the comparison could not see it
    assert rel_err(ref, source_logits) > FLOOR_OVER_TOLERANCE * tolerance, "FP8 error below the tolerance"
    got = ringllm_logits(fp8_dir, tokens)
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    assert err < tolerance, f"{fp8_dir.name}: ringllm vs transformers logits rel err {err:.2e} >= {tolerance:.0e}"


# ---- the reference writer, checked against the format's own implementation ----

@pytest.mark.parametrize("per_tensor", [False, True], ids=["channel", "tensor"])
def test_reference_writer_layout(tmp_path, per_tensor):
    """Every decoder Linear is FP8 with its scale, everything else is the source's bytes, the
    config carries the published quantization_config, the tokenizer is copied, the index of a
    sharded source names every tensor; compressed-tensors parses the config and transformers'
    dequantized weights are weight * scale from the file, within FP8 error of the source."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    src = tmp_path / "src"
    source = make_hf_checkpoint(src, max_shard_size="40KB", num_hidden_layers=2)
    write_tokenizer(src)
    dst = write_fp8_checkpoint(src, tmp_path / "fp8", per_tensor=per_tensor)

    before, after = tensors_of(src), tensors_of(dst)
    quantized = {n for n in before if QUANTIZED.match(n)}
    assert len(quantized) == 7 * 2
    for name, (tag, shape, shard) in before.items():
        if name in quantized:
            assert after[name][:2] == ("F8_E4M3", shape)
            assert after[name + "_scale"][:2] == (tag, [1] if per_tensor else [shape[0], 1])
        else:
            assert after[name] == (tag, shape, shard)
    assert set(after) == set(before) | {n + "_scale" for n in quantized}
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {n: shard for n, (_, _, shard) in after.items()}
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "float-quantized", ["lm_head"])
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert scheme.weights.strategy == ("tensor" if per_tensor else "channel")

    hf = hf_dequantized(dst)
    hf_params = dict(hf.named_parameters())
    files = {}
    for shard in dst.glob("*.safetensors"):
        files.update(load_file(str(shard)))
    for name in quantized:
        expected = files[name].to(files[name + "_scale"].dtype) * files[name + "_scale"]
        assert torch.equal(hf_params[name], expected.float()), name
        assert rel_err(hf_params[name], source.state_dict()[name]) < 0.05, name
    assert torch.equal(hf_params["model.norm.weight"], source.state_dict()["model.norm.weight"])


# ---- ringllm against transformers on the same FP8 directory ----

@pytest.mark.parametrize("kind", ["converted", "reference-channel", "reference-tensor"])
@pytest.mark.parametrize("source", ["fp32", "bf16", "fp32_sharded"])
def test_tiny_fp8_logits_match_transformers(tmp_path, kind, source):
    from transformers import LlamaForCausalLM

    src = tmp_path / "src"
    dtype = torch.bfloat16 if source == "bf16" else torch.float32
    make_hf_checkpoint(src, seed=len(kind), dtype=dtype, max_shard_size="40KB" if "sharded" in source else None)
    write_tokenizer(src)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        source_logits = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)(tokens).logits
    check_against_transformers(make_fp8(kind, src, tmp_path / kind), tokens, source_logits)


@pytest.fixture(scope="module")
def smollm2_source(demo_model_dir):
    """(tokens, transformers' logits of the bf16 SmolLM2) on the eval text's first 96 tokens."""
    from transformers import AutoModelForCausalLM

    tokens = eval_windows(demo_model_dir, n_tokens=96, window=96)[0][None]
    with torch.no_grad():
        return tokens, AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)(tokens).logits


@pytest.mark.parametrize("kind", ["converted", "reference-channel"])   # per-tensor: the tiny cases
def test_smollm2_fp8_logits_match_transformers(tmp_path, demo_model_dir, smollm2_source, kind):
    tokens, source_logits = smollm2_source
    check_against_transformers(make_fp8(kind, demo_model_dir, tmp_path / kind), tokens, source_logits)
