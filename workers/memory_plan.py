"""What the GPU process will allocate on its device, computed before anything starts.

Bytes by kind, as the GPU process really allocates them:
  - group buffers (workers/streaming.py) are raw copies of ring slots: checkpoint bytes, whatever
    the compute dtype;
  - resident weights (embed/norm/lm_head) and GPU-resident layers (workers/resident.py) are
    converted once, at load: compute-dtype bytes; but a quantized (FP8) weight stays as stored,
    so an FP8 layer costs its checkpoint bytes (weights + scales), half of bf16;
  - compute on a weight whose stored dtype differs from the compute dtype (or that is FP8: it is
    dequantized at every use, streamed or resident) converts one weight at a time (model._w): the
    largest weight, in the compute dtype;
  - KV cache and activations: compute dtype;
  - speculation (workers.spec_plan.SpecPlan): a verify pass's logits for every position it
    verifies, and a draft model kept whole on the device (converted as the resident layers are,
    embed and lm_head included) with its own KV cache over the same cache slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.dtypes import BYTES_OF_NAME, QUANTIZED_TORCH_NAME, TAG_OF_NAME
from ringllm.checkpoint.layout import ModelLayout
from ringllm.workers.spec_plan import SpecPlan

WORKSPACE_SLACK = 256 << 20
PREFILL_CHUNK = 512     # the most prompt tokens one pass of the request engine prefills (workers.engine)


@dataclass(frozen=True)
class GpuMemoryPlan:
    resident: int        # final norm, lm_head (+ embed table when it is not kept in DRAM)
    group_buffers: int
    min_group_buffers: int
    kv_cache: int
    workspace: int
    conversion: int = 0        # one streamed weight converted to the compute dtype (0: same dtype)
    layer_bytes: int = 0       # one GPU-resident layer, in the compute dtype (FP8 weights as stored)
    resident_layers: int = 0   # layers GPU_RESIDENT_LAYERS keeps there (0 for auto: see layers_that_fit)
    draft_weights: int = 0     # --draft-model: its weights, whole on the device (embed and lm_head included)
    draft_kv: int = 0          # ... and its KV cache
    draft_dir: str | None = None

    @property
    def resident_layer_bytes(self) -> int:
        return self.resident_layers * self.layer_bytes

    @property
    def total(self) -> int:
        return (self.resident + self.group_buffers + self.kv_cache + self.workspace + self.conversion
                + self.resident_layer_bytes + self.draft)

    @property
    def minimum(self) -> int:
        return (self.resident + self.min_group_buffers + self.kv_cache + self.workspace + self.conversion
                + self.resident_layer_bytes + self.draft)

    @property
    def draft(self) -> int:
        return self.draft_weights + self.draft_kv


def _elements(extent) -> int:
    return math.prod(extent.shape)


def _layer_entry_bytes(entry, elem_bytes: int) -> int:
    """Bytes one tensor takes in a GPU-resident layer (workers.resident.load_groups): converted to
    the compute dtype, unless it belongs to a quantized weight (kept as stored)."""
    if entry.extent.dtype in QUANTIZED_TORCH_NAME or entry.part != "weight":
        return entry.extent.nbytes
    return _elements(entry.extent) * elem_bytes


def _converts(layout: ModelLayout, dtype: str) -> bool:
    """Whether compute on this checkpoint's streamed weights converts them (model._w)."""
    return layout.dtype != TAG_OF_NAME[dtype] or layout.quantized


def draft_model_bytes(draft: ModelLayout, batch: int, max_seq: int, dtype: str) -> tuple[int, int, int]:
    """(weights, KV cache, per-use conversion) of a draft model loaded as the resident engine
    loads a model (workers.resident): the embed table on the device in the compute dtype, the
    final norm, lm_head (none when tied; an FP8 one as stored), every layer converted to the
    compute dtype (FP8 weights as stored); its KV cache over the run's cache slots. An FP8 weight
    is dequantized at each use: one weight (or the FP8 lm_head) in the compute dtype at a time."""
    cfg, e = draft.config, BYTES_OF_NAME[dtype]
    table = cfg.vocab_size * cfg.hidden_size * e
    if draft.lm_head is None:
        head = 0
    elif draft.lm_head_scale is not None:
        head = draft.lm_head.nbytes + draft.lm_head_scale.nbytes
    else:
        head = table
    layers = sum(_layer_entry_bytes(en, e) for pair in draft.groups for g in pair for en in g.entries)
    fp8 = [_elements(en.extent) for pair in draft.groups for g in pair for en in g.entries
           if en.extent.dtype in QUANTIZED_TORCH_NAME]
    if draft.lm_head_scale is not None:
        fp8.append(_elements(draft.lm_head))
    return table + cfg.hidden_size * e + head + layers, cfg.kv_cache_bytes(batch, max_seq, e), max(fp8, default=0) * e


def serve_pass_tokens(max_batch: int, max_context: int, prefill_chunk: int = PREFILL_CHUNK) -> int:
    """The most tokens one pass of the request engine carries (workers.engine): its prefill
    budget, which a pass exceeds by at most a token per prefilling row (each gets one), and a
    decode token for every other row."""
    return min(prefill_chunk + max_batch, max_batch * max_context)


def plan_gpu_memory(layout: ModelLayout, engine, batch: int, max_seq: int, dtype: str,
                    embed_on_host: bool, spec: SpecPlan | None = None,
                    pass_tokens: int | None = None) -> GpuMemoryPlan:
    """batch rows of max_seq cache slots. spec: the run's speculation (workers.spec_plan.spec_plan),
    None without a draft. pass_tokens: the most tokens one forward carries (serve_pass_tokens for
    serve's chunked prefill); None: every row's max_seq at once (generate prefills all its prompts
    in one pass)."""
    cfg, e = layout.config, BYTES_OF_NAME[dtype]
    table = cfg.vocab_size * cfg.hidden_size * e
    if layout.lm_head is None:       # tied: shares the embed table, or its own copy when that is on the host
        head = table if embed_on_host else 0
    elif layout.lm_head_scale is not None:     # FP8 lm_head, kept as stored
        head = layout.lm_head.nbytes + layout.lm_head_scale.nbytes
    else:
        head = table
    resident = cfg.hidden_size * e + (0 if embed_on_host else table) + head
    sizes = layout.max_group_bytes
    n_attn, n_ffn = engine.group_budget
    kv = cfg.kv_cache_bytes(batch, max_seq, e)
    # the largest pass: its tokens' activations; every row's keys and values over all its slots,
    # gathered (serve's rows) and repeated for the query heads; logits: the compute-dtype product
    # and its float32 copy (8 bytes an element covers both in every dtype), one row per prompt, or
    # every position of a verify pass
    tokens = batch * max_seq if pass_tokens is None else pass_tokens
    logit_rows = spec.verify_rows if spec is not None else 1
    workspace = (e * tokens * (8 * cfg.hidden_size + 3 * cfg.intermediate_size)
                 + 2 * batch * (cfg.num_heads + cfg.num_kv_heads) * max_seq * cfg.head_dim * e
                 + 2 * 4 * batch * logit_rows * cfg.vocab_size + WORKSPACE_SLACK)
    entries = [entry for pair in layout.groups for group in pair for entry in group.entries]
    conversion = max(_elements(en.extent) for en in entries) * e if _converts(layout, dtype) and entries else 0
    if layout.lm_head_scale is not None:    # an FP8 lm_head is dequantized whole, at every step
        conversion = max(conversion, _elements(layout.lm_head) * e)
    draft_weights = draft_kv = 0
    if spec is not None and spec.draft_layout is not None:
        # the draft's activations come and go between the target's passes, inside the workspace
        # the target's prefill needs (as many tokens, wider layers); its weights and cache stay
        draft_weights, draft_kv, draft_conversion = draft_model_bytes(spec.draft_layout, batch, max_seq, dtype)
        conversion = max(conversion, draft_conversion)
    layer_bytes = max(sum(_layer_entry_bytes(en, e) for g in pair for en in g.entries) for pair in layout.groups)
    explicit = min(cfg.num_layers, max(0, engine.gpu_resident_layers))
    return GpuMemoryPlan(resident, n_attn * sizes["attn"] + n_ffn * sizes["ffn"],
                         sizes["attn"] + sizes["ffn"], kv, workspace, conversion, layer_bytes, explicit,
                         draft_weights, draft_kv, spec.draft_dir if spec is not None else None)


def layers_that_fit(layout: ModelLayout, plan: GpuMemoryPlan, budget: int) -> int:
    """How many whole layers (converted to the compute dtype, FP8 weights as stored) can stay on
    the GPU beside the streaming working set."""
    return max(0, min(layout.config.num_layers, (budget - plan.total) // plan.layer_bytes))


def planned_resident_layers(layout: ModelLayout, engine, batch: int, max_seq: int, dtype: str,
                            device_type: str, free_bytes: int | None = None,
                            spec: SpecPlan | None = None, pass_tokens: int | None = None) -> int | None:
    """GPU_RESIDENT_LAYERS as the GPU process applies it: the number set, or with -1 (auto) as
    many layers as fit beside the streaming working set, under --gpu-mem when given, else in 90%
    of the free GPU memory; none on cpu. None when that needs the free memory and it is not known
    (before the GPU process starts, on cuda without --gpu-mem)."""
    n = layout.config.num_layers
    if engine.gpu_resident_layers >= 0:
        return min(n, engine.gpu_resident_layers)
    if device_type != "cuda":
        return 0
    if engine.gpu_mem is not None:
        budget = engine.gpu_mem
    elif free_bytes is not None:
        budget = int(0.9 * free_bytes)
    else:
        return None
    plan = plan_gpu_memory(layout, engine, batch, max_seq, dtype, embed_on_host=True, spec=spec,
                           pass_tokens=pass_tokens)
    return layers_that_fit(layout, plan, budget)


def fmt_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20 or n == 0:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"      # a size given in KiB is not "0.0 MiB"


def check_gpu_cap(plan: GpuMemoryPlan, cap: int | None, engine) -> None:
    if cap is None:
        return
    parts = (f"resident {fmt_bytes(plan.resident)} + group buffers {fmt_bytes(plan.group_buffers)} + "
             f"KV cache {fmt_bytes(plan.kv_cache)} + workspace {fmt_bytes(plan.workspace)}")
    if plan.conversion:
        parts += f" + one weight converted to the compute dtype {fmt_bytes(plan.conversion)}"
    if plan.resident_layers:
        parts += (f" + GPU_RESIDENT_LAYERS={plan.resident_layers} x {fmt_bytes(plan.layer_bytes)} "
                  "in the compute dtype (FP8 weights as stored)")
    also = " or GPU_RESIDENT_LAYERS" if plan.resident_layers else ""
    need = plan.total if plan.total > cap else plan.minimum
    if plan.draft and need > cap and need - plan.draft <= cap:
        # what runs fits without the draft: the draft is what to change
        raise RingllmError(
            f"--gpu-mem {fmt_bytes(cap)} cannot hold the draft model {plan.draft_dir}: {fmt_bytes(plan.draft)} "
            f"({plan.draft_weights} bytes of weights in the compute dtype, FP8 as stored, + {plan.draft_kv} bytes "
            f"of KV cache) on top of {fmt_bytes(need - plan.draft)} ({parts}); raise --gpu-mem, use a smaller "
            "draft model or --draft ngram")
    if plan.draft:
        parts += f" + draft model {plan.draft_dir} {fmt_bytes(plan.draft)} (weights and KV cache)"
    if plan.minimum > cap:
        raise RingllmError(
            f"--gpu-mem {fmt_bytes(cap)} is below the minimum working set of {fmt_bytes(plan.minimum)} "
            f"(one attn and one ffn group buffer; {parts})" + ("; lower GPU_RESIDENT_LAYERS" if also else ""))
    if plan.total > cap:
        raise RingllmError(
            f"--gpu-mem {fmt_bytes(cap)} is too small for GPU_MAX_GROUPS={engine.gpu_max_groups} "
            f"({fmt_bytes(plan.total)}: {parts}); lower GPU_MAX_GROUPS{also} or raise --gpu-mem")
