"""Quantized checkpoints: which `quantization_config` ringllm reads, and the FP8 tensor rules.

ringllm reads FP8 (e4m3) weights with one scale per output channel or per tensor, as published in
two layouts:

  compressed-tensors, format "float-quantized" (llm-compressor; RedHatAI/neuralmagic FP8 models):
      config.json  quantization_config = {quant_method: "compressed-tensors", format: "float-quantized",
                   config_groups: {group_0: {targets: ["Linear"], weights: {num_bits: 8, type: "float",
                   strategy: "channel" | "tensor", symmetric: true, ...}, input_activations: ...}},
                   ignore: ["lm_head", ...], quantization_status: "compressed"}
  fbgemm_fp8 (Meta's Llama-3.1-405B-FP8):
      config.json  quantization_config = {quant_method: "fbgemm_fp8", modules_to_not_convert: [...]}

  tensors      <module>.weight        F8_E4M3 [out, in]
               <module>.weight_scale  F32/BF16/F16, [out, 1] (per channel) or [] / [1] (per tensor)
               <module>.input_scale   static activation scale (read as weight-only: see below)

    dense weight = weight.to(dtype) * weight_scale     (row i scaled by weight_scale[i])

Activations: the compute stays in the 16-bit (or float32) compute dtype. A checkpoint that
declares FP8 activations (static `input_scale`, or dynamic per-token) runs weight-only: its
weights are exactly the published ones, the activation quantization is not applied (one log line
says so). Which Linear is quantized is read from the tensors themselves (an F8_E4M3 weight needs
its scale), so `ignore` lists and partially quantized models need no name matching.

Anything else quantized (GPTQ, AWQ, int8, block-wise FP8, bitsandbytes, ...) is refused with one
line naming its quant_method and format.
"""
from __future__ import annotations

from dataclasses import dataclass

from ringllm.checkpoint.errors import RingllmError

FP8_TAG = "F8_E4M3"
FP8_TORCH_NAME = "float8_e4m3fn"
E4M3_MAX = 448.0                   # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale"            # q_proj.weight -> q_proj.weight_scale
SCALE_TAGS = ("F32", "BF16", "F16")

SUPPORTED = ("ringllm reads compressed-tensors float-quantized FP8 (per-channel or per-tensor weight scales) "
             "and fbgemm_fp8 checkpoints")


@dataclass(frozen=True)
class QuantFormat:
    """What config.json's quantization_config declares, once accepted."""
    method: str                    # "compressed-tensors" | "fbgemm_fp8"
    fmt: str                       # "float-quantized" | "fbgemm_fp8"
    activations: str | None        # None (weight-only), "static" or "dynamic": run weight-only either way
    kv_cache: bool = False         # a kv_cache_scheme is declared (its scales are not used)

    def weight_only_note(self, where: str) -> str | None:
        """The one log line for a checkpoint that declares more than ringllm applies, else None."""
        declared = []
        if self.activations:
            declared.append(f"{self.activations} FP8 activation scales")
        if self.kv_cache:
            declared.append("an FP8 KV cache")
        if not declared:
            return None
        return (f"{where} declares {' and '.join(declared)}; ringllm runs it weight-only FP8 "
                "(weights dequantized per channel, activations and KV cache in the compute dtype)")


def _refuse(path, method, fmt, why: str = "") -> RingllmError:
    return RingllmError(f"{path}: quantization '{method}' (format '{fmt}'){why} is not supported; {SUPPORTED}")


def _check_scheme(path, name: str, scheme, method, fmt) -> str | None:
    """One compressed-tensors config group: FP8 e4m3 weights, symmetric, per channel or tensor.
    Returns how its activations are quantized (None, "static", "dynamic")."""
    if not isinstance(scheme, dict):
        raise RingllmError(f"{path}: quantization_config.config_groups.{name} is not an object")
    w = scheme.get("weights") or {}
    strategy = w.get("strategy")
    if (w.get("num_bits"), w.get("type")) != (8, "float"):
        raise _refuse(path, method, fmt, f" with {w.get('num_bits')}-bit {w.get('type')} weights in {name}")
    if strategy not in ("channel", "tensor") or w.get("group_size") or w.get("block_structure"):
        raise _refuse(path, method, fmt, f" with weight strategy '{strategy}' in {name} (FP8 per channel "
                                         "or per tensor is read; block-wise and group-wise are not)")
    if w.get("symmetric") is False:
        raise _refuse(path, method, fmt, f" with asymmetric weights (a zero point) in {name}")
    if scheme.get("output_activations"):
        raise _refuse(path, method, fmt, f" with output activation quantization in {name}")
    acts = scheme.get("input_activations")
    if not acts:
        return None
    return "dynamic" if acts.get("dynamic") else "static"


def read_quantization(raw: dict, path) -> QuantFormat | None:
    """config.json (parsed) -> the accepted QuantFormat, None when not quantized; refuses the rest."""
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise RingllmError(f"{path}: quantization_config is not an object")
    method, fmt = q.get("quant_method"), q.get("format")
    if method == "fbgemm_fp8":
        return QuantFormat("fbgemm_fp8", "fbgemm_fp8", "dynamic")
    if method != "compressed-tensors" or fmt != "float-quantized":
        raise _refuse(path, method, fmt)
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise _refuse(path, method, fmt, " without config_groups")
    acts = {_check_scheme(path, name, scheme, method, fmt) for name, scheme in groups.items()}
    activations = "static" if "static" in acts else "dynamic" if "dynamic" in acts else None
    return QuantFormat(method, fmt, activations, kv_cache=bool(q.get("kv_cache_scheme")))


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def check_fp8_scale(weight, scale, where) -> None:
    """An F8_E4M3 weight's scale: present, a float dtype, per output channel or per tensor."""
    if scale is None:
        raise RingllmError(f"{where}: tensor {scale_name(weight.name)} is missing (the FP8 weight "
                           f"{weight.name} needs its scale)")
    out = weight.shape[0]
    if scale.dtype not in SCALE_TAGS:
        raise RingllmError(f"{scale.path}: tensor {scale.name} has dtype {scale.dtype}; an FP8 weight scale "
                           f"must be {', '.join(SCALE_TAGS)}")
    if scale.shape not in ((), (1,), (1, 1), (out,), (out, 1)):
        raise RingllmError(f"{scale.path}: tensor {scale.name} has shape {list(scale.shape)}; the scale of "
                           f"{weight.name} {list(weight.shape)} must be [{out}, 1] (per channel) or [] / [1] "
                           "(per tensor)")
