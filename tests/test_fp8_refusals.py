"""Quantized checkpoints ringllm does not read, and damaged FP8 ones: one `ringllm: error:` line
naming the file and the quant_method / tensor, exit 1, nothing left behind."""
from __future__ import annotations

import json

import pytest
import torch

from ringllm.cli import main
from tests.conftest import make_model_dir
from tests.test_bad_input import rewrite_header


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8r")
    src = make_model_dir(root / "bf16", dtype=torch.bfloat16, num_hidden_layers=2)
    fp8 = root / "fp8"
    assert main(["convert", "--to", "fp8", str(src), str(fp8)]) == 0
    return fp8


@pytest.fixture
def fp8(fp8_src, tmp_path):
    import shutil

    return shutil.copytree(fp8_src, tmp_path / "m")


def error_line(capsys, model_dir) -> str:
    code = main(["generate", "--device", "cpu", "--max-new-tokens", "2", "--model", str(model_dir)])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("ringllm: error:")]
    assert code == 1 and len(lines) == 1, err
    return lines[0]


def edit_config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("method,fmt", [("gptq", None), ("awq", None), ("compressed-tensors", "pack-quantized"),
                                        ("compressed-tensors", "naive-quantized"), ("fp8", None)])
def test_other_quantization_is_refused_by_name(fp8, capsys, method, fmt):
    def edit(cfg):
        cfg["quantization_config"] = {"quant_method": method, "format": fmt, "bits": 4}
    edit_config(fp8, edit)
    assert error_line(capsys, fp8) == (
        f"ringllm: error: {fp8}/config.json: quantization '{method}' (format '{fmt}') is not supported; "
        "ringllm reads compressed-tensors float-quantized FP8 (per-channel or per-tensor weight scales) "
        "and fbgemm_fp8 checkpoints")


def test_block_wise_fp8_is_refused(fp8, capsys):
    def edit(cfg):
        w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
        w.update(strategy="block", block_structure=[128, 128])
    edit_config(fp8, edit)
    line = error_line(capsys, fp8)
    assert "quantization 'compressed-tensors' (format 'float-quantized') with weight strategy 'block' in group_0" in line


def _shard_with(d, name):
    return next(s for s in d.glob("*.safetensors") if f'"{name}"'.encode() in s.read_bytes()[:1 << 16])


def test_missing_scale_names_the_tensor(fp8, capsys):
    name = "model.layers.1.self_attn.k_proj.weight_scale"
    rewrite_header(_shard_with(fp8, name), lambda h: h.pop(name))
    assert error_line(capsys, fp8) == (
        f"ringllm: error: {fp8}: tensor {name} is missing (the FP8 weight model.layers.1.self_attn.k_proj.weight "
        "needs its scale)")


def test_scale_of_the_wrong_shape_names_the_tensor(fp8, capsys):
    name = "model.layers.0.mlp.up_proj.weight_scale"

    def edit(h):   # [112, 1] F32 -> [28, 4]: same bytes, a shape no FP8 scale has
        h[name]["shape"] = [28, 4]
    rewrite_header(_shard_with(fp8, name), edit)
    line = error_line(capsys, fp8)
    assert f"tensor {name} has shape [28, 4]; the scale of model.layers.0.mlp.up_proj.weight [112, 64] must be " \
           "[112, 1] (per channel) or [] / [1] (per tensor)" in line


def test_scale_of_the_wrong_dtype_names_the_tensor(fp8, capsys):
    name = "model.layers.0.self_attn.o_proj.weight_scale"

    def edit(h):
        h[name]["dtype"] = "I32"
    rewrite_header(_shard_with(fp8, name), edit)
    assert f"tensor {name} has dtype I32; an FP8 weight scale must be F32, BF16, F16" in error_line(capsys, fp8)


def test_fp8_weights_without_quantization_config(fp8, capsys):
    edit_config(fp8, lambda cfg: cfg.pop("quantization_config"))
    line = error_line(capsys, fp8)
    assert "is F8_E4M3, but config.json has no quantization_config" in line


def test_fp8_norm_is_refused(fp8, capsys):
    """Only Linear weights may be FP8 (with a scale); an FP8 norm is named."""
    name = "model.layers.0.input_layernorm.weight"

    def edit(h):   # [64] BF16 -> [64] F8_E4M3: half its bytes (the rest left as a gap)
        begin = h[name]["data_offsets"][0]
        h[name].update(dtype="F8_E4M3", data_offsets=[begin, begin + 64])
    rewrite_header(_shard_with(fp8, name), edit)
    line = error_line(capsys, fp8)
    assert f"tensor {name} has dtype F8_E4M3; weights must be BF16, F16 or F32, or F8_E4M3 with a scale " \
           "for a Linear weight" in line


def test_asymmetric_fp8_weights_are_refused(fp8, capsys):
    """`symmetric: false` means a zero point per channel, which ringllm's dequantization (data *
    scale) would silently drop: refused in one line naming the group."""
    def edit(cfg):
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    edit_config(fp8, edit)
    line = error_line(capsys, fp8)
    assert line == (f"ringllm: error: {fp8}/config.json: quantization 'compressed-tensors' (format 'float-quantized') "
                    "with asymmetric weights (a zero point) in group_0 is not supported; ringllm reads "
                    "compressed-tensors float-quantized FP8 (per-channel or per-tensor weight scales) and "
                    "fbgemm_fp8 checkpoints"), line
