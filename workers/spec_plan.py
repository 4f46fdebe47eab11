"""What speculative decoding asks of a run, before it starts: its share of the GPU memory plan
(`SpecPlan`, the one argument every planner call takes) and `--spec-tokens auto` (`choose_spec_tokens`,
from the cost of a verify pass). Torch-free: the supervisor's side plans with it, and so does the
GPU process when it decides its resident layers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ringllm.checkpoint.dtypes import BYTES_OF_NAME
from ringllm.checkpoint.layout import LINEAR_ROLES, ModelLayout

AUTO = "auto"


@dataclass(frozen=True)
class SpecPlan:
    """What a run's speculation adds to the GPU: the verify pass's logits for spec_tokens + 1
    positions, and (--draft-model) the draft model, whole on the device with its own KV cache."""
    spec_tokens: int                          # K: drafts a pass verifies at most
    draft_dir: str | None = None              # None: prompt lookup (nothing on the GPU)
    draft_layout: ModelLayout | None = None

    @property
    def verify_rows(self) -> int:
        return self.spec_tokens + 1


@functools.lru_cache(maxsize=8)
def draft_layout(model_dir: str) -> ModelLayout:
    """The draft model's layout (its safetensors headers), read once per process."""
    from ringllm.checkpoint.layout import load_layout
    return load_layout(model_dir)


def spec_plan(sampling) -> SpecPlan | None:
    """The planners' argument for a run's sampling parameters (None without a draft). Every
    planner call (the pre-run check, the supervisor's estimate, the GPU process's resident
    layers, the auto preset) builds it from the same sampling, so they all plan the same bytes."""
    draft = getattr(sampling, "draft", None)
    if draft is None:
        return None
    model_dir = draft.model_dir
    return SpecPlan(draft.spec_tokens, model_dir, draft_layout(model_dir) if model_dir is not None else None)


# --- --spec-tokens auto ---------------------------------------------------------------------------
# A verify pass over W tokens costs (a roofline per part of the model):
#     max(copy of the streamed bytes, W x their compute) + max(read of the resident bytes, W x their compute)
# The widest pass that costs at most PASS_SLACK x a one-token pass (its draft's time included) is
# nearly free; K = W - 1, rounded down to a power of two, within [MIN_SPEC_TOKENS, the cap].
PASS_SLACK = 1.25
MIN_SPEC_TOKENS = 4          # where nothing is free (cpu): a short chain still pays when drafts are good
DRAFT_MODEL_CAP = 256        # a draft model can grow a chain (or tree) this long
NGRAM_CAP = 32               # prompt lookup copies one earlier passage: its chains are short
ASSUMED_H2D_GBPS = 25.0      # PCIe 4/5 x16 in practice, when --preset auto --measure has not measured it
GPU_MEMORY_GBPS = 3000.0     # HBM read by a batch-1 pass of the resident weights (H100/H200 class)
GPU_FLOPS = {"bfloat16": 300e12, "float16": 300e12, "float32": 30e12}   # dense matmuls, well below peak
CPU_FLOPS_PER_CORE = 20e9
GPU_STEP_OVERHEAD_S = 1e-4   # a draft-model step's launches per layer (eager, batch 1)


def layer_flops_per_token(layout: ModelLayout, layer: int, context: int) -> int:
    """Multiply-adds x 2 of one token through one layer: its Linear weights, plus attention over
    `context` keys (scores and weighted sum)."""
    linear = sum(en.extent.shape[0] * en.extent.shape[1] for g in layout.groups[layer] for en in g.entries
                 if en.role in LINEAR_ROLES and en.part == "weight")
    cfg = layout.config
    return 2 * linear + 4 * cfg.num_heads * cfg.head_dim * context


def _layer_bytes(layout: ModelLayout, layer: int) -> int:
    """One layer's checkpoint bytes (its tensors, without the group buffers' alignment)."""
    return sum(en.extent.nbytes for g in layout.groups[layer] for en in g.entries)


@dataclass(frozen=True)
class PassCost:
    """One verify pass, split into what streams and what stays on the compute device."""
    device: str
    copy_s: float                 # the streamed groups' copy to the device
    streamed_flops: float         # per token
    resident_read_s: float        # the resident weights read once per pass (0 on cpu: counted as compute)
    resident_flops: float         # per token: resident layers + final norm + lm_head
    flops_rate: float
    draft_step_s: float = 0.0     # one step of a draft model (0 for prompt lookup)
    h2d_gbps: float | None = None
    h2d_measured: bool = False
    streamed_bytes: int = 0

    def seconds(self, width: int, drafts: int = 0) -> float:
        streamed = max(self.copy_s, width * self.streamed_flops / self.flops_rate)
        resident = max(self.resident_read_s, width * self.resident_flops / self.flops_rate)
        return streamed + resident + drafts * self.draft_step_s


def pass_cost(layout: ModelLayout, resident_layers: int, device: str, dtype: str, context: int,
              h2d_gbps: float | None = None, cpu_cores: int = 1, draft: ModelLayout | None = None) -> PassCost:
    """The pass-cost model of a run: layers 0..resident_layers-1 stay on the device (the GPU
    process keeps the first ones), the rest stream; `context`: the cache slots attention reads. On cpu every part is compute: there is
    no separate link to hide it under."""
    cfg, n = layout.config, layout.config.num_layers
    kept, streamed = range(resident_layers), range(resident_layers, n)
    head = 2 * cfg.hidden_size * cfg.vocab_size       # every verified position gets its logits
    streamed_flops = sum(layer_flops_per_token(layout, i, context) for i in streamed)
    resident_flops = sum(layer_flops_per_token(layout, i, context) for i in kept) + head
    streamed_bytes = sum(_layer_bytes(layout, i) for i in streamed)
    if device == "cuda":
        rate = GPU_FLOPS.get(dtype, GPU_FLOPS["float32"])
        measured = h2d_gbps is not None
        gbps = h2d_gbps if measured else ASSUMED_H2D_GBPS
        resident_bytes = (sum(_layer_bytes(layout, i) for i in kept)
                          + cfg.vocab_size * cfg.hidden_size * BYTES_OF_NAME[dtype])
        step = 0.0
        if draft is not None:
            d_bytes = sum(_layer_bytes(draft, i) for i in range(draft.config.num_layers))
            step = d_bytes / (GPU_MEMORY_GBPS * 1e9) + draft.config.num_layers * GPU_STEP_OVERHEAD_S
        return PassCost(device, streamed_bytes / (gbps * 1e9), streamed_flops, resident_bytes / (GPU_MEMORY_GBPS * 1e9),
                        resident_flops, rate, step, gbps, measured, streamed_bytes)
    rate = CPU_FLOPS_PER_CORE * max(1, cpu_cores)
    step = 0.0
    if draft is not None:
        d_cfg = draft.config
        step = (sum(layer_flops_per_token(draft, i, context) for i in range(d_cfg.num_layers))
                + 2 * d_cfg.hidden_size * d_cfg.vocab_size) / rate
    return PassCost(device, 0.0, streamed_flops + resident_flops, 0.0, 0.0, rate, step,
                    streamed_bytes=streamed_bytes)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def spec_cap(draft_model: bool, max_new_tokens: int, context_room: int, text_tokens: int) -> tuple[int, str]:
    """The most drafts a pass may verify, and why: the draft's own cap (a draft model's chain or
    tree; prompt lookup copies at most the text there is), never past the last new token nor the
    context left (context_room: slots past prompt + new tokens in the model's and the draft's
    context), at least 1."""
    cap, why = (DRAFT_MODEL_CAP, "the draft model's cap") if draft_model else (NGRAM_CAP, "prompt lookup's cap")
    if not draft_model and text_tokens - 1 < cap:
        cap, why = text_tokens - 1, "all prompt lookup can copy: prompt + new tokens"
    if max_new_tokens - 1 < cap:
        cap, why = max_new_tokens - 1, "--max-new-tokens - 1: drafts past it are cut"
    if context_room < cap:
        cap, why = context_room, "the context left past prompt + new tokens"
    return max(1, cap), why


def choose_spec_tokens(cost: PassCost, draft_model: bool, cap: tuple[int, str]) -> tuple[int, str]:
    """K for `--spec-tokens auto` and why, in one line: the widest pass (a power of two) that
    costs at most PASS_SLACK x a one-token pass, the draft model's steps included, less its
    last token; at least MIN_SPEC_TOKENS, at most the cap (spec_cap)."""
    limit, cap_why = cap
    drafting = (lambda width: width - 1) if draft_model else (lambda width: 0)
    one = cost.seconds(1, 1 if draft_model else 0)
    width = 1
    while width < 2 * DRAFT_MODEL_CAP and cost.seconds(2 * width, drafting(2 * width)) <= PASS_SLACK * one:
        width *= 2
    k = max(1, min(limit, max(MIN_SPEC_TOKENS, width - 1 if width > 1 else 0)))
    if cost.device == "cuda":
        src = "measured" if cost.h2d_measured else "assumed; --preset auto --measure measures it"
        where = (f"a pass copies {cost.streamed_bytes / 1e9:.2f} GB at {cost.h2d_gbps:.0f} GB/s ({src}) in "
                 f"{cost.copy_s * 1e3:.1f} ms, a one-token pass costs {one * 1e3:.1f} ms in all")
    else:
        where = "on cpu a pass is compute: W tokens cost about W times one, nothing hides under a copy"
    floor = f"at least {MIN_SPEC_TOKENS}, " if limit > MIN_SPEC_TOKENS else ""
    return k, f"{where}; {width} token(s) verify within {PASS_SLACK:g}x of it; {floor}at most {limit} ({cap_why})"
