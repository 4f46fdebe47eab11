"""The verification cost curve (issue #14): what one streamed weight pass costs as the number
of tokens it verifies grows.

    python -m ringllm.tools.spec_bench --model DIR --out DIR [--device cuda] [--gpu-mem 24GiB]
                                       [--widths 1,16,64,256,1024] [--repeats 3]

One DRAM-fed run (the ring holds every streamed layer; timing starts once it is full) decodes
speculatively with the bench's width probe (workers.speculation.WidthProbe): pass i verifies
widths[i % len] tokens, the last accepted one plus filler drafts, through the real verification
path (one forward with all logits, the greedy accept). The first round of widths is a warm-up
and is dropped. Per width: the mean seconds of a pass (and the fastest), and its ratio to the
1-token pass (the issue's target: 256 tokens <= 1.15x). Beside them, the ceiling measured in the same run: the
streamed groups copied back to back (measure.measure_group_copies), the floor a pass cannot beat.

Use a random-weight checkpoint (`ringllm make-checkpoint`): its target rejects the filler, so
each pass verifies exactly its width. The figures are costs, never acceptance. Writes
spec-bench.json and spec-bench.txt into --out.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

WIDTHS = (1, 16, 64, 256, 1024)
TARGET_256_OVER_1 = 1.15


def spec_bench(model_dir: Path, device: str, gpu_mem: int | None, engine, widths=WIDTHS, repeats: int = 3,
               prompt_tokens: int = 32, log=print) -> dict:
    import torch

    from ringllm.checkpoint.layout import load_layout
    from ringllm.measure import GIB, measure_group_copies
    from ringllm.tools.bench import run_ringllm, streamed_bytes
    from ringllm.workers.memory_plan import planned_resident_layers
    from ringllm.workers.spec_plan import spec_plan
    from ringllm.workers.speculation import PROBE, DraftParams, SpeculativeSampling, cache_slots
    from ringllm.workers.weights import torch_dtype

    layout = load_layout(model_dir)
    n = layout.config.num_layers
    dev = torch.device(device)
    dtype_name = str(torch_dtype(layout.dtype)).removeprefix("torch.")
    schedule = tuple(widths) * (repeats + 1)            # round 0 warms each width up
    sampling = SpeculativeSampling(draft=DraftParams(PROBE, spec_tokens=max(widths) - 1, probe_widths=schedule))
    sampling.validate()
    new_tokens = len(schedule) + 1                     # the prefill's token, then one per pass
    max_seq = cache_slots(prompt_tokens, new_tokens, sampling)
    if max_seq > layout.config.max_position_embeddings:
        raise RingllmError(f"--widths up to {max(widths)}: {max_seq} positions exceed the model's context of "
                           f"{layout.config.max_position_embeddings} tokens")
    placed = replace(engine, gpu_mem=gpu_mem)
    # planned as a run with this draft is (the widest pass's logits counted: spec_plan)
    resident = planned_resident_layers(layout, placed, 1, max_seq, dtype_name, dev.type,
                                       torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None,
                                       spec=spec_plan(sampling)) or 0
    resident = min(resident, n - 1)                    # something must stream: that is the point
    streamed = n - resident
    copy_bytes = streamed_bytes(layout, resident)
    log(f"[spec_bench] {model_dir}: {n} layers, {resident} on the GPU, {streamed} stream "
        f"({copy_bytes / 1e9:.3f} GB a pass); widths {list(widths)}, {repeats} timed passes each")
    groups = measure_group_copies(layout, list(range(resident, n)), dev, engine.group_budget,
                                  min_bytes=8 * GIB if dev.type == "cuda" else GIB // 4)
    floor = copy_bytes / (groups["gbps"] * 1e9)
    log(f"[spec_bench] group copies back to back: {groups['gbps']:.1f} GB/s, {floor:.3f} s a pass")

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, layout.config.vocab_size, (prompt_tokens,), generator=gen).tolist()
    dram = replace(placed, cpu_cap=max(streamed, engine.lookahead_layers), gpu_resident_layers=resident)
    run = run_ringllm(layout, dram, device, dtype_name, prompt, new_tokens, sampling)
    spec = run["gpu"]["speculation"]
    rows = {row["tokens"]: row for row in spec["verify_by_width"]}
    curve = []
    for w in widths:
        # round 0 dropped: the first pass of each width
        row = rows.get(w, {"passes": 0, "seconds": 0.0, "first_seconds": 0.0, "min_seconds": None})
        timed = row["passes"] - 1
        mean = (row["seconds"] - row["first_seconds"]) / timed if timed > 0 else None
        curve.append({"tokens": w, "passes": max(0, timed), "mean_s": mean, "min_s": row["min_seconds"]})
    one = next((c["mean_s"] for c in curve if c["tokens"] == 1), None)
    for c in curve:
        c.update(over_1_token=c["mean_s"] / one if c["mean_s"] and one else None,
                 floor_over_achieved=floor / c["mean_s"] if c["mean_s"] else None)
    at_256 = next((c["over_1_token"] for c in curve if c["tokens"] == 256), None)
    return {"model": str(model_dir), "device": device,
            "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "layers": n, "resident_layers": resident, "streamed_layers": streamed,
            "streamed_bytes_per_pass": copy_bytes, "gpu_mem": gpu_mem, "widths": list(widths), "repeats": repeats,
            "group_copy_gbps": groups["gbps"], "floor_s": floor, "curve": curve,
            "target_256_over_1": TARGET_256_OVER_1, "met": None if at_256 is None else at_256 <= TARGET_256_OVER_1,
            "verify_by_width": spec["verify_by_width"], "accepted": spec["accepted"], "tokens": run["tokens"],
            "peak_gpu_bytes": run["gpu"].get("peak_gpu_bytes"), "engine": asdict(dram), "result": run["result"]}


def format_table(report: dict) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = [f"{report['card']}: {report['layers']} layers, {report['resident_layers']} on the GPU, "
             f"{report['streamed_layers']} streamed ({report['streamed_bytes_per_pass'] / 1e9:.3f} GB a pass), DRAM-fed",
             f"ceiling: the streamed groups copied back to back at {report['group_copy_gbps']:.1f} GB/s = "
             f"{report['floor_s']:.3f} s a pass", "",
             f"{'tokens verified':>16}{'passes':>8}{'mean s':>10}{'min s':>9}{'x 1-token':>11}{'floor/ach':>11}",
             "-" * 65]
    for c in report["curve"]:
        lines.append(f"{c['tokens']:>16}{c['passes']:>8}{f(c['mean_s'], '10.3f')}{f(c['min_s'], '9.3f')}"
                     f"{f(c['over_1_token'], '11.3f')}{f(c['floor_over_achieved'], '11.3f')}")
    lines += ["", f"target: 256 tokens <= {report['target_256_over_1']}x a 1-token pass: "
                  f"{ {True: 'met', False: 'not met', None: 'not measured'}[report['met']] }"]
    if report["accepted"]:
        lines.append(f"note: {report['accepted']} filler drafts were accepted (a trained model?): those passes "
                     "still verified their full width")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.spec_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Llama model directory (random weights: make-checkpoint)")
    ap.add_argument("--out", type=Path, required=True, help="directory for spec-bench.json and spec-bench.txt")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--gpu-mem", default="24GiB", help="GPU cap (default 24GiB; ignored on cpu)")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="tokens verified per pass, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per width (after one warm-up round)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    ap.add_argument("--loaders", type=int, default=None, help="loader processes (default: ringllm's own)")
    ap.add_argument("--preset", choices=("conservative", "balanced", "aggressive"), default=None)
    ap.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                    help="an engine parameter by its guide name")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        ap.error(f"--widths: comma-separated token counts, got {args.widths!r}")
    if not widths or min(widths) < 1 or 1 not in widths:
        ap.error(f"--widths must be counts >= 1 and include 1 (the pass the others are compared to), got {args.widths!r}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    from ringllm.cli_input import check_model_arg
    from ringllm.config import parse_bytes
    from ringllm.tools.bench import run_bench_tool

    def measure(engine, device, log):
        check_model_arg(args.model)
        return spec_bench(args.model, device, parse_bytes(args.gpu_mem) if device == "cuda" else None, engine,
                          widths, args.repeats, args.prompt_tokens, log=log)
    return run_bench_tool("ringllm.tools.spec_bench", "spec-bench", args, argv, measure, format_table)


if __name__ == "__main__":
    sys.exit(main())
