"""The FP8 speed benchmark (issue #13), in one command:

    python -m ringllm.tools.fp8_bench --out OUT [--model BF16_DIR] [--scratch DIR] [--gpu-mem 24GiB]
                                      [--preset conservative] [--ways dequant,scaled_mm]

  1. the bf16 checkpoint: --model, or (without it) a Llama-3.1-70B-shaped one made in --scratch
     with as many layers as the disk holds beside its FP8 copy (tools.gpu_bench.bench_checkpoint);
  2. its FP8 copy (ringllm.convert) in --scratch, or OUT/fp8 without it; the free disk is checked
     first against the copy's exact size (the convert plan: FP8 weights, float32 scales, the rest
     as is);
  3. `ringllm bench`'s ringllm rows (tools.bench, no peers) on the bf16 checkpoint, then on the
     FP8 one once per matmul way (EngineConfig.fp8_matmul), same cap, same preset, and the same
     GPU-resident layers as bf16 got (the same layers stream, so the ratios compare bytes per
     token, not placements). A way the device cannot run is recorded as skipped (cpu: scaled_mm).
  4. fp8-bench.json and fp8-bench.txt in OUT: DRAM-fed decode s/token FP8 / bf16 (the issue's
     target <= 0.55), floor/achieved against the FP8 bytes (>= 0.93), disk-fed disk bytes per
     token FP8 / bf16 (about half), the GPU-resident layers that fit under the cap for each, the
     card and the command.

Every step leaves its result on disk (the checkpoints, OUT/runs/<variant>.json with the full bench
report), and a second run of the same command reuses them: a run cut off by a time limit goes on
where it stopped. A result made with other settings is not reused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

BF16 = "bf16"
WAYS = ("dequant", "scaled_mm")
TARGETS = {"dram_ratio_max": 0.55, "floor_over_achieved_min": 0.93, "disk_bytes_ratio_about": 0.5}
DISK_RESERVE = 1e9           # bytes left free on the scratch file system after the FP8 copy
FP8_COPY_FRACTION = 0.51     # an FP8 layer against its bf16 bytes (weights halved, float32 scales)


def variant_name(way: str | None) -> str:
    return BF16 if way is None else f"fp8 {way}"


# --- the checkpoints ------------------------------------------------------------------------------
def fp8_copy_bytes(src: Path) -> int:
    """Bytes of the FP8 copy `ringllm convert` writes of src: its own plan, from the source headers."""
    from ringllm.checkpoint.safetensors_index import read_safetensors_header, shard_files
    from ringllm.convert import LINEAR, plan_shard

    return sum(t.nbytes for shard in shard_files(src)
               for t in plan_shard(read_safetensors_header(shard).values(), LINEAR.fullmatch))


def bf16_checkpoint(scratch: Path, layers: int | None, max_layers: int, log) -> Path:
    """A 70B-shaped bf16 checkpoint in scratch: the one an earlier run made, or a new one with as
    many layers as the disk holds beside its FP8 copy (about half its layer bytes) and a reserve."""
    from ringllm.tools.gpu_bench import LAYER_BYTES_70B, RESIDENT_BYTES_70B, bench_checkpoint

    made = sorted((p.parent for p in scratch.glob("llama70b-*L/config.json")),
                  key=lambda d: int(d.name.removeprefix("llama70b-").removesuffix("L") or 0))
    if made and layers is None:          # an earlier run's (the disk it took is no longer free)
        log(f"[fp8_bench] reusing {made[-1]}")
        return made[-1]
    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free
    fit = int((free - 2 * DISK_RESERVE - 2 * RESIDENT_BYTES_70B) // (LAYER_BYTES_70B * (1 + FP8_COPY_FRACTION)))
    layers = layers or min(max_layers, fit)
    if layers < 2:
        raise RingllmError(f"--scratch {scratch}: {free / 1e9:.1f} GB free holds no 70B-shaped checkpoint of 2 "
                           f"layers beside its FP8 copy ({LAYER_BYTES_70B * (1 + FP8_COPY_FRACTION) / 1e9:.2f} GB a "
                           f"layer, {2 * RESIDENT_BYTES_70B / 1e9:.1f} GB of embeddings); give --model")
    return bench_checkpoint(scratch, layers, max_layers, reserve_gb=0)[0]


def fp8_checkpoint(src: Path, dst: Path, log) -> Path:
    """dst as src's FP8 copy: reused when an earlier run wrote it (convert renames only a checked
    copy into place), else converted after checking the disk has room for it."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.convert import convert_to_fp8

    if (dst / "config.json").is_file():
        done = load_layout(dst)
        if not done.quantized or done.config != load_layout(src).config:
            raise RingllmError(f"{dst}: exists and is not the FP8 copy of {src}; remove it or choose another --scratch")
        log(f"[fp8_bench] reusing the FP8 copy {dst}")
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    need, free = fp8_copy_bytes(src), shutil.disk_usage(dst.parent).free
    if need + DISK_RESERVE > free:
        raise RingllmError(f"{dst.parent}: the FP8 copy of {src} needs {need / 1e9:.2f} GB (+ {DISK_RESERVE / 1e9:.0f} GB "
                           f"kept free), the file system has {free / 1e9:.2f} GB free")
    t0 = time.perf_counter()
    convert_to_fp8(src, dst, log=lambda m: log(f"[fp8_bench] convert: {m}"))
    log(f"[fp8_bench] converted in {time.perf_counter() - t0:.0f} s")
    return dst


# --- the runs -------------------------------------------------------------------------------------
def layers_fitting(model_dir: Path, engine, gpu_mem: int, device: str, max_seq: int) -> int:
    """Whole layers that stay on the GPU under the cap, as `ringllm bench` places them (before it
    keeps one layer streaming)."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.memory_plan import layers_that_fit, plan_gpu_memory
    from ringllm.workers.weights import torch_dtype

    layout = load_layout(model_dir)
    dtype_name = str(torch_dtype(layout.dtype)).removeprefix("torch.")
    plan = plan_gpu_memory(layout, replace(engine, gpu_resident_layers=-1), 1, max_seq, dtype_name,
                           embed_on_host=device == "cuda")
    return layers_that_fit(layout, plan, gpu_mem)


def why_not(way: str, model_dir: Path, device: str) -> str | None:
    """Why this device cannot run the FP8 checkpoint this way (None: it can)."""
    import torch

    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.quantized import fp8_linear_shapes, scaled_mm_unavailable
    from ringllm.workers.weights import torch_dtype

    if way != "scaled_mm":
        return None
    layout = load_layout(model_dir)
    return scaled_mm_unavailable(torch.device(device), torch_dtype(layout.dtype), fp8_linear_shapes(layout))


def run_variant(name: str, model_dir: Path, engine, settings: dict, runs_dir: Path, log) -> dict:
    """tools.bench on one checkpoint, ringllm rows only; the report is kept in runs_dir and reused
    by a later run with the same settings."""
    from ringllm.tools.bench import bench

    path = runs_dir / f"{name.replace(' ', '-')}.json"
    key = {"model": str(model_dir), "engine": asdict(engine), **settings}
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            log(f"[fp8_bench] {name}: reusing {path}")
            return kept["report"]
    log(f"[fp8_bench] {name}: ringllm bench on {model_dir} (fp8_matmul={engine.fp8_matmul})")
    report = bench(model_dir, settings["device"], settings["gpu_mem"], engine, settings["decode_tokens"],
                   settings["prompt_tokens"], settings["prefill_tokens"], peers=(), log=log,
                   partial_json=runs_dir / f"{name.replace(' ', '-')}-partial.json",
                   loaders_fixed=settings["loaders_fixed"])
    path.write_text(json.dumps({"key": key, "report": report}, indent=1, default=str))
    return report


def summarize(report: dict, way: str | None) -> dict:
    """One variant's raw numbers, from its bench report."""
    rows = {r["name"]: r for r in report["rows"]}
    dram, disk = rows["ringllm decode DRAM-fed"], rows.get("ringllm decode disk-fed")
    disk_run = report["runs"].get("decode disk-fed")
    prefill = next((r for r in report["rows"] if r["name"].startswith("ringllm prefill")), None)
    return {
        "fp8_matmul": way, "ran_as": report["runs"]["decode DRAM-fed"]["gpu_info"].get("fp8_matmul") if way else None,
        "resident_layers": report["resident_layers"], "streamed_layers": report["streamed_layers"],
        "streamed_bytes_per_pass": report["streamed_bytes_per_pass"],
        "dram_s_per_token": dram["seconds"], "dram_floor_s": dram["floor"], "dram_bound": dram["bound"],
        "dram_floor_over_achieved": dram["ratio"], "dram_group_ceiling_ratio": dram["extra"].get("group_ceiling_ratio"),
        "disk_s_per_token": disk["seconds"] if disk else None,
        "disk_bytes_timed": disk_run["disk_bytes_timed"] if disk_run else None,
        "disk_passes": disk_run["passes"] if disk_run else None,
        "disk_bytes_per_token": disk_run["disk_bytes_timed"] / disk_run["passes"] if disk_run else None,
        "prefill_s": prefill["seconds"] if prefill else None,
        "h2d_gbps": report["ceilings"]["h2d_gbps"], "disk_gbps": report["ceilings"]["disk_gbps"],
        "tokens": report["runs"]["decode DRAM-fed"]["tokens"],
    }


def ratio(a, b):
    return a / b if a is not None and b else None


def fp8_bench(bf16_dir: Path, fp8_dir: Path, out: Path, device: str, gpu_mem: int, engine, ways=WAYS,
              decode_tokens: int = 4, prompt_tokens: int = 128, prefill_tokens: int = 2048,
              loaders_fixed: bool = False, log=print, fp8_engine=None) -> dict:
    """fp8_engine: the FP8 runs' engine (default `engine`): the preset's counts doubled
    (tools.bench.bench_engine), its buffers the same bytes as bf16's."""
    import torch

    from ringllm.checkpoint.layout import load_layout

    if load_layout(bf16_dir).quantized:
        raise RingllmError(f"--model {bf16_dir}: already quantized; give the bf16 (or fp16/fp32) checkpoint")
    fp8_dir = fp8_checkpoint(bf16_dir, fp8_dir, log)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    settings = {"device": device, "gpu_mem": gpu_mem, "decode_tokens": decode_tokens, "prompt_tokens": prompt_tokens,
                "prefill_tokens": prefill_tokens, "loaders_fixed": loaders_fixed}
    base = run_variant(BF16, bf16_dir, engine, settings, runs_dir, log)
    variants = {BF16: summarize(base, None)}
    # the FP8 runs keep the layers bf16 kept: the same layers stream, in half the bytes
    fp8_engine = replace(fp8_engine or engine, gpu_resident_layers=base["resident_layers"])
    for way in ways:
        skipped = why_not(way, fp8_dir, device)
        if skipped:
            log(f"[fp8_bench] {variant_name(way)}: skipped ({skipped})")
            variants[variant_name(way)] = {"fp8_matmul": way, "skipped": skipped}
            continue
        report = run_variant(variant_name(way), fp8_dir, replace(fp8_engine, fp8_matmul=way), settings, runs_dir, log)
        variants[variant_name(way)] = summarize(report, way)

    max_seq = max(prompt_tokens + decode_tokens, prefill_tokens + 1)
    b = variants[BF16]
    for name, v in variants.items():
        if name != BF16 and "skipped" not in v:
            v["dram_ratio_to_bf16"] = ratio(v["dram_s_per_token"], b["dram_s_per_token"])
            v["disk_bytes_ratio_to_bf16"] = ratio(v["disk_bytes_per_token"], b["disk_bytes_per_token"])
            v["streamed_bytes_ratio_to_bf16"] = ratio(v["streamed_bytes_per_pass"], b["streamed_bytes_per_pass"])
    measured = {k: v for k, v in variants.items() if k != BF16 and v.get("dram_s_per_token")}
    best = min(measured, key=lambda k: measured[k]["dram_s_per_token"]) if measured else None
    dev = torch.device(device)
    return {"card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "device": device,
            "bf16_model": str(bf16_dir), "fp8_model": str(fp8_dir), "layers": base["layers"], "gpu_mem": gpu_mem,
            "engine": asdict(engine), "fp8_engine": asdict(fp8_engine), **settings,
            "resident_layers_fit": {BF16: layers_fitting(bf16_dir, engine, gpu_mem, device, max_seq),
                                    "fp8": layers_fitting(fp8_dir, fp8_engine, gpu_mem, device, max_seq)},
            "variants": variants, "best_fp8": best, "targets": TARGETS,
            "reports": {k: str(runs_dir / f"{k.replace(' ', '-')}.json") for k in variants if "skipped" not in variants[k]}}


def format_table(r: dict) -> str:
    from ringllm.workers.memory_plan import fmt_bytes

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    b = r["variants"][BF16]
    fit = r["resident_layers_fit"]
    lines = [f"FP8 bench (issue #13) on {r['card']}: {r['bf16_model']} ({r['layers']} layers), --gpu-mem "
             f"{r['gpu_mem'] / 2**30:.1f} GiB",
             f"GPU-resident layers that fit under the cap: bf16 {fit[BF16]}, FP8 {fit['fp8']}; every run below keeps "
             f"{b['resident_layers']} (bf16's placement) and streams {b['streamed_layers']}",
             *([f"look-ahead: bf16 GPU_AHEAD_LAYERS={r['engine']['gpu_ahead_layers']} GPU_MAX_GROUPS="
                f"{r['engine']['gpu_max_groups']}; FP8 {r['fp8_engine']['gpu_ahead_layers']} and "
                f"{r['fp8_engine']['gpu_max_groups']} (the preset's counts in 16-bit layers: the same buffer bytes)"]
               if "fp8_engine" in r else []),
             "", f"{'variant':<16}{'matmul':>10}{'streamed/pass':>15}{'DRAM s/tok':>12}{'x bf16':>8}{'floor/ach':>11}"
             f"{'disk s/tok':>12}{'disk read/tok':>15}{'x bf16':>8}{'prefill s':>11}", "-" * 118]
    for name, v in r["variants"].items():
        if "skipped" in v:
            lines.append(f"{name:<16}{v['fp8_matmul']:>10}  skipped: {v['skipped']}")
            continue
        matmul = v["ran_as"] or "-"
        disk_read = fmt_bytes(v["disk_bytes_per_token"]) if v["disk_bytes_per_token"] is not None else "-"
        lines.append(f"{name:<16}{matmul:>10}{fmt_bytes(v['streamed_bytes_per_pass']):>15}{f(v['dram_s_per_token'], '12.4f')}"
                     f"{f(v.get('dram_ratio_to_bf16', 1.0 if name == BF16 else None), '8.3f')}"
                     f"{f(v['dram_floor_over_achieved'], '11.3f')}{f(v['disk_s_per_token'], '12.4f')}"
                     f"{disk_read:>15}"
                     f"{f(v.get('disk_bytes_ratio_to_bf16', 1.0 if name == BF16 else None), '8.3f')}"
                     f"{f(v['prefill_s'], '11.3f')}")
    t = r["targets"]
    lines += ["", f"targets: DRAM-fed s/token x bf16 <= {t['dram_ratio_max']}; floor/achieved against the FP8 bytes "
                  f">= {t['floor_over_achieved_min']}; disk bytes per token x bf16 about {t['disk_bytes_ratio_about']}"]
    if r["best_fp8"] and r["variants"][r["best_fp8"]].get("dram_ratio_to_bf16") is not None:
        best = r["variants"][r["best_fp8"]]
        ok = (best["dram_ratio_to_bf16"] <= t["dram_ratio_max"],
              (best["dram_floor_over_achieved"] or 0) >= t["floor_over_achieved_min"])
        lines.append(f"faster FP8 way: {best['fp8_matmul']} (DRAM-fed x bf16 {best['dram_ratio_to_bf16']:.3f}: "
                     f"{'met' if ok[0] else 'missed'}; floor/achieved {f(best['dram_floor_over_achieved'], '.3f')}: "
                     f"{'met' if ok[1] else 'missed'})")
    lines.append(f"command: {r.get('command', '')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.fp8_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for fp8-bench.json, fp8-bench.txt, runs/")
    ap.add_argument("--model", type=Path, default=None,
                    help="the bf16 checkpoint (default: a 70B-shaped one made in --scratch, sized to the disk)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="where the FP8 copy (and a made checkpoint) go (default: OUT/fp8 for the copy, "
                         "/tmp/ringllm-bench for a made checkpoint)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the made checkpoint (default: what the disk holds)")
    ap.add_argument("--max-layers", type=int, default=22, help="at most this many layers in a made checkpoint")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--gpu-mem", default="24GiB", help="GPU cap for every run (default 24GiB)")
    ap.add_argument("--preset", choices=("conservative", "balanced", "aggressive"), default="conservative")
    ap.add_argument("--ways", default=",".join(WAYS), help="FP8 matmul ways to run, comma-separated")
    ap.add_argument("--loaders", type=int, default=None, help="loader processes (default: the best measured)")
    ap.add_argument("--decode-tokens", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                    help="an engine parameter by its guide name")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    if not set(ways) <= set(WAYS):
        build_parser().error(f"--ways {args.ways}: from {', '.join(WAYS)}")
    from ringllm.cli_input import check_model_arg
    from ringllm.config import parse_bytes
    from ringllm.tools.bench import bench_engine, run_bench_tool

    def measure(engine, device, log):
        if args.model is None:
            args.model = bf16_checkpoint(args.scratch or Path("/tmp/ringllm-bench"), args.layers, args.max_layers, log)
        check_model_arg(args.model)
        fp8_dir = args.scratch / f"{args.model.name}-fp8" if args.scratch else args.out / "fp8"
        return fp8_bench(args.model, fp8_dir, args.out, device, parse_bytes(args.gpu_mem), engine, ways,
                         args.decode_tokens, args.prompt_tokens, args.prefill_tokens,
                         loaders_fixed=args.loaders is not None, log=log, fp8_engine=bench_engine(args, 2))
    return run_bench_tool("ringllm.tools.fp8_bench", "fp8-bench", args, argv, measure, format_table)


if __name__ == "__main__":
    sys.exit(main())
