"""Quantized Linear weights as the model receives them: the stored tensors plus `dense(dtype)`.

A plain tensor is a dense weight; anything else the model gets for a Linear is a QuantizedWeight,
which keeps the checkpoint's bytes (FP8 on the GPU stays FP8: half the bytes of bf16, so twice
the GPU-resident layers) and turns into a dense [out, in] matrix of the compute dtype only when
the model is about to use it (workers.model._w). That dense matrix is the one transient
workspace of one weight that the memory plan counts.

Kinds are chosen by which parts a weight has (checkpoint.layout: GroupEntry.part), so another
format plugs in as another class and one `KINDS` row: GPTQ/AWQ would be
{"qweight", "qzeros", "scales", "g_idx"} -> an int4 group-wise class with its own dense().
"""
from __future__ import annotations

import torch


class QuantizedWeight:
    """A Linear weight stored in fewer bits; `dense(dtype)` gives the [out, in] matrix to compute with."""

    shape: torch.Size

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

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

    # --- CUDA fast path (not built) -------------------------------------------------------------
    # On Hopper, torch._scaled_mm(x_fp8, data.t(), scale_a=per-token, scale_b=self.scale.t()) would
    # skip the dense workspace: activations quantized per token to e4m3, fp8 x fp8 with row-wise
    # scales, output in bf16. The issue asks to measure it against dequantize-then-matmul on the
    # H200 first (decode is copy-bound either way); model._w is where it would branch.

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
