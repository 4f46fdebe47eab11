"""Start-up: which layers stream, known before any process starts, and the phases of a run's start.

The coordinator starts loading as soon as it runs, on the supervisor's estimate of the
GPU-resident layers: the GPU process needs seconds (6.5 s on an H200 host: torch's import and
CUDA's start) before it can say, and the disk would sit idle meanwhile. The estimate is exact
with GPU_RESIDENT_LAYERS set, with --gpu-mem, and on cpu; on cuda without either it comes from
nvidia-smi's free memory, and the GPU process's own figure (ResidentLayers) corrects it.

`startup_phases` turns the processes' time.monotonic() stamps (one clock for every process) into
seconds from the run's start, for `--metrics-json`'s `startup` object; `first_pass_bar` shows the
first pass's progress on a terminal.
"""
from __future__ import annotations

import os
import subprocess
import sys

from ringllm.workers.memory_plan import planned_resident_layers, serve_pass_tokens

CUDA_CONTEXT_BYTES = 1 << 30     # what the GPU process's CUDA context takes before it measures


def free_gpu_bytes_nvidia_smi(timeout_s: float = 5.0) -> int | None:
    """Free memory of the GPU the GPU process will use (the first visible one), or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits",
                              "-i", visible], capture_output=True, text=True, timeout=timeout_s)
        return int(out.stdout.strip().splitlines()[0]) * 2**20 if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def resident_estimate(layout, engine, batch: int, max_seq: int, dtype: str, device: str,
                      spec=None, serving: bool = False) -> int | None:
    """GPU-resident layers as the GPU process will choose them, or None when unknown. spec: the
    run's workers.spec_plan.SpecPlan, as the GPU process plans with it; serving: `ringllm serve`'s
    batch rows of max_seq slots, whose passes carry at most memory_plan.serve_pass_tokens."""
    pass_tokens = serve_pass_tokens(batch, max_seq) if serving else None
    exact = planned_resident_layers(layout, engine, batch, max_seq, dtype, device, spec=spec, pass_tokens=pass_tokens)
    if exact is not None or device != "cuda":
        return exact
    free = free_gpu_bytes_nvidia_smi()
    if free is None:
        return None
    return planned_resident_layers(layout, engine, batch, max_seq, dtype, device,
                                   max(0, free - CUDA_CONTEXT_BYTES), spec=spec, pass_tokens=pass_tokens)


def startup_phases(run_started: float, gpu: dict, coordinator: dict, first_token_at: float | None,
                   warm: dict | None = None) -> dict:
    """{phase: {"start": s, "seconds": d}} from the run's start, in the order they begin:
      spawn          the run's start -> the GPU process runs, torch imported (6.5 s of an H200 host's
                     start: the coordinator and loaders are reading by then)
      attach         CUDA started, ring mapped, resident layers decided and sent
      fill           the first read job -> every streamed layer has been in the ring once
      warm           the supervisor reading what the GPU process loads itself into the page cache
                     (supervisor.prefetch.WeightWarmer; absent when off)
      register       the first slot pinned for CUDA -> the last (busy_seconds: inside the driver)
      resident_load  embeddings, norms, lm_head and the GPU-resident layers onto the device (the
                     warm-up runs inside it, after lm_head, before the layers)
      warm_up        the kernels' one-time costs, on placeholder weights of layer 0's shape
      first_pass     prefill: the first forward pass, until the first token is sampled
    Phases overlap: fill, register, resident_load and warm_up run side by side."""
    phases = gpu.get("phases") or {}
    out: dict = {}

    def put(name, start, end):
        if start is not None and end is not None:
            out[name] = {"start": round(start - run_started, 4), "seconds": round(end - start, 4)}

    spawn = phases.get("spawn")
    put("spawn", run_started, spawn[1] if spawn else None)
    if "attach" in phases:
        put("attach", *phases["attach"])
    boot = (coordinator or {}).get("startup") or {}
    put("fill", boot.get("first_job_at"), boot.get("filled_at"))
    if warm:
        put("warm", warm.get("started_at"), warm.get("finished_at"))
        if "warm" in out:
            out["warm"]["bytes"] = warm.get("bytes")
    put("register", gpu.get("register_first_at"), gpu.get("register_last_at"))
    for name in ("resident_load", "warm_up", "first_pass"):
        if name in phases:
            put(name, *phases[name])
    if "register" in out:
        out["register"]["busy_seconds"] = round(gpu.get("register_seconds", 0.0), 4)
    if "fill" in out:
        out["fill"]["bytes"] = boot.get("fill_bytes")
    if first_token_at is not None:
        out["first_token_s"] = round(first_token_at - run_started, 4)
    return out


def first_pass_bar(layers: int, layer_now):
    """A progress bar on stderr for the first pass (slow on a big model: the ring fills from disk),
    only on a terminal; layer_now() says where compute is. Returns (update, stop)."""
    if not sys.stderr.isatty():
        return (lambda: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("first pass"), BarColumn(), TextColumn("layer {task.completed:.0f}/{task.total:.0f}"),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("first pass", total=layers)
    bar.start()

    def update():
        bar.update(task, completed=min(layers, layer_now()))
    return update, bar.stop
