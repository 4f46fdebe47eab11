"""`ringllm` command line: parse, validate, dispatch; the only place that reads the environment."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from checkpoint.errors import RingllmError

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
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringllm", description=(
        "Run a Llama model far larger than your GPU by streaming its weights "
        "SSD -> pinned DRAM ring -> GPU."))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.add_parser("pull-demo", help="import the built-in demo model (SmolLM2-135M-Instruct) into the cache")
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

    from checkpoint.layout import load_layout
    from checkpoint.text import StreamDecoder, TextCodec
    from tools.demo_model import ensure_demo_model
    from workers.generation import Sampler, SamplingParams, generate
    from workers.model import Llama
    from workers.resident import ResidentSource, load_resident_weights
    from workers.weights import DTYPE_NAMES, TORCH_DTYPE

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

    t0 = time.perf_counter()
    model = Llama(cfg, load_resident_weights(layout, dtype, device),
                  ResidentSource(layout, dtype, device), dtype, device)
    log.info("loaded %s (%d layers, %s) on %s in %.1f s", model_dir, cfg.num_layers, layout.dtype,
             device, time.perf_counter() - t0)

    streaming = len(prompts) == 1
    decoder = StreamDecoder(codec)

    def on_tokens(step_tokens):
        if streaming and step_tokens[0] not in codec.eos_ids:
            sys.stdout.write(decoder.push(step_tokens[0]))
            sys.stdout.flush()

    t1 = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, Sampler(sampling, device), codec.eos_ids,
                       on_tokens, cfg.max_position_embeddings)
    elapsed = time.perf_counter() - t1
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, ids in enumerate(outputs):
            sys.stdout.write(f"--- [{i}] ---\n{codec.decode(ids)}\n")
    sys.stdout.flush()
    n = sum(len(o) for o in outputs)
    log.info("generated %d tokens in %.2f s (%.1f tokens/s, prefill included)", n, elapsed, n / elapsed)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="[ringllm] %(message)s", stream=sys.stderr)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "pull-demo":
            from tools.demo_model import ensure_demo_model
            print(ensure_demo_model(default_cache_dir()))
            return 0
    except RingllmError as err:
        print(f"ringllm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ringllm: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
