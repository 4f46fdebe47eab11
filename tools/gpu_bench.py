"""The benchmark as run on a GPU machine, in one call (see docs/benchmarks.md):

    python3 -m ringllm.tools.gpu_bench --out OUT_DIR [--scratch /tmp/ringllm-bench] [--layers N]

Makes a Llama-3.1-70B-shaped checkpoint (random bf16 weights) with as many layers as the free
disk allows, then runs `ringllm bench` on it under a 24 GiB GPU cap with the peers, and writes
bench.json, bench.txt and the partial results as it goes into OUT_DIR.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

LAYER_BYTES_70B = 1_711_308_800      # one 70B layer in bf16 (attn 0.30 GB + ffn 1.41 GB)
RESIDENT_BYTES_70B = 2 * 128256 * 8192 * 2


def bench_checkpoint(scratch: Path, layers: int | None = None, max_layers: int = 22,
                     reserve_gb: float = 6.0) -> tuple[Path, float]:
    """The 70B-shaped checkpoint with as many layers as the disk holds (made once, then reused);
    returns its directory and the seconds it took to write."""
    from ringllm.tools.make_checkpoint import make_checkpoint

    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free
    layers = layers or int(min(max_layers, (free - reserve_gb * 1e9 - RESIDENT_BYTES_70B) // LAYER_BYTES_70B))
    model = scratch / f"llama70b-{layers}L"
    t0 = time.perf_counter()
    if not (model / "config.json").exists():
        make_checkpoint(model, "llama-3.1-70b", layers, progress=False)
    made = time.perf_counter() - t0
    print(f"[gpu_bench] {layers} layers of 70B shape in {model} ({made:.0f} s to write; "
          f"disk had {free / 1e9:.0f} GB free)", flush=True)
    return model, made


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/ringllm-bench"))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--max-layers", type=int, default=22)
    ap.add_argument("--reserve-gb", type=float, default=6.0)
    ap.add_argument("--decode-tokens", type=int, default=4)
    ap.add_argument("--peers", default="accelerate,naive,airllm")
    ap.add_argument("--gpu-mem", default="24GiB")
    ap.add_argument("--preset", default="conservative")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)

    from ringllm.config import build_config, default_loader_count, parse_bytes
    from ringllm.tools.bench import bench, format_table, save_report

    model, made = bench_checkpoint(args.scratch, args.layers, args.max_layers, args.reserve_gb)

    engine = build_config(preset=args.preset, loaders=default_loader_count(model))
    report = bench(model, "cuda", parse_bytes(args.gpu_mem), engine, decode_tokens=args.decode_tokens,
                   peers=[p for p in args.peers.split(",") if p], partial_json=args.out / "bench-partial.json",
                   log=lambda m: print(m, flush=True))
    report["checkpoint_seconds"] = made
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save_report(args.out, "bench", report, format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
