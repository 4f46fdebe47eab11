"""What the GPU process will allocate on its device, computed before anything starts."""
from __future__ import annotations

from dataclasses import dataclass

from checkpoint.errors import RingllmError
from checkpoint.layout import ModelLayout

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


def check_gpu_cap(plan: GpuMemoryPlan, cap: int | None, engine) -> None:
    if cap is None:
        return
    gib = 2 ** 30
    parts = (f"resident {plan.resident / gib:.2f} + group buffers {plan.group_buffers / gib:.2f} + "
             f"KV cache {plan.kv_cache / gib:.2f} + workspace {plan.workspace / gib:.2f} GiB")
    if plan.minimum > cap:
        raise RingllmError(
            f"--gpu-mem {cap / gib:.2f} GiB is below the minimum working set of {plan.minimum / gib:.2f} GiB "
            f"(one attn and one ffn group buffer; {parts})")
    if plan.total > cap:
        raise RingllmError(
            f"--gpu-mem {cap / gib:.2f} GiB is too small for GPU_MAX_GROUPS={engine.gpu_max_groups} "
            f"({plan.total / gib:.2f} GiB: {parts}); lower GPU_MAX_GROUPS or raise --gpu-mem")
