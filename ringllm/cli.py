"""`ringllm` command line: parse, validate, dispatch; the only place that reads the environment."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

log = logging.getLogger("ringllm")


def default_cache_dir() -> Path:
    if os.environ.get("RINGLLM_CACHE"):
        return Path(os.environ["RINGLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ringllm"


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a completion; tokens stream to stdout, logs go to stderr.")
    p.add_argument("--model", type=Path, help="Hugging Face Llama model directory "
                   "(default: the built-in SmolLM2-135M-Instruct, imported on first use)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of prompts")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--resident", action="store_true",
                   help="load every weight in this process (the in-process reference engine)")
    p.add_argument("--loaders", type=int, default=None,
                   help="loader processes (default: from the CPU count and the disk)")
    p.add_argument("--gpu-mem", default=None,
                   help="cap on what the GPU process allocates, e.g. 24GiB (checked before the run)")
    p.add_argument("--preset", choices=("conservative", "balanced", "aggressive", "auto"), default=None,
                   help="the user guide's presets (24/40/80 GB GPU classes), or auto: chosen for this machine")
    p.add_argument("--measure", action="store_true", help="with --preset auto: also measure disk and H2D GB/s")
    p.add_argument("--dram-limit", default=None, help="with --preset auto: DRAM the ring may use (default: available)")
    p.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="set an engine parameter by its guide name, e.g. --set CPU_CAP_VALUE=16")
    p.add_argument("--metrics-json", type=Path, default=None,
                   help="write the run's metrics here at the end (tokens/s, ring, bytes, memory)")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringllm", description=(
        "Run a Llama model far larger than your GPU by streaming its weights "
        "SSD -> pinned DRAM ring -> GPU."))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.add_parser("pull-demo", help="import the built-in demo model (SmolLM2-135M-Instruct) into the cache")

    tp = sub.add_parser("top", help="watch a running ringllm: window, ring slots, loaders, copies, tokens/s")
    tp.add_argument("--run", default=None, help="run id (default: the newest live run)")
    tp.add_argument("--interval", type=float, default=0.5)
    tp.add_argument("--once", action="store_true", help="print one snapshot and exit")

    cl = sub.add_parser("cleanup", help="remove what killed runs left: shared memory, message queues, processes")
    cl.add_argument("--all", action="store_true", help="also the resources of runs that are still alive")

    mk = sub.add_parser("make-checkpoint", help="write a random-weight Llama checkpoint at real sizes")
    mk.add_argument("--shape", default="llama-3.1-70b", help="llama-3.1-70b, llama-3.1-8b or tiny")
    mk.add_argument("--layers", type=int, default=None, help="layers to write (default: the shape's)")
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    mk.add_argument("--shard-size", default="5GB", help="shard size (default 5GB, as published)")
    mk.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bench", help="measure ringllm against this machine's floor and against peers")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--device", choices=("cpu", "cuda"), default=None)
    b.add_argument("--gpu-mem", default="24GiB", help="GPU cap for ringllm and every peer (default 24GiB)")
    b.add_argument("--loaders", type=int, default=None)
    b.add_argument("--decode-tokens", type=int, default=4)
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--prefill-tokens", type=int, default=2048)
    b.add_argument("--peers", default="accelerate,naive,airllm", help="comma-separated; '' for none")
    b.add_argument("--preset", choices=("conservative", "balanced", "aggressive"), default=None)
    b.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE")
    b.add_argument("--json", type=Path, default=None, help="write the full report here")
    b.add_argument("-v", "--verbose", action="store_true")
    return parser


def _prompts(args) -> list[str]:
    if args.prompt_file is not None:
        try:
            return [args.prompt_file.read_text()]
        except OSError as err:
            raise RingllmError(f"{args.prompt_file}: cannot read prompt file ({err.strerror})") from None
    return args.prompt or ["What is the capital of France?"]


def cmd_generate(args) -> int:
    import torch

    from ringllm.checkpoint.layout import load_layout
    from ringllm.checkpoint.text import StreamDecoder, TextCodec
    from ringllm.tools.demo_model import ensure_demo_model
    from ringllm.workers.generation import Sampler, SamplingParams, generate
    from ringllm.workers.model import Llama
    from ringllm.workers.resident import ResidentSource, load_resident_weights
    from ringllm.workers.weights import DTYPE_NAMES, TORCH_DTYPE

    if args.max_new_tokens < 1:
        raise RingllmError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    sampling.validate()
    model_dir = args.model if args.model is not None else ensure_demo_model(default_cache_dir())
    layout = load_layout(model_dir)
    codec = TextCodec(model_dir, layout.config)
    prompts = [codec.encode(text, chat=not args.no_chat) for text in _prompts(args)]

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RingllmError("--device cuda: no CUDA device is available to torch")
    dtype = TORCH_DTYPE[layout.dtype] if args.dtype == "auto" else DTYPE_NAMES[args.dtype]
    cfg = layout.config
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > cfg.max_position_embeddings:
        raise RingllmError(
            f"prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"context of {cfg.max_position_embeddings} tokens")

    streaming = len(prompts) == 1
    decoder = StreamDecoder(codec)

    def on_tokens(step_tokens):
        if streaming and step_tokens[0] not in codec.eos_ids:
            sys.stdout.write(decoder.push(step_tokens[0]))
            sys.stdout.flush()

    t1 = time.perf_counter()
    if args.resident:
        model = Llama(cfg, load_resident_weights(layout, dtype, device),
                      ResidentSource(layout, dtype, device), dtype, device)
        log.info("loaded %s (%d layers, %s) on %s in %.1f s", model_dir, cfg.num_layers, layout.dtype,
                 device, time.perf_counter() - t1)
        t1 = time.perf_counter()
        outputs = generate(model, prompts, args.max_new_tokens, Sampler(sampling, device), codec.eos_ids,
                           on_tokens, cfg.max_position_embeddings)
    else:
        outputs = run_streaming(args, layout, model_dir, prompts, sampling, codec.eos_ids, device, dtype, on_tokens)
    elapsed = time.perf_counter() - t1
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, ids in enumerate(outputs):
            sys.stdout.write(f"--- [{i}] ---\n{codec.decode(ids)}\n")
    sys.stdout.flush()
    n = sum(len(o) for o in outputs)
    if args.resident:
        log.info("generated %d tokens in %.2f s (%.1f tokens/s, prefill included)", n, elapsed, n / elapsed)
    return 0


def build_engine_config(args, model_dir, max_seq: int = 2048):
    from ringllm.config import build_config, default_loader_count, env_parameters, parse_bytes

    overrides = {}
    for item in args.params:
        name, sep, value = item.partition("=")
        if not sep:
            raise RingllmError(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip()] = value.strip()
    loaders = args.loaders if args.loaders is not None else default_loader_count(model_dir)
    gpu_mem = parse_bytes(args.gpu_mem) if args.gpu_mem is not None else None
    preset_values = None
    if args.preset == "auto":
        preset_values = auto_preset(args, model_dir, loaders, gpu_mem, max_seq)
        if args.loaders is None:
            loaders = preset_values.pop("loaders")
        else:
            preset_values.pop("loaders")
    return build_config(
        preset=None if args.preset == "auto" else args.preset, preset_values=preset_values, env=env_parameters(),
        overrides=overrides, loaders=loaders, gpu_mem=gpu_mem)


def auto_preset(args, model_dir, loaders: int, gpu_mem: int | None, max_seq: int) -> dict:
    """--preset auto: measure what is asked, choose, print the choices with their reasons."""
    import psutil

    from ringllm.checkpoint.layout import load_layout
    from ringllm.autotune import Machine, auto_tune
    from ringllm.config import parse_bytes

    layout = load_layout(model_dir)
    device = getattr(args, "device", None) or ("cuda" if _cuda_available() else "cpu")
    dram = psutil.virtual_memory().available
    if args.dram_limit is not None:
        dram = min(dram, parse_bytes(args.dram_limit))
    if gpu_mem is not None:
        budget = gpu_mem
    elif device == "cuda":
        budget = int(0.9 * _free_gpu_bytes())
    else:
        budget = dram // 2          # on the CPU the "GPU" memory is DRAM too
    h2d = disk = None
    if args.measure:
        from ringllm.tools.bench import measure_disk
        from ringllm.shm.slot_plan import file_table, plan_model
        files = file_table(plan_model(layout))
        per = {k: measure_disk(files, k, max_bytes=2 * 2**30, max_seconds=3.0)[0] for k in (1, 2, 4, 8)}
        # the most readers within 10% of the best: the rates are that noisy, and more reads in
        # flight never hurt an NVMe drive (the loaders beat these threaded reads anyway)
        disk = max(per.values())
        loaders = max(k for k, rate in per.items() if rate >= 0.9 * disk)
        h2d = _measure_h2d(device)
    machine = Machine(budget, dram, loaders, h2d, disk)
    values, reasons = auto_tune(layout, machine, 1, max_seq, layout_dtype_name(layout), device == "cuda")
    print(f"[ringllm] --preset auto for {model_dir} on {device}:", file=sys.stderr)
    for line in reasons:
        print(f"[ringllm]   {line}", file=sys.stderr)
    return values


def layout_dtype_name(layout) -> str:
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[layout.dtype]


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
    code = ("import torch; from ringllm.tools.bench import measure_h2d; "
            f"print(measure_h2d(torch.device('{device}'), {8 * 2**30 if device == 'cuda' else 2**30}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])



def run_streaming(args, layout, model_dir, prompts, sampling, eos_ids, device, dtype, on_tokens):
    """The default engine: supervisor + coordinator + loaders + GPU process over the shared ring."""
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.memory_plan import check_gpu_cap, plan_gpu_memory

    max_seq = max(len(p) for p in prompts) + args.max_new_tokens
    engine = build_engine_config(args, model_dir, max_seq)
    dtype_name = str(dtype).removeprefix("torch.")
    plan = plan_gpu_memory(layout, engine, len(prompts), max_seq, dtype_name, embed_on_host=device.type == "cuda")
    check_gpu_cap(plan, engine.gpu_mem, engine)
    sup = Supervisor(layout, engine, device.type, dtype_name, verbose=args.verbose)
    result = sup.run(prompts, args.max_new_tokens, sampling, eos_ids, on_tokens)
    log_summary(result)
    if args.metrics_json is not None:
        import json
        args.metrics_json.write_text(json.dumps(run_metrics(result, engine), indent=1) + "\n")
    return result.outputs


def run_metrics(result, engine) -> dict:
    """The end-of-run metrics (`--metrics-json`): one flat, documented dictionary."""
    g, c, info = result.gpu, result.coordinator, result.gpu_info
    secs = g.get("seconds") or 0.0
    steps = g.get("decode_steps") or 0
    read_s = c.get("disk_read_seconds") or 0.0
    return {
        "device": info.get("name") or info.get("device"),
        "new_tokens": g.get("new_tokens", 0),
        "seconds": secs,
        "tokens_per_second": g.get("new_tokens", 0) / secs if secs else None,
        "seconds_per_token": g["decode_seconds"] / steps if steps else None,
        "time_to_first_token_s": g.get("first_token_seconds"),     # from the start of the prefill
        "startup_s": result.startup_wall_s,          # engine start -> weights placed, ready to prefill
        "first_token_wall_s": result.first_token_wall_s,   # engine start -> first token
        "wall_s": result.wall_s,
        "ring_hits": c.get("ring_hits"), "ring_misses": c.get("ring_misses"),
        "ring_loads": c.get("ring_loads"), "ring_evictions": c.get("ring_evictions"),
        "disk_bytes": c.get("disk_bytes"),
        "disk_gbps": c.get("disk_bytes", 0) / secs / 1e9 if secs else None,
        "disk_gbps_per_reader_busy": c.get("disk_bytes", 0) / read_s / 1e9 if read_s else None,
        "h2d_bytes": g.get("h2d_bytes"),
        "h2d_gbps": g.get("h2d_bytes", 0) / secs / 1e9 if secs else None,
        "wait_for_weights_s": g.get("wait_seconds"),
        "peak_gpu_bytes": g.get("peak_gpu_bytes"),
        "gpu_resident_layers": info.get("resident_layers"),
        "torch_threads": info.get("torch_threads"),   # the GPU process's torch CPU threads
        # pinned (page-locked) host memory: what the GPU process registered with CUDA, the peak
        # seen (machine-wide FOLL_PIN counters, else per-process VmLck/VmPin), and what was still
        # pinned after every process exited (0 = all returned; None where the kernel cannot say)
        "pinned_registered_bytes": info.get("registered_bytes", 0),
        "pinned_bytes": max([result.pinned_peak_bytes or 0,
                             *(max(p["peak_locked"], p["peak_pinned"]) for p in result.processes.values())]),
        "pinned_left_after_run_bytes": result.pinned_left_bytes,
        "processes": result.processes,
        "loader_restarts": result.loader_restarts,
        "stale_chunk_reports": c.get("stale_chunk_reports"),   # chunks read twice; always 0
        "engine": engine.as_dict(),
    }


def log_summary(result) -> None:
    g, c = result.gpu, result.coordinator
    secs = g.get("seconds") or float("nan")
    n = g.get("new_tokens", 0)
    log.info("summary: %d tokens in %.2f s (%.2f tokens/s); ring hits %d, misses %d; disk read %.1f MiB; "
             "copied to %s %.1f MiB; compute waited for weights %.2f s%s",
             n, secs, n / secs if secs else 0.0, c.get("ring_hits", 0), c.get("ring_misses", 0),
             c.get("disk_bytes", 0) / 2**20, result.gpu_info.get("device", "device"),
             g.get("h2d_bytes", 0) / 2**20, g.get("wait_seconds", 0.0),
             f"; loader restarts {result.loader_restarts}" if result.loader_restarts else "")


def cmd_cleanup(args) -> int:
    import psutil

    from ringllm.shm.resources import orphan_processes, sweep

    procs = orphan_processes()
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=3)
    for proc in alive:
        proc.kill()
    removed = sweep(include_live=args.all)
    for name in removed:
        print(f"removed {name}")
    print(f"ringllm cleanup: {len(removed)} resource(s) removed, {len(procs)} orphan process(es) stopped")
    return 0


def cmd_bench(args) -> int:
    import json

    import torch

    from ringllm.config import parse_bytes
    from ringllm.tools.bench import bench, format_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = build_engine_config(args, args.model, max(args.prompt_tokens + args.decode_tokens, args.prefill_tokens + 1))
    report = bench(args.model, device, parse_bytes(args.gpu_mem), engine, args.decode_tokens, args.prompt_tokens,
                   args.prefill_tokens, [p for p in args.peers.split(",") if p],
                   log=lambda m: print(m, file=sys.stderr, flush=True), loaders_fixed=args.loaders is not None)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


# What `generate` and `bench` import before the supervisor takes over the signals: torch alone
# takes seconds, and dataclasses compile their methods with exec().
ENGINE_MODULES = ("torch", "tokenizers", "jinja2.sandbox", "ringllm.supervisor.supervisor", "ringllm.checkpoint.text",
                  "ringllm.workers.model", "ringllm.workers.generation", "ringllm.workers.resident",
                  "ringllm.workers.memory_plan", "ringllm.tools.demo_model")


def _import_holding_signals(modules) -> None:
    """Import with SIGINT and SIGTERM held back, then act on them. Raised inside an import, a
    KeyboardInterrupt can be swallowed (the run went on after Ctrl-C), turn into another error,
    print "Exception ignored" tracebacks, or, inside code run by exec(), make Python end itself
    with SIGINT after our clean exit."""
    import importlib
    import signal

    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}   # a background job's stays ignored
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held and held[0] == signal.SIGINT:
        raise KeyboardInterrupt
    if held:
        from ringllm.supervisor.supervisor import Terminated
        raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("generate", "bench"):
        from ringllm.workers.process_setup import set_process_name
        set_process_name("ringllm-sup")   # what ps shows for the supervisor (not when embedded)
    from ringllm.workers.process_setup import configure_logging
    configure_logging("[ringllm] %(message)s", getattr(args, "verbose", False))   # others' INFO stays quiet
    try:
        if argv is None and args.command in ("generate", "bench"):
            bench = ("ringllm.tools.bench",) if args.command == "bench" else ()
            _import_holding_signals(ENGINE_MODULES + bench)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "make-checkpoint":
            from ringllm.config import parse_bytes
            from ringllm.tools.make_checkpoint import make_checkpoint
            print(make_checkpoint(args.out, args.shape, args.layers, args.dtype, parse_bytes(args.shard_size), args.seed))
            return 0
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "top":
            from ringllm.tools.top import run_top
            return run_top(args.run, args.interval, args.once)
        if args.command == "cleanup":
            return cmd_cleanup(args)
        if args.command == "pull-demo":
            from ringllm.tools.demo_model import ensure_demo_model
            print(ensure_demo_model(default_cache_dir()))
            return 0
    except RingllmError as err:
        print(f"ringllm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ringllm: interrupted", file=sys.stderr)
        return 130
    except BaseException as err:
        from ringllm.supervisor.supervisor import Terminated
        if isinstance(err, Terminated):
            print("ringllm: terminated", file=sys.stderr)
            return 143
        raise
    return 2


if __name__ == "__main__":
    sys.exit(main())
