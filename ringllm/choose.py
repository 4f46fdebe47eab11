"""What a command runs with: the engine parameters from preset < environment < --set < flags
(ringllm.config), the ring fitted to the model (never more slots than streamed layers; without a
preset, a slot for every streamed layer when DRAM allows), and `--preset auto`'s probing of this
machine (GPU memory, DRAM, and with --measure the disk and host-to-GPU GB/s). Each choice is one
printed line."""
from __future__ import annotations

import logging
import sys
from dataclasses import replace

from ringllm.checkpoint.dtypes import NAME_OF_TAG
from ringllm.checkpoint.errors import RingllmError

log = logging.getLogger("ringllm")


def build_engine_config(args, model_dir, max_seq: int = 2048, batch: int = 1, layout=None,
                        device: str | None = None, dtype_name: str | None = None, spec=None,
                        measured: dict | None = None, plan_layout=None, pass_tokens: int | None = None):
    """The engine parameters: preset < environment < --set < flags. Given the model's layout
    (generate), the ring is fitted to the model too: never more slots than layers that stream
    and, without a preset, a slot for every streamed layer when they fit in DRAM (what --preset
    auto does for the ring), else as many slots as DRAM allows with all but a short disk window
    pinned (CPU_PINNED_LAYERS, autotune.tier_split). Each adjustment is one printed line.
    spec: the run's speculation (workers.spec_plan.SpecPlan), planned with the GPU memory;
    measured: filled with what --measure measured ("h2d_gbps"), for --spec-tokens auto;
    plan_layout: the bytes one GPU holds of each layer (a tensor-parallel rank's share), default layout;
    pass_tokens: the most tokens one pass carries (memory_plan.plan_gpu_memory; serve's chunked prefill)."""
    from ringllm.autotune import describe_ring, describe_tiers, final_lines, ring_fit, tier_split
    from ringllm.config import (PRESETS, default_loader_count, env_parameters, parse_bytes, preset_values_for,
                                resolve_config, weight_scale)
    from ringllm.workers.memory_plan import fmt_bytes, planned_resident_layers

    overrides = {}
    for item in args.params:
        name, sep, value = item.partition("=")
        if not sep:
            raise RingllmError(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip()] = value.strip()
    loaders = args.loaders if args.loaders is not None else default_loader_count(model_dir)
    gpu_mem = parse_bytes(args.gpu_mem) if args.gpu_mem is not None else None
    dram_limit = parse_bytes(args.dram_limit) if getattr(args, "dram_limit", None) is not None else None
    common = dict(env=env_parameters(), overrides=overrides, gpu_mem=gpu_mem, dram_limit=dram_limit)
    if layout is None:      # bench: it sizes its own rings
        return resolve_config(preset=args.preset, loaders=loaders, **common).engine
    device = device or ("cuda" if _cuda_available() else "cpu")
    dtype_name = dtype_name or layout_dtype_name(layout)
    auto, preset_values, label = None, None, "--preset auto"
    if args.preset == "auto":
        auto = auto_preset(args, layout, model_dir, device, loaders, gpu_mem, batch, max_seq, dtype_name, spec,
                           plan_layout, pass_tokens)
        if measured is not None and auto.machine.h2d_gbps:
            measured["h2d_gbps"] = auto.machine.h2d_gbps
        preset_values = dict(auto.values)
        auto_loaders = preset_values.pop("loaders")
        loaders = loaders if args.loaders is not None else auto_loaders
    preset = None if args.preset == "auto" else args.preset
    scale = weight_scale(layout)
    if preset in PRESETS and scale > 1:     # the preset's counts are 16-bit layers (config.preset_values_for)
        preset_values, label = preset_values_for(preset, scale), f"--preset {preset} x{scale} (FP8 weights)"
        log.info("--preset %s: its layer and group counts doubled for FP8 weights (half the bytes a layer), so the "
                 "look-ahead and the ring take the same GPU and DRAM bytes as for bf16 layers", preset)
        preset = None
    common.update(preset=preset, loaders=loaders)
    # what streams decides the ring; the settings decide what streams (a first pass, unchecked)
    first_resolved = resolve_config(preset_values=preset_values, check=False, **common)
    first = first_resolved.engine
    n = layout.config.num_layers
    resident = planned_resident_layers(plan_layout or layout, first, batch, max_seq, dtype_name, device, spec=spec,
                                       pass_tokens=pass_tokens)
    streamed = n - resident if resident is not None else n
    fit = None
    if args.preset is None:
        fit = ring_fit(layout, streamed, *_dram_for_ring(args, layout))
        if fit.holds_all and streamed > 0:
            preset_values, label = {"cpu_cap": streamed}, "the default ring"
        elif streamed > 0 and fit.fits >= first.lookahead_layers:
            preset_values, label = {"cpu_cap": fit.fits}, "the default ring"   # DRAM is short: use what it has
        elif streamed > 0 and not first_resolved.user_set("cpu_cap"):
            # the built-in ring would run over what was allowed: not silently
            raise RingllmError(
                f"{fit.room_from}: {fmt_bytes(fit.room)} of DRAM for the ring holds {fit.fits} slot(s) of "
                f"{fmt_bytes(fit.slot_bytes)}, fewer than the {first.lookahead_layers} layers of look-ahead "
                "a ring needs; allow more, or set CPU_CAP_VALUE to choose the ring yourself")
    # Tiers follow the ring that runs (yours included under --preset auto): a ring too short for the
    # streamed set pins all but a disk window. The guide's presets and your own ring keep P = 0.
    derive_pinned = False
    if auto is not None or label == "the default ring":
        ring = resolve_config(preset_values=preset_values, preset_label=label, streamed_layers=streamed,
                              check=False, **common)
        derive_pinned = (not ring.user_set("cpu_pinned_layers")
                         and (auto is not None or ring.origin.get("cpu_cap") == "the default ring"))
        if derive_pinned:
            rates = (auto.machine.disk_gbps, auto.machine.h2d_gbps) if auto is not None else ()
            preset_values = {**preset_values, "cpu_pinned_layers": tier_split(
                ring.engine.cpu_cap, streamed, ring.engine.lookahead_layers, *rates)}
    resolved = resolve_config(preset_values=preset_values, preset_label=label, streamed_layers=streamed, **common)
    for note in resolved.notes:
        log.info("%s", note)
    engine = resolved.engine
    if resolved.origin.get("cpu_cap") == "the default ring":
        unknown = "" if resident is not None else (
            f" (all {n} layers: the GPU process decides at start which stay on the GPU; --gpu-mem or "
            "GPU_RESIDENT_LAYERS makes it known here)")
        log.info("CPU_CAP_VALUE=%d: %s%s. No preset was given; --preset or CPU_CAP_VALUE chooses otherwise",
                 engine.cpu_cap, describe_ring(fit, engine.cpu_cap), unknown)
        if derive_pinned and engine.cpu_cap < streamed:
            log.info("CPU_PINNED_LAYERS=%d: %s", engine.cpu_pinned_layers,
                     describe_tiers(replace(engine, gpu_resident_layers=n - streamed), n, fit.slot_bytes))
    if auto is not None:
        print(f"[ringllm] --preset auto for {model_dir} on {device} (the values that run; 'yours' marks "
              "what you set):", file=sys.stderr)
        for line in final_lines(auto, resolved, n, user_loaders=args.loaders is not None):
            print(f"[ringllm]   {line}", file=sys.stderr)
    return engine


def _dram_for_ring(args, layout) -> tuple[int, str]:
    """(bytes, where from): DRAM the ring may take, min(available - headroom, --dram-limit).
    The limit is what you allow the ring; the headroom guards what the machine has (the same
    headroom as the supervisor's pre-run check, config.dram_headroom, so a ring chosen here
    always passes it)."""
    import psutil

    from ringllm.config import dram_headroom, headroom_text, parse_bytes

    headroom = dram_headroom(layout, getattr(args, "tensor_parallel", 1))
    room = max(0, psutil.virtual_memory().available - headroom)
    limit = getattr(args, "dram_limit", None)
    if limit is not None and parse_bytes(limit) < room:
        return parse_bytes(limit), f"--dram-limit {limit}"
    return room, headroom_text(headroom)


def _dram_limited(args) -> int:
    """What is available, or --dram-limit when lower (half of it is the compute budget on cpu)."""
    import psutil

    from ringllm.config import parse_bytes

    dram = psutil.virtual_memory().available
    if getattr(args, "dram_limit", None) is not None:
        dram = min(dram, parse_bytes(args.dram_limit))
    return dram


def auto_preset(args, layout, model_dir, device: str, loaders: int, gpu_mem: int | None, batch: int,
                max_seq: int, dtype_name: str, spec=None, gpu_layout=None, pass_tokens: int | None = None):
    """--preset auto: measure what is asked, choose (autotune.AutoChoice)."""
    from ringllm.autotune import Machine, auto_tune

    ring_room, room_from = _dram_for_ring(args, layout)
    dram = _dram_limited(args)
    if gpu_mem is not None:
        budget, budget_from = gpu_mem, "--gpu-mem"
    elif device == "cuda":
        budget, budget_from = int(0.9 * _free_gpu_bytes()), "90% of the free GPU memory"
    else:
        budget, budget_from = dram // 2, "half the available DRAM"
    h2d = disk = None
    if args.measure:
        from ringllm.config import EngineConfig
        from ringllm.disk_probe import measure_loader_counts
        from ringllm.shm.slot_plan import plan_model
        # the loader processes themselves, at the engine's chunk size and dispatch depth (no user
        # name sets those), on the checkpoint's layer chunks; a threaded read underestimates them
        plans = plan_model(layout, EngineConfig.merge_gap)
        per = {k: probe.gbps for k, probe in measure_loader_counts(
            plans, (1, 2, 4, 8), EngineConfig.chunk_bytes, EngineConfig.dispatch_depth,
            max_bytes=2 * 2**30, max_seconds=3.0).items()}
        # the most loaders within 10% of the best: the rates are that noisy, and more reads in
        # flight never hurt an NVMe drive
        disk = max(per.values())
        loaders = max(k for k, rate in per.items() if rate >= 0.9 * disk)
        log.info("disk read by the loaders: %s GB/s", ", ".join(f"{k}: {rate:.2f}" for k, rate in per.items()))
        h2d = _measure_h2d(device)
    machine = Machine(budget, ring_room, loaders, h2d, disk, device, budget_from, room_from)
    return auto_tune(layout, machine, batch, max_seq, dtype_name, device == "cuda", spec, gpu_layout, pass_tokens)


def layout_dtype_name(layout) -> str:
    return NAME_OF_TAG[layout.dtype]


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _free_gpu_bytes() -> int:
    """Free GPU memory, asked of a short-lived process: the supervisor keeps no CUDA context."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.mem_get_info()[0])"],
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


def _measure_h2d(device: str) -> float:
    import subprocess
    code = ("import torch; from ringllm.measure import measure_h2d; "
            f"print(measure_h2d(torch.device('{device}'), {8 * 2**30 if device == 'cuda' else 2**30}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])
