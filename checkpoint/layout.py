"""A Llama checkpoint as groups: per layer an attn group and an ffn group, plus the resident set.

A group is what streams as one unit. Its tensors are packed into one flat byte buffer (on the
GPU, or in host memory for the CPU path) at 256-byte aligned offsets; the model receives views
into that buffer. This module only computes the plan; `checkpoint.weights` makes the views.

    attn group of layer i: input_layernorm, q_proj, k_proj, v_proj, o_proj
    ffn  group of layer i: post_attention_layernorm, gate_proj, up_proj, down_proj
    resident            : embed_tokens, norm, lm_head (absent when tied to embed_tokens)

A quantized Linear weight (checkpoint.quantization) is more than one tensor: its entries share
the role and differ by `part` ("weight", then "weight_scale"), packed one after the other in the
same group, so the scale travels with its weight through the ring slot and group buffer.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.llama_config import LlamaConfig, load_llama_config
from ringllm.checkpoint.dtypes import BYTES_OF_TAG, TAG_OF_NAME
from ringllm.checkpoint.quantization import FP8_TAG, QuantFormat, check_fp8_scale, read_quantization, scale_name
from ringllm.checkpoint.safetensors_index import TensorExtent, index_checkpoint

GROUP_ALIGN = 256  # byte alignment of each tensor inside a group buffer (any dtype view is legal)

ATTN_ROLES = ("input_norm", "q", "k", "v", "o")
FFN_ROLES = ("post_norm", "gate", "up", "down")
GROUP_KINDS = ("attn", "ffn")
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")

log = logging.getLogger("ringllm")


def align_up(n: int, a: int) -> int:
    """n rounded up to a multiple of a (every alignment in ringllm goes through these two)."""
    return (n + a - 1) // a * a


def align_down(n: int, a: int) -> int:
    return n // a * a


@dataclass(frozen=True)
class GroupEntry:
    role: str
    extent: TensorExtent
    buf_offset: int        # where this tensor starts inside the group's flat buffer
    part: str = "weight"   # "weight", or a quantized weight's other tensors ("weight_scale")


@dataclass(frozen=True)
class GroupLayout:
    layer: int
    kind: str                      # "attn" | "ffn"
    entries: tuple[GroupEntry, ...]
    nbytes: int                    # flat buffer size

    def entry(self, role: str) -> GroupEntry:
        for e in self.entries:
            if e.role == role:
                return e
        raise KeyError(role)


@dataclass(frozen=True)
class ModelLayout:
    model_dir: Path
    config: LlamaConfig
    dtype: str                      # safetensors tag of every weight that is not quantized (norms, embed):
                                    # the compute dtype `--dtype auto` picks
    groups: tuple[tuple[GroupLayout, GroupLayout], ...]   # [layer] -> (attn, ffn)
    embed: TensorExtent
    final_norm: TensorExtent
    lm_head: TensorExtent | None    # None when tied to embed
    quantization: QuantFormat | None = None     # None: every weight is `dtype`
    lm_head_scale: TensorExtent | None = None   # an FP8 lm_head's scale

    @property
    def quantized(self) -> bool:
        """Some Linear weights are stored quantized (FP8): they reach the model as QuantizedWeight."""
        return any(e.part != "weight" for pair in self.groups for g in pair for e in g.entries) \
            or self.lm_head_scale is not None

    def group(self, layer: int, kind: str) -> GroupLayout:
        return self.groups[layer][GROUP_KINDS.index(kind)]

    @property
    def max_group_bytes(self) -> dict[str, int]:
        return {kind: max(self.group(i, kind).nbytes for i in range(self.config.num_layers))
                for kind in GROUP_KINDS}

    @property
    def streamed_bytes(self) -> int:
        return sum(g.nbytes for pair in self.groups for g in pair)

    def resident_extents(self, layers: int) -> list[TensorExtent]:
        """What the GPU process reads for itself at start, in its order (workers.resident):
        embeddings, final norm, lm_head (and its scale), then layers 0..layers-1 group by group."""
        head = [self.embed, self.final_norm, self.lm_head, self.lm_head_scale]
        return [e for e in head if e is not None] + [
            entry.extent for layer in range(layers) for kind in GROUP_KINDS for entry in self.group(layer, kind).entries]


def _expected_shapes(cfg: LlamaConfig, layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{layer}."
    h, q, kv, ffn = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "input_norm": (p + "input_layernorm.weight", (h,)),
        "q": (p + "self_attn.q_proj.weight", (q, h)),
        "k": (p + "self_attn.k_proj.weight", (kv, h)),
        "v": (p + "self_attn.v_proj.weight", (kv, h)),
        "o": (p + "self_attn.o_proj.weight", (h, q)),
        "post_norm": (p + "post_attention_layernorm.weight", (h,)),
        "gate": (p + "mlp.gate_proj.weight", (ffn, h)),
        "up": (p + "mlp.up_proj.weight", (ffn, h)),
        "down": (p + "mlp.down_proj.weight", (h, ffn)),
    }


class _Checker:
    """Looks tensors up by name and checks shape and dtype, with one error line per problem."""

    def __init__(self, model_dir: Path, tensors: dict[str, TensorExtent], dtype: str | None,
                 quantization: QuantFormat | None):
        self.model_dir, self.tensors, self.dtype = model_dir, tensors, dtype
        self.quantization = quantization

    def linear(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, TensorExtent]]:
        """A Linear weight as (part, extent): the weight alone, or an FP8 weight and its scale."""
        ext = self.get(name, shape, quantized_ok=True)
        if ext.dtype != FP8_TAG:
            return [("weight", ext)]
        scale = self.tensors.get(scale_name(name))
        check_fp8_scale(ext, scale, self.model_dir)
        return [("weight", ext), ("weight_scale", scale)]

    def get(self, name: str, shape: tuple[int, ...], quantized_ok: bool = False) -> TensorExtent:
        ext = self.tensors.get(name)
        if ext is None:
            raise RingllmError(f"{self.model_dir}: tensor {name} is missing from the checkpoint")
        if ext.shape != shape:
            raise RingllmError(
                f"{ext.path}: tensor {name} has shape {list(ext.shape)}, config.json implies {list(shape)}")
        if ext.dtype == FP8_TAG and quantized_ok:
            if self.quantization is None:
                raise RingllmError(f"{ext.path}: tensor {name} is {FP8_TAG}, but config.json has no "
                                   "quantization_config (an FP8 checkpoint declares compressed-tensors "
                                   "float-quantized or fbgemm_fp8)")
            return ext
        if ext.dtype not in BYTES_OF_TAG:
            also = f", or {FP8_TAG} with a scale for a Linear weight" if quantized_ok or self.quantization else ""
            raise RingllmError(f"{ext.path}: tensor {name} has dtype {ext.dtype}; weights must be BF16, F16 "
                               f"or F32{also}")
        if self.dtype is None:
            self.dtype = ext.dtype
        elif ext.dtype != self.dtype:
            raise RingllmError(
                f"{ext.path}: tensor {name} has dtype {ext.dtype}, but the checkpoint is {self.dtype} "
                "(config.json torch_dtype or the other tensors)")
        return ext


def _pack(layer: int, kind: str, entries: list[tuple[str, str, TensorExtent]]) -> GroupLayout:
    packed, cursor = [], 0
    for role, part, ext in entries:
        packed.append(GroupEntry(role, ext, cursor, part))
        cursor = align_up(cursor + ext.nbytes, GROUP_ALIGN)
    return GroupLayout(layer, kind, tuple(packed), cursor)


def _group_entries(check: _Checker, shapes: dict, roles) -> list[tuple[str, str, TensorExtent]]:
    out = []
    for role in roles:
        if role in LINEAR_ROLES:
            out += [(role, part, ext) for part, ext in check.linear(*shapes[role])]
        else:
            out.append((role, "weight", check.get(*shapes[role])))
    return out


_noted: set[str] = set()


def _note_weight_only(model_dir: Path, quantization: QuantFormat | None) -> None:
    """Say once per directory and process that declared activation/KV quantization is not applied."""
    note = quantization.weight_only_note(str(model_dir / "config.json")) if quantization else None
    if note and str(model_dir) not in _noted:
        _noted.add(str(model_dir))
        log.info(note)


def load_layout(model_dir: Path | str) -> ModelLayout:
    """Read config.json and every shard header; validate names, shapes and dtypes against the config."""
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise RingllmError(f"{model_dir}: is a file; a model directory is expected (the one that holds "
                           "config.json, the *.safetensors files and tokenizer.json)")
    if not model_dir.is_dir():
        raise RingllmError(f"{model_dir}: model directory not found")
    cfg = load_llama_config(model_dir)
    # load_llama_config has read and validated this file; the quantization part is ours
    quantization = read_quantization(json.loads((model_dir / "config.json").read_text()),
                                     model_dir / "config.json")
    tensors = index_checkpoint(model_dir)
    check = _Checker(model_dir, tensors, TAG_OF_NAME.get(cfg.torch_dtype or ""), quantization)
    groups = []
    for layer in range(cfg.num_layers):
        shapes = _expected_shapes(cfg, layer)
        groups.append((_pack(layer, "attn", _group_entries(check, shapes, ATTN_ROLES)),
                       _pack(layer, "ffn", _group_entries(check, shapes, FFN_ROLES))))
    vocab_shape = (cfg.vocab_size, cfg.hidden_size)
    embed = check.get("model.embed_tokens.weight", vocab_shape)
    norm = check.get("model.norm.weight", (cfg.hidden_size,))
    lm_head = lm_head_scale = None
    if not cfg.tie_word_embeddings:
        head = check.linear("lm_head.weight", vocab_shape)
        lm_head, lm_head_scale = head[0][1], (head[1][1] if len(head) > 1 else None)
    extra = [n for n in tensors if n.startswith("model.layers.")
             and not (n.split(".")[2].isdigit() and int(n.split(".")[2]) < cfg.num_layers)]
    if extra:
        raise RingllmError(
            f"{model_dir}: tensor {extra[0]} belongs to a layer beyond num_hidden_layers={cfg.num_layers}")
    if check.dtype is None:   # only possible when every tensor we read is FP8, which embed is not
        raise RingllmError(f"{model_dir}: cannot tell the checkpoint's dtype")
    _note_weight_only(model_dir, quantization)
    return ModelLayout(model_dir, cfg, check.dtype, tuple(groups), embed, norm, lm_head, quantization,
                       lm_head_scale)
