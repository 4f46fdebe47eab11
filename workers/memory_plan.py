"""What the GPU process will allocate on its device, computed before anything starts."""
from __future__ import annotations

from dataclasses import dataclass

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import ModelLayout

WORKSPACE_SLACK = 256 << 20
ELEM = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class GpuMemoryPlan:
    resident: int        # final norm, lm_head (+ embed table when it is not kept in DRAM)
    group_buffers: int
    min_group_buffers: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.resident + self.group_buffers + self.kv_cache + self.workspace

    @property
    def minimum(self) -> int:
        return self.resident + self.min_group_buffers + self.kv_cache + self.workspace


def plan_gpu_memory(layout: ModelLayout, engine, batch: int, max_seq: int, dtype: str,
                    embed_on_host: bool) -> GpuMemoryPlan:
    cfg, e = layout.config, ELEM[dtype]
    table = cfg.vocab_size * cfg.hidden_size * e
    resident = cfg.hidden_size * e + table + (0 if embed_on_host else table if layout.lm_head else 0)
    sizes = layout.max_group_bytes
    n_attn, n_ffn = engine.group_budget
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * max_seq * cfg.head_dim * e
    workspace = (e * batch * max_seq * (8 * cfg.hidden_size + 3 * cfg.intermediate_size)
                 + 2 * batch * cfg.num_heads * max_seq * cfg.head_dim * e
                 + 2 * 4 * batch * cfg.vocab_size + WORKSPACE_SLACK)
    return GpuMemoryPlan(resident, n_attn * sizes["attn"] + n_ffn * sizes["ffn"],
                         sizes["attn"] + sizes["ffn"], kv, workspace)


def layers_that_fit(layout: ModelLayout, plan: GpuMemoryPlan, budget: int) -> int:
    """How many whole layers can stay on the GPU beside the streaming working set."""
    layer_bytes = max(sum(g.nbytes for g in pair) for pair in layout.groups)
    return max(0, min(layout.config.num_layers, (budget - plan.total) // layer_bytes))


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_gpu_cap(plan: GpuMemoryPlan, cap: int | None, engine) -> None:
    if cap is None:
        return
    parts = (f"resident {fmt_bytes(plan.resident)} + group buffers {fmt_bytes(plan.group_buffers)} + "
             f"KV cache {fmt_bytes(plan.kv_cache)} + workspace {fmt_bytes(plan.workspace)}")
    if plan.minimum > cap:
        raise RingllmError(
            f"--gpu-mem {fmt_bytes(cap)} is below the minimum working set of {fmt_bytes(plan.minimum)} "
            f"(one attn and one ffn group buffer; {parts})")
    if plan.total > cap:
        raise RingllmError(
            f"--gpu-mem {fmt_bytes(cap)} is too small for GPU_MAX_GROUPS={engine.gpu_max_groups} "
            f"({fmt_bytes(plan.total)}: {parts}); lower GPU_MAX_GROUPS or raise --gpu-mem")
