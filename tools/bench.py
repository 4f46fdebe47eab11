"""`ringllm bench`: ringllm against the physical floor of this machine, and against the peers.

In one run, first the ceilings of the machine: pinned host-to-device GB/s (8 GiB of back-to-back
copies on one stream), the disk's GB/s as K loader processes read the streamed layers' chunks
into a scratch ring (ringllm.disk_probe; a threaded O_DIRECT read is kept beside it for
comparison: it reads slower than the loaders do), and one layer's compute time (decode at batch 1, and a long prefill). Then ringllm on the checkpoint
under the GPU cap, in two placements:

  DRAM-fed  the ring holds every streamed layer (timing starts once it is full)
  disk-fed  the ring is smaller than the streamed layers, so every pass reads them from disk

    floor per token = max(streamed bytes / H2D GB/s, disk bytes / disk GB/s, layers x compute)

Each row reports seconds per token, effective GB/s, the floor, and floor/achieved. Then the
peers (tools.bench_peers) on the same checkpoint, prompt and cap.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ringllm.checkpoint.layout import ModelLayout
from ringllm.config import EngineConfig
from ringllm.disk_probe import measure_loader_counts
from ringllm.measure import (GIB, drop_page_cache, measure_disk, measure_group_copies, measure_h2d,
                             measure_layer_compute)
from ringllm.shm.slot_plan import file_table, plan_model


@dataclass
class Ceilings:
    device: str
    h2d_gbps: float
    disk_gbps: float          # the loader processes' own rate (disk_probe): the disk floor's ceiling
    disk_direct: bool
    disk_loaders: int
    disk_bytes: int
    layer_decode_ms: float
    layer_prefill_ms: float
    prefill_tokens: int
    # back-to-back copies of the real streamed groups on one stream (measure_group_copies): what a
    # perfect engine would reach, the ceiling decode is judged against
    group_gbps: float = 0.0
    # threads reading whole shards with O_DIRECT, as many as the loaders (measure.measure_disk):
    # for comparison only, it underestimates the disk
    disk_threaded_gbps: float = 0.0


# --- ceilings -----------------------------------------------------------------------------------
def measure_disk_ceiling(layout: ModelLayout, resident: int, engine: EngineConfig, counts=None,
                         max_seconds: float = 6.0):
    """The disk ceiling as the loaders reach it: the streamed layers' chunks read by K loader
    processes at the engine's chunk size and depth, for each K in `counts` (default: 1, 2, 4, 8
    and the engine's; an NVMe drive wants many reads in flight), the page cache dropped before
    each. Returns ({K: DiskProbe}, the best K)."""
    plans = plan_model(layout, engine.merge_gap)[resident:]
    streamed = sum(p.nbytes for p in plans)
    per_count = measure_loader_counts(plans, counts or sorted({1, 2, 4, 8, engine.loaders}), engine.chunk_bytes,
                                      engine.dispatch_depth, max_bytes=min(4 * GIB, streamed), max_seconds=max_seconds)
    return per_count, max(per_count, key=lambda k: per_count[k].gbps)



def bench_engine(args, scale: int = 1):
    """The engine a bench tool runs: --preset (its layer counts x scale for layers `scale` times
    smaller than 16-bit ones: config.preset_values_for) < environment < --set, and --loaders
    (else what the disk the model is on, or will be made on, wants)."""
    from ringllm.config import build_config, default_loader_count, env_parameters, preset_values_for

    overrides = dict(item.partition("=")[::2] for item in args.params)
    where = getattr(args, "model", None) or getattr(args, "scratch", None) or args.out
    return build_config(preset_values=preset_values_for(args.preset, scale) if args.preset else None,
                        env=env_parameters(), overrides=overrides, loaders=args.loaders or default_loader_count(where))


def run_bench_tool(module: str, stem: str, args, argv, measure, format_table) -> int:
    """The command-line shell every bench tool shares: logging, --out created, the engine from
    --preset / --set / --loaders and the environment, the device (--device, else cuda when there
    is one), then measure(engine, device, log) -> report; one `ringllm: error:` line and exit 1 on
    bad input, 130 on Ctrl-C (the runs clean up after themselves); the report saved with the
    command line and the date (save_report)."""
    import shlex
    import time

    from ringllm.checkpoint.errors import RingllmError, report_failure
    from ringllm.workers.process_setup import configure_logging

    configure_logging("[ringllm] %(message)s", False)

    def log(message):
        print(message, file=sys.stderr, flush=True)
    try:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RingllmError(f"--out {args.out}: cannot create it ({err.strerror})") from None
        engine = bench_engine(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        command = shlex.join([sys.executable, "-m", module, *(argv if argv is not None else sys.argv[1:])])
        report = measure(engine, device, log)
    except (RingllmError, KeyboardInterrupt) as err:
        return report_failure(err)
    report.update(command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    save_report(args.out, stem, report, format_table(report))
    return 0


def save_report(out: Path, stem: str, report: dict, table: str) -> None:
    """What every bench tool leaves: OUT/<stem>.json (the whole report), OUT/<stem>.txt (the
    table), and the table on stdout."""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.txt").write_text(table + "\n")
    print(table)


# --- ringllm runs --------------------------------------------------------------------------------
def streamed_bytes(layout: ModelLayout, resident: int) -> int:
    """Weight bytes that cross to the GPU each pass: every layer not kept there."""
    n = layout.config.num_layers
    return sum(e.extent.nbytes for layer in range(n - resident) for g in layout.groups[layer] for e in g.entries)


def run_ringllm(layout, engine: EngineConfig, device: str, dtype: str, prompt, new_tokens: int, sampling=None):
    """One supervised run, greedy unless `sampling` says otherwise, timed once the ring is full."""
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.generation import SamplingParams

    sup = Supervisor(layout, engine, device, dtype, fill_ring_first=True)
    result = sup.run([prompt], new_tokens, sampling or SamplingParams(), (), lambda i, t: None)
    g, c = result.gpu, result.coordinator
    since = c.get("since_mark", c)
    # the rest of RunResult as it is (start-up and wall-clock times, processes, pinned memory)
    rest = {k: v for k, v in asdict(result).items() if k not in ("outputs", "gpu", "coordinator", "gpu_info")}
    return {"tokens": result.outputs[0], "gpu": g, "coordinator": c, "gpu_info": result.gpu_info,
            "passes": new_tokens, "disk_bytes_timed": since.get("disk_bytes", 0),
            "ring": {"slots": engine.cpu_cap, "resident_layers": engine.gpu_resident_layers}, "result": rest}


@dataclass
class Row:
    name: str
    seconds: float | None            # per token (decode) or for the prefill
    floor: float | None
    bound: str = ""
    gbps: float | None = None        # effective GB/s across the relevant link
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self):
        return self.floor / self.seconds if self.floor and self.seconds else None


def floor_of(copy_bytes, disk_bytes, compute_s, c: Ceilings) -> tuple[float, str]:
    terms = {"H2D": copy_bytes / (c.h2d_gbps * 1e9), "disk": disk_bytes / (c.disk_gbps * 1e9),
             "compute": compute_s}
    bound = max(terms, key=terms.get)
    return terms[bound], bound


# --- the whole bench ---------------------------------------------------------------------------
def bench(model_dir: Path, device: str, gpu_mem: int, engine: EngineConfig, decode_tokens: int = 4,
          prompt_tokens: int = 128, prefill_tokens: int = 2048, peers=("accelerate", "naive", "airllm"),
          disk_decode_tokens: int | None = None, log=print, partial_json: Path | None = None,
          loaders_fixed: bool = False) -> dict:
    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.memory_plan import check_gpu_cap, layers_that_fit, plan_gpu_memory
    from ringllm.workers.weights import torch_dtype

    layout = load_layout(model_dir)
    cfg = layout.config
    n = cfg.num_layers
    dev = torch.device(device)
    dtype = torch_dtype(layout.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (prompt_tokens,), generator=gen).tolist()
    long_prompt = torch.randint(3, cfg.vocab_size, (prefill_tokens,), generator=gen).tolist()

    # the placement: what stays on the GPU under the cap, what streams
    max_seq = max(prompt_tokens + decode_tokens, prefill_tokens + 1)
    plan = plan_gpu_memory(layout, engine, 1, max_seq, dtype_name, embed_on_host=dev.type == "cuda")
    check_gpu_cap(plan, gpu_mem, engine)
    resident = layers_that_fit(layout, plan, gpu_mem) if engine.gpu_resident_layers < 0 else engine.gpu_resident_layers
    resident = min(resident, n - 1)          # keep at least one layer streaming: that is what we measure
    streamed = n - resident
    copy_bytes = streamed_bytes(layout, resident)
    log(f"[bench] {model_dir}: {n} layers, {layout.dtype}; under --gpu-mem {gpu_mem / GIB:.1f} GiB "
        f"{resident} stay on the GPU, {streamed} stream ({copy_bytes / 1e9:.2f} GB a pass)")

    log("[bench] measuring ceilings: H2D, disk, layer compute")
    h2d = measure_h2d(dev, 8 * GIB if dev.type == "cuda" else GIB)
    per_count, best = measure_disk_ceiling(layout, resident, engine, [engine.loaders] if loaders_fixed else None)
    disk, direct, disk_read = per_count[best].gbps, per_count[best].direct, per_count[best].bytes
    if not loaders_fixed:
        engine = replace(engine, loaders=best)
    drop_page_cache()
    threaded = measure_disk(file_table(plan_model(layout)), best, max_bytes=min(4 * GIB, copy_bytes), max_seconds=6.0)[0]
    dec_ms, pre_ms = measure_layer_compute(layout, dev, dtype, prompt_tokens, prefill_tokens)
    groups = measure_group_copies(layout, list(range(resident, n)), dev, engine.group_budget,
                                  min_bytes=8 * GIB if dev.type == "cuda" else GIB // 4)
    ceil = Ceilings(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", h2d, disk, direct,
                    engine.loaders, disk_read, dec_ms, pre_ms, prefill_tokens, groups["gbps"], threaded)
    log(f"[bench] H2D {h2d:.1f} GB/s; disk {disk:.2f} GB/s ({'O_DIRECT' if direct else 'buffered'}; by loaders: "
        + ", ".join(f"{k}: {v.gbps:.2f}" for k, v in per_count.items()) + f"; threaded {threaded:.2f}"
        + f"); layer compute {dec_ms:.2f} ms decode, {pre_ms:.2f} ms prefill {prefill_tokens}; group copies "
        f"{groups['gbps']:.1f} GB/s")
    group_floor = copy_bytes / (groups["gbps"] * 1e9)

    rows = [Row("ceiling: group copies back to back", group_floor, group_floor, "H2D", groups["gbps"],
                f"the streamed groups, {groups['copies_per_pass']} copies a pass, one stream, nothing else running")]
    runs = {}

    def save_partial():
        if partial_json is not None:   # a long bench that is cut off still leaves what it measured
            Path(partial_json).write_text(json.dumps({"ceilings": asdict(ceil), "rows": [asdict(r) for r in rows],
                                                      "runs": runs, "resident_layers": resident}, default=str))

    save_partial()
    lookahead = engine.lookahead_layers
    dram = replace(engine, cpu_cap=max(streamed, lookahead), gpu_resident_layers=resident, gpu_mem=gpu_mem)
    disk_cap = max(lookahead, min(streamed - 1, streamed // 2)) if streamed > lookahead else None
    scenarios = [("decode DRAM-fed", dram, prompt, decode_tokens)]
    if disk_cap is not None:
        disk_engine = replace(dram, cpu_cap=disk_cap, cpu_hwm=disk_cap + 3, cpu_lwm=max(0, disk_cap - 3))
        scenarios.append(("decode disk-fed", disk_engine, prompt, disk_decode_tokens or max(2, decode_tokens // 2)))
    scenarios.append((f"prefill {prefill_tokens} DRAM-fed", dram, long_prompt, 1))
    for name, eng, p, new in scenarios:
        log(f"[bench] ringllm {name}: ring {eng.cpu_cap} slots, {new} new token(s)")
        r = run_ringllm(layout, eng, device, dtype_name, p, new)
        runs[name] = r
        g = r["gpu"]
        if name.startswith("prefill"):
            achieved = g["first_token_seconds"]
            floor, bound = floor_of(copy_bytes, 0, n * pre_ms / 1e3, ceil)
            rows.append(Row(f"ringllm {name}", achieved, floor, bound, copy_bytes / achieved / 1e9))
            save_partial()
            continue
        achieved = g["decode_seconds"] / g["decode_steps"] if g["decode_steps"] else None
        disk_per_pass = r["disk_bytes_timed"] / r["passes"]
        floor, bound = floor_of(copy_bytes, disk_per_pass, n * dec_ms / 1e3, ceil)
        row = Row(f"ringllm {name}", achieved, floor, bound, copy_bytes / achieved / 1e9 if achieved else None)
        if achieved:
            row.extra["group_ceiling_ratio"] = group_floor / achieved
            row.note = f"{group_floor / achieved:.3f} of the group-copy ceiling"
        if name.endswith("disk-fed") and g["seconds"]:
            # disk utilisation over the whole timed generate (prefill included)
            used = r["disk_bytes_timed"] / g["seconds"] / 1e9
            row.note = f"disk {used:.2f} GB/s = {used / disk:.2f} of the loaders' ceiling"
            row.extra.update(disk_gbps_used=used, disk_ceiling_fraction=used / disk)
        rows.append(row)
        save_partial()

    reference_tokens = runs["decode DRAM-fed"]["tokens"]
    peer_results = {}
    for peer in peers:
        if peer in ("accelerate", "airllm") and dev.type != "cuda":
            peer_results[peer] = {"skipped": "needs a CUDA device"}
        else:
            log(f"[bench] peer {peer}")
            peer_results[peer] = run_peer(peer, model_dir, prompt, decode_tokens, gpu_mem, device)
        res = peer_results[peer]
        spt = res.get("seconds_per_token")
        floor, bound = floor_of(copy_bytes, 0, n * dec_ms / 1e3, ceil)
        same = res.get("tokens") == reference_tokens[:len(res.get("tokens") or [])] if res.get("tokens") else None
        note = res.get("skipped") or res.get("error") or (f"same tokens as ringllm: {'yes' if same else 'no'}")
        rows.append(Row(f"{peer}", spt, floor if spt else None, bound, copy_bytes / spt / 1e9 if spt else None, note))
        save_partial()

    ours = next(r.seconds for r in rows if r.name == "ringllm decode DRAM-fed")
    speedups = {r.name: r.seconds / ours for r in rows if r.seconds and not r.name.startswith(("ringllm", "ceiling"))}
    return {"model": str(model_dir), "layers": n, "disk_by_loaders": {k: v.gbps for k, v in per_count.items()},
            "resident_layers": resident, "streamed_layers": streamed,
            "streamed_bytes_per_pass": copy_bytes, "gpu_mem": gpu_mem, "engine": asdict(engine),
            "ceilings": asdict(ceil), "rows": [dict(asdict(r), ratio=r.ratio) for r in rows],
            "speedup_vs_peers": speedups, "runs": runs, "peers": peer_results,
            "peak_gpu_bytes": {k: v["gpu"].get("peak_gpu_bytes") for k, v in runs.items()}}


def run_peer(peer: str, model_dir: Path, prompt, new_tokens: int, gpu_mem: int, device: str,
             timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "ringllm.tools.bench_peers", peer, "--model", str(model_dir), "--prompt",
           ",".join(map(str, prompt)), "--new-tokens", str(new_tokens), "--gpu-mem", str(gpu_mem),
           "--device", device, "--scratch", str(Path(model_dir).parent)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("PEER-RESULT "):
            return json.loads(line[len("PEER-RESULT "):])
    return {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}


def format_table(report: dict) -> str:
    c = report["ceilings"]
    lines = [f"device {c['device']}; H2D {c['h2d_gbps']:.1f} GB/s (group copies {c['group_gbps']:.1f}); disk {c['disk_gbps']:.2f} GB/s "
             f"({'O_DIRECT' if c['disk_direct'] else 'buffered'}, {c['disk_loaders']} loaders; threaded "
             f"{c['disk_threaded_gbps']:.2f}); layer compute "
             f"{c['layer_decode_ms']:.2f} ms decode / {c['layer_prefill_ms']:.2f} ms prefill {c['prefill_tokens']}",
             f"{report['layers']} layers: {report['resident_layers']} on the GPU, {report['streamed_layers']} streamed "
             f"({report['streamed_bytes_per_pass'] / 1e9:.2f} GB a pass), GPU cap {report['gpu_mem'] / GIB:.1f} GiB",
             "",
             f"{'run':<34}{'s/token':>10}{'GB/s':>8}{'floor s':>10}{'bound':>9}{'floor/ach':>11}  note",
             "-" * 100]
    for r in report["rows"]:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        lines.append(f"{r['name']:<34}{f(r['seconds'], '10.3f')}{f(r['gbps'], '8.1f')}{f(r['floor'], '10.3f')}"
                     f"{r['bound'] if r['floor'] else '-':>9}{f(r['ratio'], '11.3f')}  {r['note']}")
    if report["speedup_vs_peers"]:
        lines.append("")
        lines.append("ringllm DRAM-fed decode is " + ", ".join(
            f"{v:.1f}x {k}" for k, v in report["speedup_vs_peers"].items()) + " (tokens/s)")
    return "\n".join(lines)
