"""`ringllm generate`: prompts in, tokens out, through the streaming engine (the supervisor and
its processes) or, with --resident, the in-process reference engine; and the run's summary and
metrics (`--metrics-json`)."""
from __future__ import annotations

import logging
import sys
import time

from ringllm.checkpoint.errors import RingllmError
from ringllm.choose import build_engine_config
from ringllm.cli_input import check_model_arg, check_output_path, default_cache_dir, read_prompts
from ringllm.run_options import auto_cap, draft_params, parallel_plan, resolve_spec_tokens, with_spec_tokens

log = logging.getLogger("ringllm")


def cmd_generate(args) -> int:
    # No torch on the streaming engine's side of the command (ringllm.device_probe): the GPU
    # process imports it while the loaders already read. Only --resident computes here.
    from ringllm.checkpoint.dtypes import NAME_OF_TAG
    from ringllm.checkpoint.layout import load_layout
    from ringllm.checkpoint.text import StreamDecoder, TextCodec
    from ringllm.device_probe import default_device
    from ringllm.tools.demo_model import ensure_demo_model
    from ringllm.workers.spec_plan import AUTO
    from ringllm.workers.speculation import SpeculativeSampling

    if args.max_new_tokens < 1:
        raise RingllmError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    draft = draft_params(args)
    sampling = SpeculativeSampling(args.temperature, args.top_p, args.top_k, args.seed, draft=draft)
    sampling.validate()     # refuses an unknown draft, bad sampling values
    if args.metrics_json is not None:
        check_output_path(args.metrics_json, "--metrics-json")
    if args.model is not None:
        check_model_arg(args.model)
    parallel = parallel_plan(args, draft)
    texts = read_prompts(args.prompt, args.prompt_file)
    model_dir = args.model if args.model is not None else ensure_demo_model(default_cache_dir())
    layout = load_layout(model_dir)
    parallel.planned_layout(layout)      # a split the model does not allow: one line, before anything starts
    if draft is not None and draft.model_dir is not None:
        from ringllm.workers.speculation import check_draft_vocab
        check_draft_vocab(model_dir, draft.model_dir)     # before anything starts: one line if not
    codec = TextCodec(model_dir, layout.config)
    prompts = []
    for label, text in texts:
        if not text.strip():     # the chat template would wrap it into tokens of its own
            raise RingllmError(f"{label}: the prompt is empty (or only white space)")
        ids = codec.encode(text, chat=not args.no_chat)
        if not ids:
            raise RingllmError(f"{label}: the prompt is empty (no tokens{' with --no-chat' if args.no_chat else ''})")
        prompts.append(ids)

    device = args.device or default_device()
    dtype_name = NAME_OF_TAG.get(layout.dtype, layout.dtype) if args.dtype == "auto" else args.dtype
    cfg = layout.config
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > cfg.max_position_embeddings:
        raise RingllmError(
            f"prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"context of {cfg.max_position_embeddings} tokens")

    if draft is not None and args.spec_tokens == AUTO:     # the most it may be, until the pass cost says
        sampling = with_spec_tokens(sampling, auto_cap(layout, sampling, longest, args.max_new_tokens)[0])
    streaming = len(prompts) == 1
    decoder = StreamDecoder(codec)

    def on_token(prompt: int, token: int):
        if streaming and token not in codec.eos_ids:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    if args.resident:
        if draft is not None and args.spec_tokens == AUTO:   # every layer stays in this process
            sampling = resolve_spec_tokens(layout, sampling, cfg.num_layers, device, dtype_name, longest,
                                           args.max_new_tokens)
        outputs = run_resident(layout, prompts, args.max_new_tokens, sampling, codec.eos_ids, device,
                               dtype_name, on_token, args.metrics_json)
    else:
        outputs = run_streaming(args, layout, model_dir, prompts, sampling, codec.eos_ids, device, dtype_name,
                                on_token, parallel)
    if streaming:
        sys.stdout.write(decoder.flush() + "\n")     # bytes of a character the run ended inside
    else:
        for i, ids in enumerate(outputs):
            sys.stdout.write(f"--- [{i}] ---\n{codec.decode(ids)}\n")
    sys.stdout.flush()
    return 0


def run_resident(layout, prompts, max_new_tokens, sampling, eos_ids, device_type, dtype_name, on_token,
                 metrics_json=None):
    """--resident: every weight in this process, no ring (the reference engine). Its metrics
    file holds what it knows: tokens, seconds and the speculation counts."""
    import torch

    from ringllm.workers.generation import generate
    from ringllm.workers.process_setup import apply_torch_threads
    from ringllm.workers.resident import load_resident_model
    from ringllm.workers.speculation import SpecStats

    torch_threads = apply_torch_threads(torch)      # the CPUs this run may use, as the GPU process sizes them
    model = load_resident_model(layout, device_type, dtype_name)
    cfg = layout.config
    t0 = time.perf_counter()
    spec = SpecStats() if getattr(sampling, "draft", None) is not None else None
    outputs = generate(model, prompts, max_new_tokens, sampling, eos_ids, on_token, cfg.max_position_embeddings, spec)
    elapsed, n = time.perf_counter() - t0, sum(len(o) for o in outputs)
    log.info("generated %d tokens in %.2f s (%.1f tokens/s, prefill included)%s", n, elapsed, n / elapsed,
             spec_summary(spec.as_dict() if spec else None))
    if metrics_json is not None:
        import json
        metrics = {"new_tokens": n, "seconds": elapsed, "tokens_per_second": n / elapsed if elapsed else None,
                   "torch_threads": torch_threads}
        if spec is not None:
            metrics["speculation"] = spec.as_dict()
        metrics_json.write_text(json.dumps(metrics, indent=1) + "\n")
    return outputs


def spec_summary(spec: dict | None) -> str:
    """The summary line's speculation part ('' without a draft): passes, tokens per pass,
    acceptance, and the draft's and the verify pass's time per pass."""
    if not spec:
        return ""
    per_pass = spec["tokens_per_pass"]
    acceptance = spec["acceptance"]

    def ms(key):
        value = spec.get(key)
        return f"{value * 1e3:.1f} ms" if value is not None else "-"

    return (f"; --draft {spec['draft']}: {spec['tokens']} tokens in {spec['passes']} decode passes "
            f"({per_pass if per_pass is not None else 0:.2f} tokens per pass), "
            f"{spec['accepted']}/{spec['drafted']} drafts accepted"
            + (f" ({acceptance:.0%})" if acceptance is not None else "")
            + f"; per pass: draft {ms('draft_seconds_per_pass')}, verify {ms('verify_seconds_per_pass')}")


def run_streaming(args, layout, model_dir, prompts, sampling, eos_ids, device, dtype_name, on_token,
                  parallel=None):
    """The default engine: supervisor + coordinator + loaders + GPU process over the shared ring
    (with --tensor-parallel N, N GPU processes, each with its share of every layer)."""
    from ringllm.supervisor.startup import resident_estimate
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.memory_plan import check_gpu_cap, plan_gpu_memory
    from ringllm.workers.spec_plan import AUTO, spec_plan
    from ringllm.workers.speculation import cache_slots

    # Every planner call of the run (here, the supervisor's estimate, the GPU process's resident
    # layers) plans the same sequence length and speculation: cache_slots and spec_plan of `sampling`.
    longest, batch = max(len(p) for p in prompts), len(prompts)
    max_seq, spec = cache_slots(longest, args.max_new_tokens, sampling), spec_plan(sampling)
    measured: dict = {}
    # each GPU holds its rank's share of a layer: the memory plans count rank 0's (the largest)
    plan_layout = parallel.planned_layout(layout) if parallel is not None else layout
    engine = build_engine_config(args, model_dir, max_seq, batch, layout, device, dtype_name, spec, measured,
                                 plan_layout=plan_layout)
    if spec is not None and args.spec_tokens == AUTO:
        # the engine was planned with the widest pass auto may choose; K only frees memory from it.
        # With ranks a pass costs one rank's share over its own link: planned on that share too
        resident = resident_estimate(plan_layout, engine, batch, max_seq, dtype_name, device, spec)
        sampling = resolve_spec_tokens(plan_layout, sampling, resident, device, dtype_name, longest, args.max_new_tokens,
                                       measured.get("h2d_gbps"))
        max_seq, spec = cache_slots(longest, args.max_new_tokens, sampling), spec_plan(sampling)
    plan = plan_gpu_memory(plan_layout, engine, batch, max_seq, dtype_name, embed_on_host=device == "cuda", spec=spec)
    check_gpu_cap(plan, engine.gpu_mem, engine)
    sup = Supervisor(layout, engine, device, dtype_name, verbose=args.verbose, parallel=parallel)
    result = sup.run(prompts, args.max_new_tokens, sampling, eos_ids, on_token)
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
        # seconds of each start-up phase from the engine's start (they overlap; see README)
        "startup": result.startup,
        "ring_hits": c.get("ring_hits"), "ring_misses": c.get("ring_misses"),
        "ring_loads": c.get("ring_loads"), "ring_evictions": c.get("ring_evictions"),
        "disk_bytes": c.get("disk_bytes"),
        # decode's reads per token: what was read after compute left the first pass (the prefill)
        "disk_bytes_per_token": (c["disk_bytes"] - c["disk_bytes_first_pass"]) / steps
                                if steps and "disk_bytes_first_pass" in c else None,
        "disk_gbps": c.get("disk_bytes", 0) / secs / 1e9 if secs else None,
        "disk_gbps_per_reader_busy": c.get("disk_bytes", 0) / read_s / 1e9 if read_s else None,
        "h2d_bytes": g.get("h2d_bytes"),
        "h2d_gbps": g.get("h2d_bytes", 0) / secs / 1e9 if secs else None,
        "wait_for_weights_s": g.get("wait_seconds"),
        "peak_gpu_bytes": g.get("peak_gpu_bytes"),
        "gpu_resident_layers": info.get("resident_layers"),
        "tensor_parallel": info.get("world", 1),     # ranks (GPU processes); the figures are rank 0's
        "tensor_parallel_backend": info.get("tp_backend"),   # their collectives: nccl | gloo (None: one rank)
        "torch_threads": info.get("torch_threads"),   # the GPU process's torch CPU threads
        # pinned (page-locked) host memory: what the GPU process registered with CUDA, the peak
        # seen (machine-wide FOLL_PIN counters, else per-process VmLck/VmPin), and what was still
        # pinned after every process exited (0 = all returned; None where the kernel cannot say)
        "pinned_registered_bytes": g.get("registered_bytes", 0),
        "pinned_bytes": max([result.pinned_peak_bytes or 0,
                             *(max(p["peak_locked"], p["peak_pinned"]) for p in result.processes.values())]),
        "pinned_left_after_run_bytes": result.pinned_left_bytes,
        "processes": result.processes,
        "loader_restarts": result.loader_restarts,
        "stale_chunk_reports": c.get("stale_chunk_reports"),   # chunks read twice; always 0
        "buffered_chunks": c.get("buffered_chunks"),           # read without O_DIRECT (tmpfs, or a fallback)
        "direct_fallback_chunks": c.get("direct_fallback_chunks"),  # ... on a file that took O_DIRECT: 0
        "skipped_chunks": c.get("skipped_chunks"),             # jobs whose slot had moved on; 0
        "engine": engine.as_dict(),
        **({"speculation": g["speculation"]} if g.get("speculation") else {}),
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
    if g.get("speculation"):
        log.info("summary: %s", spec_summary(g["speculation"]).lstrip("; "))
