"""`--preset auto`: choose the guide's parameters for this machine and this checkpoint.

Inputs: the compute device's memory budget (--gpu-mem, else the free GPU memory; on cpu the
compute device's memory is DRAM), the DRAM available (psutil, or --dram-limit), the checkpoint's
layer sizes, and with --measure the disk and host-to-GPU GB/s. Output: parameter values (applied
as the preset: environment variables and --set still win) and a reason per choice. What is
printed is the final configuration, after the user's settings (`final_lines`).

`ring_fit` and `tier_split` are also the default ring without a preset: the ring holds every
streamed layer when they fit in DRAM; otherwise it takes the DRAM it may, pins what it can
(CPU_PINNED_LAYERS) and slides a short disk window over the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil

from ringllm.checkpoint.layout import ModelLayout
from ringllm.config import DRAM_HEADROOM, GIB, MAX_LOADERS
from ringllm.workers.memory_plan import fmt_bytes

GROUP_SHARE = 0.4             # at most this share of the GPU budget goes to streaming buffers


@dataclass(frozen=True)
class Machine:
    gpu_budget: int                   # bytes the compute process may use on its device
    dram_available: int               # bytes of DRAM the ring may take: min(available - headroom, --dram-limit)
    loaders: int
    h2d_gbps: float | None = None     # measured (--measure)
    disk_gbps: float | None = None
    device: str = "cuda"
    budget_from: str = "--gpu-mem"    # where gpu_budget came from, for the printed reason
    dram_from: str = f"available minus {DRAM_HEADROOM // GIB} GiB"   # where dram_available came from


@dataclass(frozen=True)
class RingFit:
    streamed: int          # layers that stream (need a ring slot)
    slot_bytes: int
    room: int              # DRAM the ring may take (min(available - DRAM_HEADROOM, --dram-limit))
    fits: int              # ring slots that fit in room, at most `streamed`
    room_from: str = f"available minus {DRAM_HEADROOM // GIB} GiB"

    @property
    def holds_all(self) -> bool:
        return self.fits >= self.streamed


def ring_fit(layout: ModelLayout, streamed: int, room: int,
             room_from: str = f"available minus {DRAM_HEADROOM // GIB} GiB") -> RingFit:
    """How much of the streamed set a ring can hold in `room` bytes, sized exactly as the
    supervisor allocates it (slot size, header). The caller keeps room within what the
    supervisor's check allows (available minus DRAM_HEADROOM)."""
    from ringllm.shm.ring import ring_bytes
    from ringllm.shm.slot_plan import plan_model, slot_size

    slot = slot_size(plan_model(layout))
    room = max(0, room)
    fits = min(streamed, room // slot)
    while fits > 0 and ring_bytes(fits, slot, MAX_LOADERS) > room:   # the header, for any loader count
        fits -= 1
    return RingFit(streamed, slot, room, fits, room_from)


def describe_ring(fit: RingFit, cap: int) -> str:
    if fit.streamed == 0:
        return "nothing streams; one slot"
    if cap >= fit.streamed:
        return (f"the ring holds every streamed layer ({cap} x {fmt_bytes(fit.slot_bytes)} of the "
                f"{fmt_bytes(fit.room)} of DRAM for the ring, {fit.room_from}): "
                "each layer is read from disk once, decode is DRAM-fed")
    return (f"{fmt_bytes(fit.room)} of DRAM for the ring ({fit.room_from}) holds {cap} "
            f"of the {fit.streamed} streamed layers: disk-fed (see CPU_PINNED_LAYERS)")


def disk_window(lookahead: int, disk_gbps: float | None = None, h2d_gbps: float | None = None) -> int:
    """W, the slots of the disk part when DRAM is short. A slot is busy from its read until the
    GPU has copied it out; for the disk never to wait, another slot must fill while one is
    copied: W >= 1 + ceil(copy time / read time) = 1 + ceil(disk GB/s / H2D GB/s), which is 2
    while H2D is faster than the disk (assumed unmeasured: PCIe moves 25+ GB/s, an NVMe drive
    reads 3-7). And W >= the look-ahead: the GPU may hold that many disk layers at once (the
    config's rule). A slot more would only absorb jitter, and costs a pinned layer, i.e. one
    layer more of disk reading per token."""
    copies_per_read = ceil(disk_gbps / h2d_gbps) if disk_gbps and h2d_gbps else 1
    return max(lookahead, 1 + copies_per_read)


def tier_split(cap: int, streamed: int, lookahead: int, disk_gbps: float | None = None,
               h2d_gbps: float | None = None) -> int:
    """CPU_PINNED_LAYERS for a ring of `cap` slots over `streamed` layers: none when the ring
    holds them all (nothing is evicted anyway) or is too small to keep a disk window beside a
    pinned layer; otherwise every slot but the disk window (`disk_window`). Each pinned layer
    is a layer less read from disk per token."""
    if cap >= streamed:
        return 0
    return max(0, cap - disk_window(lookahead, disk_gbps, h2d_gbps))


def describe_tiers(cfg, n_layers: int, layer_bytes: int, machine: Machine | None = None) -> str:
    """Why CPU_PINNED_LAYERS has the value that runs (cfg: the EngineConfig), in one line."""
    resident = max(0, cfg.gpu_resident_layers)
    streamed = n_layers - resident
    pinned = min(cfg.cpu_pinned_layers, streamed)
    if cfg.cpu_cap >= streamed:
        return "the ring holds every streamed layer: each is read once, nothing needs pinning"
    rates = (machine.disk_gbps, machine.h2d_gbps) if machine is not None else (None, None)
    window = disk_window(cfg.lookahead_layers, *rates)
    if pinned == 0:
        return (f"the ring's {cfg.cpu_cap} slots leave none to pin beside a disk window of {window}: "
                f"all {streamed} streamed layers slide through it and are read from disk every token")
    disk = streamed - pinned
    if all(rates):
        read_ms, copy_ms = (layer_bytes / (r * 1e9) * 1e3 for r in rates)
        busy = (f"a layer reads in {read_ms:.0f} ms at the measured {rates[0]:.2f} GB/s and copies out in "
                f"{copy_ms:.0f} ms at H2D {rates[1]:.1f} GB/s, so {1 + ceil(rates[0] / rates[1])} slots keep the "
                "disk reading")
    else:
        busy = "one slot fills from disk while the GPU copies out of another, so the disk never waits for a slot"
    return (f"layers {resident}..{resident + pinned - 1} stay in the ring for the whole run (read from disk once); "
            f"the other {cfg.cpu_cap - pinned} slots are the window over the {disk} disk-fed layers "
            f"{resident + pinned}..{n_layers - 1}, read every token ({disk} of {streamed} streamed layers, "
            f"{fmt_bytes(disk * layer_bytes)} a token). Window {cfg.cpu_cap - pinned}: at least the look-ahead "
            f"({cfg.lookahead_layers}); {busy}; each slot more would cost a layer of disk reads per token")


@dataclass
class AutoChoice:
    values: dict                                  # field -> value (the preset auto applies)
    reasons: dict                                 # field -> why
    layer_bytes: int = 0
    machine: Machine | None = None
    extra: list = field(default_factory=list)     # lines after the parameters


def auto_tune(layout: ModelLayout, machine: Machine, batch: int, max_seq: int, dtype: str,
              embed_on_host: bool, spec=None, gpu_layout: ModelLayout | None = None,
              pass_tokens: int | None = None) -> AutoChoice:
    """spec: the run's speculation (workers.spec_plan.SpecPlan): its draft model and verify
    logits take their bytes before any layer is kept on the GPU. gpu_layout: what one GPU holds
    of each layer (a tensor-parallel rank's share, checkpoint.sharding); the GPU's buffers and
    resident layers are planned with it, the DRAM ring with the whole layers (default: layout).
    pass_tokens: the most tokens one pass carries (memory_plan.plan_gpu_memory)."""
    whole, layout = layout, gpu_layout or layout
    from ringllm.config import EngineConfig, weight_scale, with_layer_cache_for_groups
    from ringllm.workers.memory_plan import layers_that_fit, plan_gpu_memory

    n = layout.config.num_layers
    sizes = layout.max_group_bytes
    layer = sum(whole.max_group_bytes.values())      # a ring slot's layer: the whole of it
    budget = machine.gpu_budget
    cuda = machine.device == "cuda"
    reasons = {}
    # 1. the guide's GPU class, then shrink the look-ahead until the buffers fit their share
    if budget >= 70 * GIB:
        ahead, klass = 6, "80 GB class (the guide's aggressive preset)"
    elif budget >= 36 * GIB:
        ahead, klass = 4, "40 GB class (the guide's balanced preset)"
    else:
        ahead, klass = 2, "24 GB class (the guide's conservative preset)"
    # counted in 16-bit layers: FP8 layers are half the bytes, so twice as many cover the same
    # copy time in the same buffer bytes (config.preset_values_for)
    scale = weight_scale(layout)
    if scale > 1:
        ahead, klass = ahead * scale, f"{klass}, x{scale} for FP8 layers (half the bytes)"
    class_ahead = ahead
    groups = 2 + 2 * ahead + 1
    while ahead > 1 and ((groups + 1) // 2 * sizes["attn"] + groups // 2 * sizes["ffn"]) > GROUP_SHARE * budget:
        ahead -= 1
        groups = 2 + 2 * ahead + 1
    buffers = (groups + 1) // 2 * sizes["attn"] + groups // 2 * sizes["ffn"]
    memory = (f"GPU budget ({machine.budget_from})" if cuda else
              f"compute-memory budget on cpu, where the compute device's memory is DRAM ({machine.budget_from})")
    reasons["gpu_ahead_layers"] = (f"{fmt_bytes(budget)} {memory}, {klass}"
                                   + (f"; lowered from {class_ahead} so that group buffers stay under 40% of it"
                                      if ahead < class_ahead else ""))
    reasons["gpu_max_groups"] = f"2 + 2x{ahead} + 1, buffers sized by kind = {fmt_bytes(buffers)}"
    # 2. what stays on the compute device for the whole run
    if cuda:
        planned = with_layer_cache_for_groups({"gpu_ahead_layers": ahead, "gpu_max_groups": groups}, scale)
        engine = EngineConfig(**planned)       # the group buffers that will run
        plan = plan_gpu_memory(layout, engine, batch, max_seq, dtype, embed_on_host, spec, pass_tokens)
        resident = layers_that_fit(layout, plan, budget)
        stored = f"{dtype}, FP8 weights as stored" if layout.quantized else dtype
        reasons["gpu_resident_layers"] = (
            f"whole layers ({fmt_bytes(plan.layer_bytes)} each in {stored}) that fit beside the buffers, "
            f"lm_head, KV cache ({fmt_bytes(plan.kv_cache)} for {batch} x {max_seq} tokens)"
            + (f", the draft model {plan.draft_dir} ({fmt_bytes(plan.draft)}: weights {fmt_bytes(plan.draft_weights)}"
               f" + KV cache {fmt_bytes(plan.draft_kv)})" if plan.draft else "")
            + (f" and workspace (verify logits for {spec.verify_rows} positions)" if spec is not None else
               " and workspace")
            + f"; {n - resident} layer(s) stream")
    else:
        resident = 0
        reasons["gpu_resident_layers"] = ("on cpu every layer streams through the ring unless you set "
                                          "GPU_RESIDENT_LAYERS (those layers then stay loaded in the compute process)")
    # 3. the ring from DRAM: every streamed layer if they fit, never fewer slots than the look-ahead needs
    fit = ring_fit(whole, n - resident, machine.dram_available, machine.dram_from)
    cap = max(1, min(ahead, fit.streamed), fit.fits)
    reasons["cpu_cap"] = describe_ring(fit, cap)
    # 4. tiers when the ring is short: pin all but a short disk window (final_lines says why,
    # from the values that run; build_engine_config re-derives it when you set the ring or look-ahead)
    pinned = tier_split(cap, fit.streamed, ahead, machine.disk_gbps, machine.h2d_gbps)
    reasons["loaders"] = (f"the most readers within 10% of the best rate measured on the disk ({machine.disk_gbps:.2f} GB/s)"
                          if machine.disk_gbps else "from the CPU count and the disk type")
    values = with_layer_cache_for_groups({"gpu_ahead_layers": ahead, "gpu_max_groups": groups, "cpu_cap": cap,
                                          "cpu_pinned_layers": pinned, "gpu_resident_layers": resident,
                                          "loaders": machine.loaders}, scale)
    extra = []
    if spec is not None and spec.draft_layout is not None:
        from ringllm.config import EngineConfig
        d = plan_gpu_memory(layout, EngineConfig(), batch, max_seq, dtype, embed_on_host, spec)
        extra.append(f"draft model {d.draft_dir}: {fmt_bytes(d.draft)} ({d.draft} bytes) on the {machine.device} "
                     f"(weights {fmt_bytes(d.draft_weights)} in {dtype}, FP8 as stored, + KV cache "
                     f"{fmt_bytes(d.draft_kv)} for {batch} x {max_seq} tokens), taken from the budget before "
                     "any layer is kept there")
    return AutoChoice(values, reasons, layer, machine, extra)


# what --preset auto prints, in this order: (the guide's name, EngineConfig field)
SHOWN = (("GPU_AHEAD_LAYERS", "gpu_ahead_layers"), ("GPU_MAX_GROUPS", "gpu_max_groups"),
         ("GPU_RESIDENT_LAYERS", "gpu_resident_layers"), ("CPU_CAP_VALUE", "cpu_cap"),
         ("CPU_PINNED_LAYERS", "cpu_pinned_layers"), ("CPU_RING_OFFSET", "cpu_ring_offset"), ("WSM_BALANCE_AHEAD", "balance_ahead"), ("loaders", "loaders"))


def final_lines(choice: AutoChoice, resolved, n_layers: int, user_loaders: bool = False) -> list[str]:
    """One line per parameter with the value that runs (resolved: config.ResolvedConfig, after
    the environment and --set), marking the user's own values."""
    cfg = resolved.engine
    lines = []
    for name, fld in SHOWN:
        value, auto = getattr(cfg, fld), choice.values.get(fld)
        user = "--loaders" if fld == "loaders" and user_loaders else resolved.user_set(fld)
        lowered = "lowered, see above" if any(note.startswith(f"{name}=") for note in resolved.notes) else ""
        if user:
            why = "; ".join(filter(None, [f"auto would choose {auto}" if auto is not None and auto != value else "",
                                          lowered]))
        elif fld == "cpu_ring_offset":
            why = (f"= the look-ahead ({cfg.lookahead_layers} layers): the window starts at the farthest layer "
                   "the GPU process asks for, and the ring reads the layers after it")
        elif fld == "cpu_pinned_layers":
            why = "; ".join(filter(None, [describe_tiers(cfg, n_layers, choice.layer_bytes, choice.machine), lowered]))
        elif fld == "balance_ahead":
            why = "= the look-ahead: group copies are issued as far ahead as the ring is asked for layers"
        elif auto == value:
            why = choice.reasons[fld]
            if fld == "gpu_max_groups" and cfg.gpu_ahead_layers != choice.values["gpu_ahead_layers"]:
                why += f" (sized for auto's look-ahead; GPU_AHEAD_LAYERS={cfg.gpu_ahead_layers} runs)"
        else:
            why = "; ".join(filter(None, [f"auto chose {auto}", lowered]))
        lines.append(f"{name}={value}" + (f" (yours, {user})" if user else "") + (f": {why}" if why else ""))
    m = choice.machine
    if m is not None and m.h2d_gbps:
        streamed = n_layers - max(0, cfg.gpu_resident_layers)
        copy = streamed * choice.layer_bytes / (m.h2d_gbps * 1e9)
        # disk-fed layers per token: the streamed ones the ring neither holds all of nor pins
        disk_layers = 0 if cfg.cpu_cap >= streamed else streamed - min(cfg.cpu_pinned_layers, streamed)
        disk = disk_layers * choice.layer_bytes / (m.disk_gbps * 1e9) if m.disk_gbps else 0.0
        lines.append(f"expected floor: {max(copy, disk):.3f} s/token (H2D {m.h2d_gbps:.1f} GB/s: {copy:.3f} s"
                     + (f"; disk {m.disk_gbps:.2f} GB/s for {disk_layers} of {streamed} streamed layers: {disk:.3f} s"
                        if m.disk_gbps else "") + ")")
    return lines + list(choice.extra)
