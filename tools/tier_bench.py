"""The tier benchmark (issue #12): disk-fed decode with a ring of half the streamed layers, as a
sliding window and with tiers, against the disk ceiling the loaders measure.

    python -m ringllm.tools.tier_bench --model DIR --out DIR [--device cuda] [--gpu-mem 24GiB]
                                       [--resident-layers R] [--new-tokens N]

In one run:
  (a) the disk ceiling: K loader processes reading the streamed layers' chunks into a scratch
      ring (ringllm.disk_probe), for K in 1, 2, 4, 8 (or --loaders); the best K runs (b) and (c);
  (b) decode with a ring of cap = half the streamed layers (never below the look-ahead W) as a
      sliding window: CPU_PINNED_LAYERS=0, so every pass reads every streamed layer;
  (c) the same ring with tiers: cap - W slots keep their layers in DRAM, W slide
      (CPU_PINNED_LAYERS = cap - W; W = the GPU look-ahead).
Each run starts timing once the ring is full (the GPU process's Mark, after the fill); the disk
bytes are the coordinator's counters since that Mark, over every pass that ran: the prefill
pass included, whose first layers the full ring already holds (a sliding window of cap layers
over S streamed ones reads (N*S - cap) layers in N passes, not N*S), and what the last pass's
window read ahead for a pass that never came. Both shrink per token as --new-tokens grows. Per run:
s/token (decode), disk bytes per token, disk bytes / streamed bytes, floor = disk bytes per
token / the loaders' ceiling, floor/achieved; and the speedup of (c) over (b). Writes
tier-bench.json (with the card, the command line, the ceilings and each run's start-up times)
and tier-bench.txt into --out.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

SLIDING, TIERS = "sliding window", "tiers"


def ring_of_half(streamed: int, lookahead: int, disk_gbps: float | None = None,
                 h2d_gbps: float | None = None) -> tuple[int, int]:
    """(ring slots, pinned slots): half the streamed layers, never fewer than the look-ahead;
    pinned as `--preset auto` pins such a ring (autotune.tier_split: all but the disk window)."""
    from ringllm.autotune import tier_split

    cap = max(lookahead, streamed // 2)
    return cap, tier_split(cap, streamed, lookahead, disk_gbps, h2d_gbps)


def run_metrics(run: dict, streamed_bytes: int, disk_gbps: float) -> dict:
    g = run["gpu"]
    s_per_token = g["decode_seconds"] / g["decode_steps"] if g["decode_steps"] else None
    disk_per_token = run["disk_bytes_timed"] / run["passes"]
    floor = disk_per_token / (disk_gbps * 1e9) if disk_gbps else None
    return {"s_per_token": s_per_token, "disk_bytes_per_token": disk_per_token,
            "disk_over_streamed": disk_per_token / streamed_bytes,
            "floor_s": floor, "floor_over_achieved": floor / s_per_token if floor and s_per_token else None}


def tier_bench(model_dir: Path, device: str, gpu_mem: int, engine, resident: int | None = None,
               new_tokens: int = 8, prompt_tokens: int = 32, loaders_fixed: bool = False, log=print) -> dict:
    import torch

    from ringllm.checkpoint.layout import load_layout
    from ringllm.measure import GIB, drop_page_cache, measure_disk, measure_h2d
    from ringllm.shm.slot_plan import file_table, plan_model
    from ringllm.tools.bench import measure_disk_ceiling, run_ringllm, streamed_bytes
    from ringllm.workers.memory_plan import check_gpu_cap, layers_that_fit, plan_gpu_memory
    from ringllm.workers.weights import torch_dtype

    layout = load_layout(model_dir)
    n = layout.config.num_layers
    dev = torch.device(device)
    dtype_name = str(torch_dtype(layout.dtype)).removeprefix("torch.")
    if resident is None:       # as `ringllm bench` places it: whole layers that fit under the cap
        plan = plan_gpu_memory(layout, engine, 1, prompt_tokens + new_tokens, dtype_name,
                               embed_on_host=dev.type == "cuda")
        check_gpu_cap(plan, gpu_mem, engine)
        resident = layers_that_fit(layout, plan, gpu_mem) if engine.gpu_resident_layers < 0 else engine.gpu_resident_layers
        resident = min(resident, max(0, n - 2))
    lookahead = engine.lookahead_layers
    streamed = n - resident
    if resident < 0 or streamed <= lookahead:
        raise RingllmError(f"--resident-layers {resident}: {streamed} of the {n} layers would stream, but a ring of half "
                           f"of them that slides needs more than the look-ahead of {lookahead} (GPU_AHEAD_LAYERS)")
    copy_bytes = streamed_bytes(layout, resident)
    log(f"[tier_bench] {model_dir}: {n} layers, {resident} on the GPU, {streamed} stream "
        f"({copy_bytes / 1e9:.3f} GB a pass); look-ahead {lookahead}")

    log("[tier_bench] (a) the disk ceiling by the loaders")
    per_count, best = measure_disk_ceiling(layout, resident, engine, [engine.loaders] if loaders_fixed else None,
                                           max_seconds=10.0)
    disk = per_count[best]
    if not loaders_fixed:
        engine = replace(engine, loaders=best)
    drop_page_cache()
    threaded = measure_disk(file_table(plan_model(layout)), best, max_bytes=min(4 * GIB, copy_bytes), max_seconds=6.0)[0]
    h2d = measure_h2d(dev, 8 * GIB if dev.type == "cuda" else GIB // 4)
    ceilings = {"disk_gbps": disk.gbps, "disk_loaders": best, "disk_direct": disk.direct, "disk_bytes": disk.bytes,
                "disk_seconds": disk.seconds, "disk_by_loaders": {k: v.gbps for k, v in per_count.items()},
                "disk_threaded_gbps": threaded, "h2d_gbps": h2d}
    log(f"[tier_bench] disk {disk.gbps:.2f} GB/s with {best} loaders (threaded read {threaded:.2f}); H2D {h2d:.1f} GB/s")
    cap, pinned = ring_of_half(streamed, lookahead, disk.gbps, h2d)
    if pinned == 0:
        raise RingllmError(f"a ring of {cap} slots for {streamed} streamed layers leaves no slot to pin beside the disk "
                           f"window: the tiers would run as the sliding window; stream more layers (fewer resident)")
    log(f"[tier_bench] ring {cap} slots; the tiers pin {pinned}, {cap - pinned} slide")

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, layout.config.vocab_size, (prompt_tokens,), generator=gen).tolist()
    base = replace(engine, cpu_cap=cap, gpu_resident_layers=resident, gpu_mem=gpu_mem)

    def configured(p: int):
        # the water marks follow the disk part (cap - P) +- 3, as the configuration sets them
        return replace(base, cpu_pinned_layers=p, cpu_hwm=cap - p + 3, cpu_lwm=max(0, cap - p - 3))
    runs = {}
    for name, eng in ((SLIDING, configured(0)), (TIERS, configured(pinned))):
        drop_page_cache()
        log(f"[tier_bench] ({'b' if name == SLIDING else 'c'}) {name}: ring {eng.cpu_cap}, CPU_PINNED_LAYERS="
            f"{eng.cpu_pinned_layers}, {new_tokens} new tokens")
        run = run_ringllm(layout, eng, device, dtype_name, prompt, new_tokens)
        run.update(metrics=run_metrics(run, copy_bytes, disk.gbps), engine=asdict(eng))
        runs[name] = run
    b, c = runs[SLIDING]["metrics"]["s_per_token"], runs[TIERS]["metrics"]["s_per_token"]
    return {"model": str(model_dir), "device": device,
            "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "layers": n, "resident_layers": resident, "streamed_layers": streamed, "streamed_bytes_per_pass": copy_bytes,
            "ring_slots": cap, "lookahead": lookahead, "pinned_layers": pinned, "gpu_mem": gpu_mem,
            "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "ceilings": ceilings,
            "speedup_tiers_over_sliding": b / c if b and c else None,
            "same_tokens": runs[SLIDING]["tokens"] == runs[TIERS]["tokens"], "runs": runs}


def format_table(report: dict) -> str:
    c = report["ceilings"]

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = [f"{report['card']}: {report['layers']} layers, {report['resident_layers']} on the GPU, "
             f"{report['streamed_layers']} streamed ({report['streamed_bytes_per_pass'] / 1e9:.3f} GB a pass); ring "
             f"{report['ring_slots']} slots, look-ahead {report['lookahead']}",
             f"disk ceiling (loaders) {c['disk_gbps']:.2f} GB/s with {c['disk_loaders']} loaders "
             f"({'O_DIRECT' if c['disk_direct'] else 'buffered'}; threaded read {c['disk_threaded_gbps']:.2f}); "
             f"H2D {c['h2d_gbps']:.1f} GB/s", "",
             f"{'run':<16}{'pinned':>7}{'s/token':>10}{'disk GB/tok':>13}{'disk/streamed':>15}{'floor s':>10}"
             f"{'floor/ach':>11}{'startup s':>11}{'1st token s':>13}", "-" * 106]
    for name, run in report["runs"].items():
        m, r = run["metrics"], run["result"]
        lines.append(f"{name:<16}{run['engine']['cpu_pinned_layers']:>7}{f(m['s_per_token'], '10.3f')}"
                     f"{m['disk_bytes_per_token'] / 1e9:>13.3f}{m['disk_over_streamed']:>15.3f}{f(m['floor_s'], '10.3f')}"
                     f"{f(m['floor_over_achieved'], '11.3f')}{f(r.get('startup_wall_s'), '11.1f')}"
                     f"{f(r.get('first_token_wall_s'), '13.1f')}")
    lines += ["", f"tiers over the sliding window: {f(report['speedup_tiers_over_sliding'], '.2f')}x; "
                  f"tokens identical: {'yes' if report['same_tokens'] else 'no'}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.tier_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face Llama model directory")
    ap.add_argument("--out", type=Path, required=True, help="directory for tier-bench.json and tier-bench.txt")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--gpu-mem", default="24GiB", help="GPU cap (default 24GiB)")
    ap.add_argument("--resident-layers", type=int, default=None,
                    help="layers kept on the GPU (default: the whole layers that fit under --gpu-mem)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated in each run")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    ap.add_argument("--loaders", type=int, default=None, help="loader processes (default: the best measured)")
    ap.add_argument("--preset", choices=("conservative", "balanced", "aggressive"), default=None)
    ap.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                    help="an engine parameter by its guide name")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 2:
        build_parser().error("--new-tokens: at least 2 (decode is timed from the first token to the last)")
    from ringllm.cli_input import check_model_arg
    from ringllm.config import parse_bytes
    from ringllm.tools.bench import run_bench_tool

    def measure(engine, device, log):
        check_model_arg(args.model)
        return tier_bench(args.model, device, parse_bytes(args.gpu_mem), engine, args.resident_layers, args.new_tokens,
                          args.prompt_tokens, loaders_fixed=args.loaders is not None, log=log)
    return run_bench_tool("ringllm.tools.tier_bench", "tier-bench", args, argv, measure, format_table)


if __name__ == "__main__":
    sys.exit(main())
