"""Quantized Linear weights as the model receives them: the stored tensors plus `dense(dtype)`.

A plain tensor is a dense weight; anything else the model gets for a Linear is a QuantizedWeight,
which keeps the checkpoint's bytes (FP8 on the GPU stays FP8: half the bytes of bf16, so twice
the GPU-resident layers) and turns into a dense [out, in] matrix of the compute dtype only when
the model is about to use it (workers.model._w). That dense matrix is the one transient
workspace of one weight that the memory plan counts.

Kinds are chosen by which parts a weight has (checkpoint.layout: GroupEntry.part), so another
format plugs in as another class and one `KINDS` row: GPTQ/AWQ would be
{"qweight", "qzeros", "scales", "g_idx"} -> an int4 group-wise class with its own dense().

Two ways to compute an FP8 Linear (EngineConfig.fp8_matmul, chosen once per run by
choose_fp8_matmul; the model calls `linear` with the choice):

  dequant    data * scale -> a dense weight in the compute dtype -> F.linear. Every device.
  scaled_mm  torch._scaled_mm: the activations quantized per token (row) to e4m3 with a float32
             scale each, fp8 x fp8 on the tensor cores with row-wise scales (the token's, the
             weight's output channel's), bf16 out. No dense workspace; the activations lose
             precision (e4m3 keeps 3 mantissa bits). CUDA sm_89+ (Ada, Hopper, Blackwell) only,
             bf16 compute, every dimension a multiple of 16 (torch's checks).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.quantization import E4M3_MAX, FP8_TAG

log = logging.getLogger("ringllm.fp8")

DEQUANT, SCALED_MM = "dequant", "scaled_mm"
# an all-zero activation row would get scale 0 (0/0 = NaN): its scale is floored, it quantizes to 0
ACTIVATION_AMAX_FLOOR = 1e-12


class QuantizedWeight:
    """A Linear weight stored in fewer bits; `dense(dtype)` gives the [out, in] matrix to compute with."""

    shape: torch.Size

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, dtype: torch.dtype, way: str = DEQUANT) -> torch.Tensor:
        """x @ W.T in the compute dtype. A format with a kernel of its own overrides this."""
        return F.linear(x, self.dense(dtype))

    def to_device(self, device: torch.device, copy: bool = False) -> "QuantizedWeight":
        """The same weight on `device`, still quantized."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class Fp8Weight(QuantizedWeight):
    """float8_e4m3fn data [out, in] and a scale per output channel ([out, 1]) or per tensor ([1, 1]).

    dense = data * scale, computed in the compute dtype: e4m3 values are exact in bf16/fp16/fp32,
    so the only roundings are the scale's to the compute dtype and the product's (compressed-
    tensors multiplies in the scale's dtype, then casts; in float32 the two agree exactly)."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data = data
        # per channel [out] / [out, 1] or per tensor [] / [1] / [1, 1]: a column that broadcasts
        self.scale = scale.reshape(-1, 1)
        self.shape = data.shape

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.data.to(dtype)                 # the one workspace allocation
        return w.mul_(self.scale.to(dtype))

    def matmul(self, x: torch.Tensor, dtype: torch.dtype, way: str = DEQUANT) -> torch.Tensor:
        if way == SCALED_MM:
            return self.scaled_mm(x)
        return F.linear(x, self.dense(dtype))

    def scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in bf16 by torch._scaled_mm (choose_fp8_matmul checked that it
        runs here). out[t, n] = (sum_k x8[t, k] * data[n, k]) * x_scale[t] * scale[n]."""
        lead, k = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, k).float()
        x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=ACTIVATION_AMAX_FLOOR) / E4M3_MAX   # [M, 1]
        x8 = (xf / x_scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)   # row-major [M, in]
        # row-wise scaling wants float32 [1, out]; a per-tensor scale is broadcast to every channel
        w_scale = self.scale.float().reshape(1, -1).expand(1, self.shape[0]).contiguous()
        # data is [out, in] row-major, so data.t() is the column-major [in, out] mat2 must be
        out = torch._scaled_mm(x8, self.data.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
        return out.reshape(*lead, self.shape[0])

    def to_device(self, device: torch.device, copy: bool = False) -> "Fp8Weight":
        return Fp8Weight(self.data.to(device, copy=copy), self.scale.to(device, copy=copy))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def __repr__(self) -> str:
        return f"Fp8Weight({list(self.shape)}, scale {list(self.scale.shape)} {self.scale.dtype})"


# which parts make which kind of weight (GroupEntry.part names, in entry order)
KINDS = {("weight", "weight_scale"): Fp8Weight}


def assemble(parts: dict[str, torch.Tensor]):
    """One Linear's tensors by part -> a plain tensor (dense weight) or its QuantizedWeight."""
    if tuple(parts) == ("weight",):
        return parts["weight"]
    return KINDS[tuple(parts)](*parts.values())


def place(weight, device: torch.device, dtype: torch.dtype, copy: bool = False):
    """A weight moved to `device` for keeping there: a dense tensor in the compute dtype (converted
    once), a quantized one as it is stored (dequantized at each use)."""
    if isinstance(weight, QuantizedWeight):
        return weight.to_device(device, copy)
    return weight.to(device=device, dtype=dtype, copy=copy)


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] matrix to multiply with, in `dtype` (model._w)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dense(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def linear(x: torch.Tensor, weight, dtype: torch.dtype, fp8_matmul: str = DEQUANT) -> torch.Tensor:
    """x @ weight.T in the compute dtype: the one place the model multiplies by a Linear weight.
    fp8_matmul is the way choose_fp8_matmul picked for this run (never "auto" here)."""
    if isinstance(weight, QuantizedWeight):
        return weight.matmul(x, dtype, fp8_matmul)
    return F.linear(x, dense(weight, dtype))


# --- which way an FP8 run computes ------------------------------------------------------------------
def scaled_mm_unavailable(device: torch.device, dtype: torch.dtype, shapes, capability=None) -> str | None:
    """Why torch._scaled_mm cannot compute FP8 Linears of these [out, in] shapes here; None if it
    can. capability: the CUDA device's (major, minor), looked up when not given."""
    if device.type != "cuda":
        return f"{device.type} computes FP8 by dequantizing (torch._scaled_mm here needs a CUDA GPU of sm_89 or newer)"
    if getattr(torch.version, "hip", None):
        return "ROCm uses float8_e4m3fnuz, not the checkpoint's float8_e4m3fn"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    major, minor = capability or torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"sm_{major}{minor} has no FP8 tensor cores (sm_89 or newer: Ada, Hopper, Blackwell)"
    if dtype != torch.bfloat16:
        return f"row-wise scaled torch._scaled_mm writes bfloat16 only; the compute dtype is {str(dtype)[6:]}"
    odd = next((s for s in shapes if s[0] % 16 or s[1] % 16), None)
    if odd is not None:
        return f"a Linear weight of shape {list(odd)} is not a multiple of 16 in both dimensions"
    return None


def fp8_linear_shapes(layout) -> list[tuple[int, int]]:
    """[out, in] of every FP8 Linear weight of one layer (all layers are alike) and of an FP8 lm_head."""
    shapes = [tuple(e.extent.shape) for g in layout.groups[0] for e in g.entries
              if e.part == "weight" and e.extent.dtype == FP8_TAG]
    if layout.lm_head_scale is not None:
        shapes.append(tuple(layout.lm_head.shape))
    return shapes


def choose_fp8_matmul(requested: str, layout, device: torch.device, dtype: torch.dtype,
                      capability=None) -> str:
    """EngineConfig.fp8_matmul -> the way this run computes ("dequant" | "scaled_mm"): "auto" is
    dequant for now: scaled_mm quantizes the activations too, and on SmolLM2-135M that cost its
    top-1 agreement with bf16 0.921 -> 0.900 (the issue's bar is 0.92); until an H200 shows what
    it buys (tools/fp8_bench measures both), it is asked for by name. "scaled_mm" asked for where
    it cannot run falls back to dequant with one log line saying why (the run still gives the
    same model's tokens, and a benchmark records the way it ran: gpu_info["fp8_matmul"]). A model
    without FP8 weights: dequant."""
    if requested not in ("auto", DEQUANT, SCALED_MM):
        raise RingllmError(f"fp8_matmul={requested!r}: must be one of auto, {DEQUANT}, {SCALED_MM}")
    if requested in ("auto", DEQUANT) or not layout.quantized:
        return DEQUANT
    why = scaled_mm_unavailable(device, dtype, fp8_linear_shapes(layout), capability)
    if why is None:
        log.info("FP8 Linears: torch._scaled_mm (activations quantized per token to e4m3; fp8_matmul=%s)", requested)
        return SCALED_MM
    if requested == SCALED_MM:
        log.warning("fp8_matmul=scaled_mm: %s; dequantizing FP8 weights instead", why)
    return DEQUANT
