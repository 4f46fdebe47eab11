"""`ringllm` command line: parse, dispatch to the command, turn its end into an exit code (errors one
line and 1, Ctrl-C 130, SIGTERM 143, a closed stdout 141). The commands live beside it: generate
(ringllm.generate), the engine parameters (ringllm.choose, ringllm.config), bench, top, the demo
model and make-checkpoint (ringllm.tools), convert (ringllm.convert)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from ringllm import __version__
from ringllm.checkpoint import dtypes
from ringllm.checkpoint.errors import RingllmError, report_failure
from ringllm.cli_input import (DEFAULT_PROMPT, default_cache_dir, MIN_TOP_INTERVAL_S, check_model_arg, check_output_path,
                               check_top_interval)

log = logging.getLogger("ringllm")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default: argparse's "(default: X)" where there is a value to
    show; an option whose default is computed (None) says it in its own help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        # identity, not ==: a default of 0 or 0.0 is a value to show, unlike False (a flag's off)
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if "default" in text or nothing:
            return text
        return super()._get_help_string(action)


def spec_tokens_arg(text: str):
    """--spec-tokens: 'auto' or a whole number (checked >= 1 with the other draft settings)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt", formatter_class=HelpFormatter,
                       description="Generate a completion; tokens stream to stdout, logs go to stderr.")
    p.add_argument("--model", type=Path, help="Hugging Face Llama model directory "
                   "(default: the built-in SmolLM2-135M-Instruct, imported on first use)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of prompts "
                     f"(default: {DEFAULT_PROMPT!r})")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file (UTF-8); - reads stdin")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 = off")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, a 64-bit integer (default: random)")
    _add_draft_flags(p)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("auto", *dtypes.NAMES), default="auto",
                   help="compute dtype; auto = the checkpoint's")
    p.add_argument("--resident", action="store_true",
                   help="load every weight in this process (the in-process reference engine)")
    p.add_argument("--loaders", type=int, default=None,
                   help="loader processes (default: from the CPU count and the disk)")
    p.add_argument("--gpu-mem", default=None, help="cap on what the GPU process allocates, e.g. 24GiB "
                   "(checked before the run; default: no cap)")
    p.add_argument("--preset", choices=("conservative", "balanced", "aggressive", "auto"), default=None,
                   help="the user guide's presets (24/40/80 GB GPU classes), or auto: chosen for this machine "
                        "(default: none, the built-in parameter defaults)")
    p.add_argument("--measure", action="store_true", help="with --preset auto: also measure disk and H2D GB/s")
    p.add_argument("--dram-limit", default=None,
                   help="DRAM the ring may use when ringllm sizes it (--preset auto, or no preset) (default: available)")
    p.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="set an engine parameter by its guide name, e.g. --set CPU_CAP_VALUE=16")
    p.add_argument("--metrics-json", type=Path, default=None,
                   help="write the run's metrics here at the end (tokens/s, ring, bytes, memory); "
                        "checked for writability before the run")
    _add_parallel_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP", formatter_class=HelpFormatter,
                       description="An OpenAI-compatible HTTP server (needs the extra: pip install 'ringllm[serve]'). "
                                   "SIGINT/SIGTERM drain: no new requests, in-flight ones finish, exit 0.")
    p.add_argument("--model", type=Path, required=True, help="Hugging Face Llama model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $RINGLLM_API_KEY, "
                        "else none)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="Host names served besides loopback ones, comma-separated, or '*' for any (default: "
                        "loopback names only on a loopback --host, any name on another); others get 421")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="browser Origins allowed, comma-separated (e.g. https://app.example), or '*' "
                        "(default: none: a request from a web page gets 403)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--max-waiting", type=int, default=256, help="requests queued beyond the batch; more get 503")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + max_tokens per request at most (default: the model's max_position_embeddings)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="request body size limit")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most; a request beyond them gets 503 (default: --max-batch + "
                        "--max-waiting + 64)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get before they are cancelled "
                        "(a second signal cancels them at once)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("auto", *dtypes.NAMES), default="auto", help="compute dtype; auto = the checkpoint's")
    _add_draft_flags(p)
    _add_engine_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_draft_flags(p) -> None:
    """generate and serve: speculative decoding (run_options.draft_params reads them)."""
    p.add_argument("--draft", default=None, metavar="ngram|DIR",
                   help="speculative decoding, greedy or sampling: 'ngram' verifies prompt-lookup drafts; a DIR here is "
                        "the same as --draft-model DIR; several tokens per weight pass (default: off)")
    p.add_argument("--draft-model", default=None, metavar="DIR",
                   help="speculative decoding by a small draft model (a Llama checkpoint with the same tokenizer), "
                        "kept whole on the GPU inside --gpu-mem (default: none)")
    p.add_argument("--spec-tokens", type=spec_tokens_arg, default="auto", metavar="auto|K",
                   help="with a draft: draft tokens verified per pass at most; auto chooses from the cost of a "
                        "pass (README: Speculative decoding)")
    p.add_argument("--ngram-max", type=int, default=3, help="with --draft ngram: longest n-gram looked up")


def _add_parallel_flags(p) -> None:
    """generate and serve: tensor parallel (generate.parallel_plan reads them)."""
    p.add_argument("--tensor-parallel", "--tp", type=int, default=1, metavar="N",
                   help="split every layer over N GPU processes (ranks), each copying its share over its own "
                        "link from the one ring; on cpu N processes (default: 1)")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="with --tensor-parallel N: the CUDA devices of the ranks, e.g. 0,1 (default: the first N)")
    p.add_argument("--tp-backend", choices=("nccl", "gloo"), default=None,
                   help="with --tensor-parallel N: the ranks' collectives (default: nccl on cuda, gloo on cpu); "
                        "gloo on cuda lets ranks share one GPU (--devices 0,0), a check of the CUDA path, not "
                        "a speed-up")


def _add_engine_flags(p) -> None:
    """serve: the streaming engine's settings, as generate takes them."""
    _add_parallel_flags(p)
    p.add_argument("--resident", action="store_true",
                   help="load every weight in the server process (the in-process engine) instead of streaming")
    p.add_argument("--loaders", type=int, default=None,
                   help="loader processes (default: from the CPU count and the disk)")
    p.add_argument("--gpu-mem", default=None, help="cap on what the GPU process allocates, e.g. 24GiB; "
                   "--max-batch rows of --max-context tokens must fit (default: no cap)")
    p.add_argument("--preset", choices=("conservative", "balanced", "aggressive", "auto"), default=None,
                   help="the user guide's presets, or auto: chosen for this machine (default: none)")
    p.add_argument("--measure", action="store_true", help="with --preset auto: also measure disk and H2D GB/s")
    p.add_argument("--dram-limit", default=None, help="DRAM the ring may use when ringllm sizes it (default: available)")
    p.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="set an engine parameter by its guide name, e.g. --set CPU_CAP_VALUE=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringllm", description=(
        "Run a Llama model far larger than your GPU by streaming its weights "
        "SSD -> pinned DRAM ring -> GPU."))
    parser.add_argument("--version", action="version", version=f"ringllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(commands=sub.choices)      # main: a subcommand's usage errors are its own
    _add_generate(sub)
    sub.add_parser("pull-demo", help="import the built-in demo model (SmolLM2-135M-Instruct) into the cache",
                   formatter_class=HelpFormatter)

    tp = sub.add_parser("top", help="watch a running ringllm: window, ring slots, loaders, copies, tokens/s",
                        formatter_class=HelpFormatter)
    tp.add_argument("--run", default=None, help="run id (default: the newest live run)")
    tp.add_argument("--interval", type=float, default=0.5,
                    help=f"seconds between refreshes, at least {MIN_TOP_INTERVAL_S}")
    tp.add_argument("--once", action="store_true", help="print one snapshot and exit")

    cl = sub.add_parser("cleanup", help="remove what killed runs left: shared memory, message queues, processes",
                        formatter_class=HelpFormatter)
    cl.add_argument("--all", action="store_true", help="also the resources of runs that are still alive")

    mk = sub.add_parser("make-checkpoint", help="write a random-weight Llama checkpoint at real sizes",
                        formatter_class=HelpFormatter)
    mk.add_argument("--shape", default="llama-3.1-70b", help="llama-3.1-70b, llama-3.1-8b or tiny")
    mk.add_argument("--layers", type=int, default=None, help="layers to write (default: the shape's)")
    mk.add_argument("--out", type=Path, required=True, help="the checkpoint directory to write")
    mk.add_argument("--dtype", choices=dtypes.NAMES, default="bfloat16", help="weight dtype")
    mk.add_argument("--shard-size", default="5GB", help="shard size (default 5GB, as published)")
    mk.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    cv = sub.add_parser("convert", help="write an FP8 copy of a bf16/fp16/fp32 checkpoint (half the bytes a token)",
                        formatter_class=HelpFormatter,
                        description="Quantize the decoder's Linear weights to FP8 e4m3 with one scale per output "
                                    "channel, in the compressed-tensors float-quantized layout (read by ringllm, "
                                    "transformers + compressed-tensors, vLLM). Norms, embeddings and lm_head keep "
                                    "the source dtype.")
    cv.add_argument("--to", choices=("fp8",), required=True, help="target format")
    cv.add_argument("src", type=Path, metavar="SRC", help="the source model directory (bf16, fp16 or fp32)")
    cv.add_argument("dst", type=Path, metavar="DST", help="the directory to write (new or empty)")
    cv.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (default: it keeps the source dtype)")

    _add_serve(sub)

    b = sub.add_parser("bench", help="measure ringllm against this machine's floor and against peers",
                       formatter_class=HelpFormatter)
    b.add_argument("--model", type=Path, required=True, help="Hugging Face Llama model directory")
    b.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    b.add_argument("--gpu-mem", default="24GiB", help="GPU cap for ringllm and every peer (default 24GiB)")
    b.add_argument("--loaders", type=int, default=None,
                   help="loader processes (default: from the CPU count and the disk, then measured)")
    b.add_argument("--decode-tokens", type=int, default=4, help="tokens decoded per decode row")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length before the decode rows")
    b.add_argument("--prefill-tokens", type=int, default=2048, help="prompt length of the prefill row")
    b.add_argument("--peers", default="accelerate,naive,airllm", help="comma-separated; '' for none")
    b.add_argument("--preset", choices=("conservative", "balanced", "aggressive"), default=None,
                   help="the user guide's presets (default: none, the built-in parameter defaults)")
    b.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="set an engine parameter by its guide name")
    b.add_argument("--json", type=Path, default=None, help="write the full report here")
    b.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


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

    from ringllm.choose import build_engine_config
    from ringllm.config import parse_bytes
    from ringllm.tools.bench import bench, format_table

    check_model_arg(args.model)
    if args.json is not None:
        check_output_path(args.json, "--json")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = build_engine_config(args, args.model, max(args.prompt_tokens + args.decode_tokens, args.prefill_tokens + 1))
    report = bench(args.model, device, parse_bytes(args.gpu_mem), engine, args.decode_tokens, args.prompt_tokens,
                   args.prefill_tokens, [p for p in args.peers.split(",") if p],
                   log=lambda m: print(m, file=sys.stderr, flush=True), loaders_fixed=args.loaders is not None)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):   # not a real file (embedded, captured): nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _quiet_torch_without_numpy() -> None:
    """torch warns at import when numpy is missing. ringllm never converts tensors to numpy (it is
    no dependency), so that warning is noise: silence it here and, through the environment they
    inherit, in the child processes."""
    message = "Failed to initialize NumPy"
    warnings.filterwarnings("ignore", message=message, category=UserWarning)
    inherited = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [inherited, f"ignore:{message}:UserWarning"]))


# What `generate` and `bench` import before the supervisor takes over the signals (dataclasses
# compile their methods with exec()). A streaming `generate` never imports torch here: 6 s of an
# H200 host's start, and only the GPU process needs it (ringllm.device_probe); --resident and
# bench compute in this process and import it too.
ENGINE_MODULES = ("tokenizers", "jinja2.sandbox", "ringllm.supervisor.supervisor", "ringllm.checkpoint.text",
                  "ringllm.workers.memory_plan", "ringllm.tools.demo_model", "ringllm.generate", "ringllm.choose")
COMPUTE_MODULES = ("torch", "ringllm.workers.model", "ringllm.workers.generation", "ringllm.workers.resident")


def _import_holding_signals(modules) -> None:
    """Import with SIGINT and SIGTERM held back, then act on them. Raised inside an import, a
    KeyboardInterrupt can be swallowed (the run went on after Ctrl-C), turn into another error,
    print "Exception ignored" tracebacks, or, inside code run by exec(), make Python end itself
    with SIGINT after our clean exit."""
    import importlib

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
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:     # argparse would blame `ringllm`, whose usage does not show the option's command
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if argv is None:   # the command itself, not embedded in another program
        _quiet_torch_without_numpy()
    if argv is None and args.command in ("generate", "bench"):
        from ringllm.workers.process_setup import set_process_name
        set_process_name("ringllm-sup")   # what ps shows for the supervisor (not when embedded)
    from ringllm.workers.process_setup import configure_logging
    configure_logging("[ringllm] %(message)s", getattr(args, "verbose", False))   # others' INFO stays quiet
    try:
        if argv is None and args.command in ("generate", "bench"):
            here = args.command == "bench" or args.resident          # computes in this process
            _import_holding_signals(ENGINE_MODULES + (COMPUTE_MODULES if here else ())
                                    + (("ringllm.tools.bench",) if args.command == "bench" else ()))
        if args.command == "generate":
            from ringllm.generate import cmd_generate
            return cmd_generate(args)
        if args.command == "serve":
            from ringllm.serve.server import cmd_serve
            return cmd_serve(args)
        if args.command == "make-checkpoint":
            from ringllm.config import parse_bytes
            from ringllm.tools.make_checkpoint import make_checkpoint
            print(make_checkpoint(args.out, args.shape, args.layers, args.dtype, parse_bytes(args.shard_size), args.seed))
            return 0
        if args.command == "convert":
            from ringllm.convert import convert_to_fp8
            check_model_arg(args.src)
            convert_to_fp8(args.src, args.dst, args.quantize_lm_head,
                           log=lambda m: print(f"ringllm convert: {m}", file=sys.stderr))
            return 0
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "top":
            from ringllm.tools.top import run_top
            check_top_interval(args.interval)
            return run_top(args.run, args.interval, args.once)
        if args.command == "cleanup":
            return cmd_cleanup(args)
        if args.command == "pull-demo":
            from ringllm.tools.demo_model import ensure_demo_model
            print(ensure_demo_model(default_cache_dir()))
            return 0
    except (RingllmError, KeyboardInterrupt) as err:
        return report_failure(err)
    except BrokenPipeError:
        # The reader of stdout went away (`ringllm generate | head`): end quietly like other tools
        # once the run has cleaned up (the supervisor's finally has run by now). Python flushes
        # stdout again at exit; point it at /dev/null so that flush cannot fail a second time.
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except BaseException as err:
        from ringllm.supervisor.supervisor import Terminated
        if isinstance(err, Terminated):
            print("ringllm: terminated", file=sys.stderr)
            return 143
        raise
    return 2


if __name__ == "__main__":
    sys.exit(main())
