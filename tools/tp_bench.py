"""The tensor-parallel benchmark (issue #16): batch-1 decode with 1, 2, ... ranks against the
ceiling measured in the same run.

    python -m ringllm.tools.tp_bench --model DIR --out DIR [--ranks 1,2] [--gpu-mem 24GiB]
                                     [--new-tokens 8] [--device cuda] [--set NAME=VALUE ...]

For each rank count N (in --ranks order):
  (a) `ringllm generate --tensor-parallel N` on the same prompt, greedy, DRAM-fed (no preset: a
      ring slot for every streamed layer when DRAM holds them), --gpu-mem per GPU: its decode
      s/token and GPU-resident layers (--metrics-json), and its text;
  (b) the ceiling of that run: every rank's share of every streamed group (checkpoint.sharding,
      the GroupViews the GPU process copies) copied back to back from one pinned host buffer onto
      its GPU, all ranks at once, one thread a rank: the seconds of one pass. Its bytes over its
      seconds are the host DRAM read rate N links drew together (the next bound: N x ~55 GB/s).
Per N: s/token, x the 1-rank run's tokens/s (when 1 is in --ranks), floor/achieved (the copy
ceiling over the s/token), DRAM GB/s of the ceiling, and whether the text equals the first run's.
Writes tp-bench.json (with the card, the command line and every run's metrics) and tp-bench.txt.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "Write a story about a lighthouse keeper."
TARGETS = {2: 1.8, 4: 3.4}      # issue #16: batch-1 tokens/s over one GPU's


def generate(args, world: int, workdir: Path, log) -> tuple[dict, str]:
    """One `ringllm generate --tensor-parallel world`: (its metrics, its text)."""
    from ringllm.checkpoint.errors import RingllmError
    from ringllm.tools.startup_bench import last_line

    metrics, stderr = workdir / f"metrics-{world}.json", workdir / f"stderr-{world}.txt"
    cmd = [sys.executable, "-m", "ringllm", "generate", "--model", str(args.model), "--no-chat", "--prompt", PROMPT,
           "--max-new-tokens", str(args.new_tokens), "--tensor-parallel", str(world), "--metrics-json", str(metrics)]
    for flag, value in (("--gpu-mem", args.gpu_mem), ("--device", args.device), ("--loaders", args.loaders),
                        ("--dtype", args.dtype)):
        if value is not None:
            cmd += [flag, str(value)]
    for item in args.params:
        cmd += ["--set", item]
    log(f"[tp_bench] {world} rank(s): {' '.join(cmd[3:])}")
    with open(stderr, "w") as err:
        try:
            out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
                                 timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            raise RingllmError(f"{world} rank(s): no result within {args.run_timeout:.0f} s") from None
    if out.returncode != 0:
        raise RingllmError(f"{world} rank(s): ringllm generate exited with {out.returncode}: {last_line(stderr)}")
    return json.loads(metrics.read_text()), out.stdout


def rank_runs(layout, plans, world: int, resident: int) -> list[list[tuple[int, int, int]]]:
    """Per rank: (slot offset, buffer offset, bytes) of every copy one pass makes of its share of
    the streamed layers (layers resident.. ; slot offsets within each layer's slot, as the GPU
    process copies them: shm.slot_plan.GroupViews of the rank's shard)."""
    from ringllm.checkpoint.layout import GROUP_KINDS
    from ringllm.checkpoint.sharding import shard_layout
    from ringllm.shm.slot_plan import GroupViews

    out = []
    for rank in range(world):
        shard = shard_layout(layout, rank, world)
        runs = []
        for layer in range(resident, layout.config.num_layers):
            for kind in GROUP_KINDS:
                runs += list(GroupViews.plan(shard.group(layer, kind), plans[layer]).runs)
        out.append(runs)
    return out


def copy_ceiling(layout, world: int, resident: int, device: str, repeats: int = 3) -> dict:
    """One pass of every rank's share, copied at once (a thread a rank) from one pinned buffer the
    size of a ring slot (each layer's copies read the same slot offsets the ring's would) onto
    each rank's GPU: the best of `repeats` passes."""
    import torch

    from ringllm.shm.slot_plan import plan_model, slot_size

    plans = plan_model(layout)
    per_rank = rank_runs(layout, plans, world, resident)
    cuda = device == "cuda"
    host = torch.empty(slot_size(plans), dtype=torch.uint8, pin_memory=cuda)
    host.fill_(1)
    largest = max((max((dst + n for _, dst, n in runs), default=0) for runs in per_rank), default=0)
    devs = [torch.device("cuda", r) if cuda else torch.device("cpu") for r in range(world)]
    bufs = [torch.empty(max(1, largest), dtype=torch.uint8, device=d) for d in devs]
    streams = [torch.cuda.Stream(d) if cuda else None for d in devs]

    def one_rank(r: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        if cuda:
            with torch.cuda.device(devs[r]), torch.cuda.stream(streams[r]):
                for src, dst, n in per_rank[r]:
                    bufs[r][dst:dst + n].copy_(host[src:src + n], non_blocking=True)
            streams[r].synchronize()
        else:
            for src, dst, n in per_rank[r]:
                bufs[r][dst:dst + n].copy_(host[src:src + n])

    times = []
    for _ in range(repeats + 1):          # the first pass warms the copy engines up: not counted
        barrier = threading.Barrier(world + 1)
        threads = [threading.Thread(target=one_rank, args=(r, barrier)) for r in range(world)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    total = sum(n for runs in per_rank for _, _, n in runs)
    return {"seconds": best, "bytes": total, "bytes_per_rank": [sum(n for *_, n in runs) for runs in per_rank],
            "copies_per_rank": [len(runs) for runs in per_rank], "dram_gbps": total / best / 1e9 if best else None}


def tp_bench(args, device: str, log) -> dict:
    import torch

    from ringllm.checkpoint.layout import load_layout

    layout = load_layout(args.model)
    args.device = device
    rows, first_text, one = [], None, None
    for world in args.ranks:
        metrics, text = generate(args, world, args.out, log)
        resident = metrics.get("gpu_resident_layers") or 0
        ceiling = copy_ceiling(layout, world, resident, device)
        spt = metrics.get("seconds_per_token")
        first_text = text if first_text is None else first_text
        row = {"ranks": world, "seconds_per_token": spt, "resident_layers": resident,
               "ceiling": ceiling, "floor_over_achieved": ceiling["seconds"] / spt if spt else None,
               "text_same_as_first": text == first_text, "text": text, "metrics": metrics}
        if world == 1:
            one = spt
        rows.append(row)
        log(f"[tp_bench] {world} rank(s): {spt if spt is None else round(spt, 4)} s/token, {resident} resident, ceiling "
            f"{ceiling['seconds']:.4f} s ({ceiling['dram_gbps']:.1f} GB/s from DRAM)")
    for row in rows:
        spt = row["seconds_per_token"]
        row["speedup_over_1"] = one / spt if one and spt else None
        row["target"] = TARGETS.get(row["ranks"])
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"card": card, "model": str(args.model), "layers": layout.config.num_layers, "device": device,
            "gpu_mem_per_gpu": args.gpu_mem, "new_tokens": args.new_tokens, "prompt": PROMPT, "runs": rows}


def format_table(r: dict) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = [f"tensor parallel on {r['card']}: {r['model']} ({r['layers']} layers), --gpu-mem {r['gpu_mem_per_gpu']} "
             f"per GPU, {r['new_tokens']} new tokens, greedy", "",
             f"{'ranks':>6}{'resident':>10}{'s/token':>10}{'x 1 rank':>10}{'target':>8}{'ceiling s':>11}"
             f"{'floor/ach':>11}{'DRAM GB/s':>11}{'same text':>11}", "-" * 88]
    for row in r["runs"]:
        lines.append(f"{row['ranks']:>6}{row['resident_layers']:>10}{f(row['seconds_per_token'], '10.4f')}"
                     f"{f(row['speedup_over_1'], '10.2f')}{f(row['target'], '8.1f')}"
                     f"{f(row['ceiling']['seconds'], '11.4f')}{f(row['floor_over_achieved'], '11.3f')}"
                     f"{f(row['ceiling']['dram_gbps'], '11.1f')}{'yes' if row['text_same_as_first'] else 'NO':>11}")
    lines += ["", "ceiling: every rank's share of one pass's streamed groups copied at once from pinned DRAM "
                  "(a thread a rank); DRAM GB/s: those bytes over that time",
              f"command: {r.get('command', '')}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.tp_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face Llama model directory")
    ap.add_argument("--out", type=Path, required=True, help="directory for tp-bench.json and tp-bench.txt")
    ap.add_argument("--ranks", default="1,2", help="rank counts to run, comma-separated (default 1,2)")
    ap.add_argument("--gpu-mem", default="24GiB", help="GPU cap per GPU (default 24GiB)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    ap.add_argument("--loaders", type=int, default=None)
    ap.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one generate may take")
    ap.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                    help="an engine parameter by its guide name, for every run")
    ap.set_defaults(preset=None)       # tools.bench.bench_engine reads it; the runs take no preset
    return ap


def main(argv: list[str] | None = None) -> int:
    from ringllm.tools.bench import run_bench_tool

    args = build_parser().parse_args(argv)
    try:
        args.ranks = [int(n) for n in args.ranks.split(",")]
        if not args.ranks or min(args.ranks) < 1:
            raise ValueError
    except ValueError:
        build_parser().error(f"--ranks {args.ranks}: rank counts >= 1, comma-separated")
    # the shared shell's engine only checks --set and --loaders here: each run is its own
    # `ringllm generate`, which gets them as flags
    return run_bench_tool("ringllm.tools.tp_bench", "tp-bench", args, argv,
                          lambda engine, device, log: tp_bench(args, device, log), format_table)

if __name__ == "__main__":
    sys.exit(main())
