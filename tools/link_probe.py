"""Where the copy engine idles: a GPU-machine probe for the last percent of the host-to-GPU link.

    python3 -m ringllm.tools.link_probe --out OUT_DIR [--layers 12] [--resident 2] [--tokens 8]

Writes a Llama-3.1-70B-shaped checkpoint, then in one process tree measures
  1. the single-copy ceiling (8 GiB back to back, tools.bench.measure_h2d),
  2. the group ceiling: back-to-back copies of the real streamed groups on one stream
     (tools.bench.measure_group_copies), what a perfect engine would reach,
  3. ringllm DRAM-fed decode (timing starts once the ring holds every streamed layer) for each
     engine variant asked for, s/token and its ratio to both ceilings,
  4. one profiled run: the gaps between consecutive host-to-device copies on the copy stream
     (the copy engine idle), largest first, with the compute kernels running in them.
Everything goes to OUT_DIR/link_probe.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def copy_gaps(trace_path: str, top: int = 15) -> dict:
    """Idle time of the copy engine between consecutive HtoD copies, from a torch.profiler trace."""
    events = json.load(open(trace_path))["traceEvents"]
    copies = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                    if e.get("ph") == "X" and e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""))
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "")[:60]) for e in events
                     if e.get("ph") == "X" and e.get("cat") == "kernel")
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in zip(copies, copies[1:]) if b[0] > a[1]]
    busy = sum(e - s for s, e in copies)
    span = copies[-1][1] - copies[0][0] if copies else 0.0
    largest = []
    for gap, start, end in sorted(gaps, reverse=True)[:top]:
        inside = [k[2] for k in kernels if k[1] > start and k[0] < end]
        largest.append({"gap_ms": gap / 1e3, "at_ms": (start - copies[0][0]) / 1e3,
                        "kernels_during": len(inside), "first_kernels": sorted(set(inside))[:4]})
    hist = {f">{t}ms": sum(1 for g, _, _ in gaps if g > t * 1e3) for t in (0.05, 0.2, 1, 5, 20)}
    return {"copies": len(copies), "copy_busy_ms": busy / 1e3, "span_ms": span / 1e3,
            "busy_fraction": busy / span if span else None, "idle_ms": (span - busy) / 1e3,
            "gap_histogram": hist, "largest_gaps": largest}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/ringllm-probe"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--resident", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--variants", default="base", help="comma-separated: base, backlog8, groups11, ahead4")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from dataclasses import replace

    from ringllm.checkpoint.layout import load_layout
    from ringllm.config import build_config, default_loader_count
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.measure import measure_group_copies, measure_h2d
    from ringllm.tools.gpu_bench import bench_checkpoint
    from ringllm.workers.generation import SamplingParams

    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    model, made = bench_checkpoint(args.scratch, args.layers)
    layout = load_layout(model)
    n = layout.config.num_layers
    streamed = list(range(args.resident, n))
    base = build_config(preset="conservative", loaders=default_loader_count(model), cpu_cap=len(streamed),
                        gpu_resident_layers=args.resident, cpu_hwm=len(streamed) + 3,
                        cpu_lwm=max(0, len(streamed) - 3))
    variants = {"base": base, "backlog8": replace(base, h2d_backlog_max=8),
                "groups11": replace(base, gpu_max_groups=11, max_cached_layers=8),
                "ahead4": replace(base, gpu_ahead_layers=4, balance_ahead=4, gpu_max_groups=11)}
    dev = torch.device("cuda")
    single = measure_h2d(dev, 8 * 2**30)
    group = measure_group_copies(layout, streamed, dev, base.group_budget)
    pass_bytes = sum(g.nbytes for layer in streamed for g in layout.groups[layer])
    report.update(layers=n, resident=args.resident, streamed_bytes_per_pass=pass_bytes,
                  single_copy_gbps=single, group_ceiling=group, checkpoint_seconds=made, runs={})
    print(f"[probe] single-copy {single:.1f} GB/s, group ceiling {group['gbps']:.1f} GB/s", flush=True)
    prompt = list(range(3, 131))
    for name in args.variants.split(","):
        engine = variants[name]
        for profiled in (False, True):
            trace = str(args.out / f"trace-{name}.json") if profiled else None
            sup = Supervisor(layout, engine, "cuda", "bfloat16", fill_ring_first=True, profile_trace=trace)
            t0 = time.perf_counter()
            res = sup.run([prompt], args.tokens if not profiled else 4, SamplingParams(), (), lambda i, t: None)
            g = res.gpu
            spt = g["decode_seconds"] / g["decode_steps"]
            row = {"s_per_token": spt, "gbps": pass_bytes / spt / 1e9,
                   "ratio_single": pass_bytes / single / 1e9 / spt, "ratio_group": pass_bytes / group["gbps"] / 1e9 / spt,
                   "wait_seconds": g["wait_seconds"], "wall_s": time.perf_counter() - t0,
                   "tokens": res.outputs[0][:8]}
            if profiled:
                row["gaps"] = copy_gaps(trace)
                Path(trace).unlink()
            report["runs"][name + (" profiled" if profiled else "")] = row
            print(f"[probe] {name}{' profiled' if profiled else ''}: {spt:.4f} s/token, {row['gbps']:.1f} GB/s, "
                  f"{row['ratio_group']:.3f} of the group ceiling", flush=True)
            (args.out / "link_probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
