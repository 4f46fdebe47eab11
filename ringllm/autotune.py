"""`--preset auto`: choose the guide's parameters for this machine and this checkpoint.

Inputs: the GPU budget (--gpu-mem, else the free GPU memory), the DRAM available (psutil, or
--dram-limit), the checkpoint's layer sizes, and with --measure the disk and host-to-GPU GB/s.
Output: parameter values (applied as the preset: environment variables and --set still win)
and one line of reason per choice.
"""
from __future__ import annotations

from dataclasses import dataclass

from ringllm.checkpoint.layout import ModelLayout
from ringllm.workers.memory_plan import fmt_bytes

GIB = 2 ** 30
DRAM_HEADROOM = 4 * GIB       # left to the OS, the page cache and the processes themselves
GROUP_SHARE = 0.4             # at most this share of the GPU budget goes to streaming buffers


@dataclass(frozen=True)
class Machine:
    gpu_budget: int                   # bytes the GPU process may use
    dram_available: int               # bytes of DRAM the ring may take
    loaders: int
    h2d_gbps: float | None = None     # measured (--measure)
    disk_gbps: float | None = None


def auto_tune(layout: ModelLayout, machine: Machine, batch: int, max_seq: int, dtype: str,
              embed_on_host: bool) -> tuple[dict, list[str]]:
    from ringllm.config import EngineConfig
    from ringllm.workers.memory_plan import layers_that_fit, plan_gpu_memory

    n = layout.config.num_layers
    sizes = layout.max_group_bytes
    layer = sizes["attn"] + sizes["ffn"]
    budget = machine.gpu_budget
    reasons = []
    # 1. the guide's GPU class, then shrink the look-ahead until the buffers fit their share
    if budget >= 70 * GIB:
        ahead, klass = 6, "80 GB class (the guide's aggressive preset)"
    elif budget >= 36 * GIB:
        ahead, klass = 4, "40 GB class (the guide's balanced preset)"
    else:
        ahead, klass = 2, "24 GB class (the guide's conservative preset)"
    class_ahead = ahead
    groups = 2 + 2 * ahead + 1
    while ahead > 1 and ((groups + 1) // 2 * sizes["attn"] + groups // 2 * sizes["ffn"]) > GROUP_SHARE * budget:
        ahead -= 1
        groups = 2 + 2 * ahead + 1
    buffers = (groups + 1) // 2 * sizes["attn"] + groups // 2 * sizes["ffn"]
    reasons.append(f"GPU_AHEAD_LAYERS={ahead}: {fmt_bytes(budget)} GPU budget, {klass}"
                   + (f"; lowered from {class_ahead} so that group buffers stay under 40% of it"
                      if ahead < class_ahead else ""))
    reasons.append(f"GPU_MAX_GROUPS={groups}: 2 + 2x{ahead} + 1, buffers sized by kind = {fmt_bytes(buffers)}")
    # 2. what stays on the GPU
    engine = EngineConfig(gpu_ahead_layers=ahead, gpu_max_groups=groups, max_cached_layers=max(8, groups))
    plan = plan_gpu_memory(layout, engine, batch, max_seq, dtype, embed_on_host)
    resident = layers_that_fit(layout, plan, budget)
    streamed = n - resident
    reasons.append(f"GPU_RESIDENT_LAYERS={resident}: whole layers ({fmt_bytes(layer)} each) that fit beside "
                   f"the buffers, lm_head, KV cache ({fmt_bytes(plan.kv_cache)} for {batch} x {max_seq} "
                   f"tokens) and workspace; {streamed} layer(s) stream")
    # 3. the ring from DRAM
    slot = layer + 2 * 4096
    room = max(0, machine.dram_available - DRAM_HEADROOM)
    cap = max(ahead, int(min(room // slot, streamed)))   # at least the look-ahead (a hard rule)
    if streamed == 0:
        why = "nothing streams; the smallest ring the look-ahead allows"
    elif cap >= streamed:
        why = f"the ring holds every streamed layer ({cap} x {fmt_bytes(slot)}): DRAM-fed after the first pass"
    else:
        why = (f"{fmt_bytes(room)} of DRAM for the ring (available minus {DRAM_HEADROOM // GIB} GiB) holds {cap} "
               f"of the {streamed} streamed layers: disk-fed")
    reasons.append(f"CPU_CAP_VALUE={cap}: {why}")
    offset = min(ahead, max(0, cap - 1))
    reasons.append(f"CPU_RING_OFFSET={offset}: the window starts where the GPU look-ahead ends")
    reasons.append(f"loaders={machine.loaders}: " + (f"the most readers within 10% of the best rate measured on the disk ({machine.disk_gbps:.2f} GB/s)"
                                                    if machine.disk_gbps else "from the CPU count and the disk type"))
    if machine.h2d_gbps:
        copy = streamed * layer / (machine.h2d_gbps * 1e9)
        disk = 0.0 if cap >= streamed else streamed * layer / (machine.disk_gbps * 1e9) if machine.disk_gbps else 0.0
        reasons.append(f"expected floor: {max(copy, disk):.3f} s/token (H2D {machine.h2d_gbps:.1f} GB/s"
                       + (f", disk {machine.disk_gbps:.2f} GB/s" if machine.disk_gbps else "") + ")")
    values = {"gpu_ahead_layers": ahead, "gpu_max_groups": groups, "cpu_cap": cap, "cpu_ring_offset": offset,
              "gpu_resident_layers": resident, "loaders": machine.loaders}
    return values, reasons
