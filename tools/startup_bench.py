"""The start-up benchmark (issue #12): time to first token against the disk, in one call.

    python -m ringllm.tools.startup_bench --model DIR --out OUT [--gpu-mem 24GiB] [--preset auto]
                                          [--loaders K] [--runs N] [--new-tokens 3] [--device cuda]

  1. N runs of `ringllm generate --model DIR --no-chat --prompt hello --max-new-tokens 3
     --metrics-json ...` (with --gpu-mem, --preset, --loaders, --device, --set as given), each
     in its own process, the page cache dropped before each (every byte comes from the disk);
  2. the disk ceiling as the run's loaders reach it (ringllm.disk_probe, engine.loaders of the
     first run's metrics, its chunk size and depth; the page cache dropped first);
  3. per run, the bytes the first token needs: the ring's first fill as the coordinator counted
     it (startup.fill.bytes: what the loaders read, O_DIRECT-aligned) + the tensors of the
     GPU-resident layers (the first `gpu_resident_layers` layers) + embeddings + final norm +
     lm_head (a tied lm_head is the embeddings, counted once); their pure read time at the
     ceiling, the issue's target (that time + 5 s) and the verdict (first_token_wall_s <= target);
  4. OUT/startup-bench.json (the card, the command line, each run's `startup` object) and
     OUT/startup-bench.txt: a row per run with each phase's start -> end and the phase that
     ended last before the first pass began (what the first pass waited for to start); phases
     still running once it began (the fill, when the prefill waits on the disk) are named too.
     The phases count from the engine's start, as first_token_wall_s does; the command's imports
     come before it (with its exit, `outside`: the command's wall seconds - the engine's wall_s).

Without root the page cache cannot be dropped: the tool says so, and the runs may read from DRAM.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

TARGET_SLACK_S = 5.0                 # the target: the pure read time + 5 s
CEILING_MAX_BYTES = 24 * 2**30       # the probe reads at most this much, or for this long
CEILING_MAX_SECONDS = 10.0
RUN_TIMEOUT_S = 1200.0               # one generate run (80 layers of 70B: 101 s to first token)
STOP_GRACE_S = 30.0                  # a terminated run removes its ring and queues first
PHASES = ("spawn", "attach", "fill", "warm", "register", "resident_load", "warm_up", "first_pass")
EPS_S = 1e-3                         # the phases' stamps are rounded to 0.1 ms


def log(msg: str) -> None:
    print(f"[startup_bench] {msg}", file=sys.stderr, flush=True)


# --- one run -------------------------------------------------------------------------------------
def generate_command(args, metrics: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ringllm", "generate", "--model", str(args.model), "--no-chat",
           "--prompt", "hello", "--max-new-tokens", str(args.new_tokens), "--metrics-json", str(metrics)]
    for flag, value in (("--gpu-mem", args.gpu_mem), ("--preset", args.preset), ("--loaders", args.loaders),
                        ("--device", args.device)):
        if value is not None:
            cmd += [flag, str(value)]
    for item in args.params:
        cmd += ["--set", item]
    return cmd


def shown(cmd: list[str]) -> str:
    """The generate command as a user would type it (the metrics file is the tool's own)."""
    words = ["ringllm", *cmd[3:]]
    words[words.index("--metrics-json") + 1] = "M.json"
    return shlex.join(words)


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].removeprefix("ringllm: error: ") if lines else "(nothing on stderr)"


def run_generate(cmd: list[str], workdir: Path, label: str, timeout_s: float) -> tuple[dict, float]:
    """(the run's --metrics-json, the command's wall seconds); RingllmError with the run's last
    stderr line when it fails, or when it outlives `timeout_s` (then it is stopped: SIGTERM, which
    removes its ring and queues, SIGKILL after a grace)."""
    metrics, stderr = Path(cmd[cmd.index("--metrics-json") + 1]), workdir / "stderr.txt"
    metrics.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            code = proc.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as why:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_GRACE_S)
            if isinstance(why, KeyboardInterrupt):
                raise
            raise RingllmError(f"{label}: no result within {timeout_s:.0f} s (--run-timeout); stopped it; "
                               f"its last line: {last_line(stderr)}") from None
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RingllmError(f"{label}: ringllm generate exited with {code}: {last_line(stderr)}")
    try:
        return json.loads(metrics.read_text()), seconds
    except (OSError, ValueError) as e:
        raise RingllmError(f"{label}: ringllm generate exited 0 but its --metrics-json {metrics} "
                           f"cannot be read ({e})") from None


# --- what the first token needs -------------------------------------------------------------------
def first_token_bytes(layout, fill_bytes: int, resident_layers: int) -> dict:
    """Bytes read before the first token: the ring's fill as counted, plus the tensors that the GPU
    process reads itself (the first `resident_layers` layers, embeddings, final norm, lm_head)."""
    layer_bytes = sum(e.extent.nbytes for layer in range(resident_layers)
                      for kind in ("attn", "ffn") for e in layout.group(layer, kind).entries)
    head = [t for t in (layout.lm_head, layout.lm_head_scale) if t is not None]   # None: tied
    parts = {"fill": fill_bytes, "resident_layers": resident_layers, "resident_layer_bytes": layer_bytes,
             "embed": layout.embed.nbytes, "final_norm": layout.final_norm.nbytes,
             "lm_head": sum(t.nbytes for t in head), "lm_head_tied": layout.lm_head is None}
    parts["total"] = fill_bytes + layer_bytes + parts["embed"] + parts["final_norm"] + parts["lm_head"]
    return parts


def verdict(first_token_s: float | None, needed_bytes: int, ceiling_gbps: float) -> dict:
    read_s = needed_bytes / (ceiling_gbps * 1e9) if ceiling_gbps > 0 else None
    target = read_s + TARGET_SLACK_S if read_s is not None else None
    met = first_token_s <= target if first_token_s is not None and target is not None else None
    return {"read_s": read_s, "target_s": target, "met": met}


def phase_spans(startup: dict) -> dict:
    """{phase: (start, end)} in seconds from the engine's start, in PHASES order."""
    return {name: (p["start"], p["start"] + p["seconds"]) for name in PHASES
            if isinstance(p := startup.get(name), dict)}


def first_pass_waited_for(startup: dict) -> tuple[str | None, list[str]]:
    """(the phase that ended last before the first pass began, the phases still running then)."""
    spans = phase_spans(startup)
    if "first_pass" not in spans:
        return None, []
    begin = spans["first_pass"][0]
    others = {n: s for n, s in spans.items() if n != "first_pass"}
    before = [n for n, (_, end) in others.items() if end <= begin + EPS_S]
    last = max(before, key=lambda n: others[n][1]) if before else None
    return last, [n for n, (_, end) in others.items() if end > begin + EPS_S]


# --- the benchmark --------------------------------------------------------------------------------
def check_inputs(args) -> None:
    from ringllm.cli_input import check_model_arg

    check_model_arg(args.model)       # a Hub id gets the way forward
    if not args.model.is_dir():
        raise RingllmError(f"--model {args.model}: no such directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RingllmError(f"--out {args.out}: cannot create it ({err.strerror})") from None


def drop_cache(dropped: list) -> None:
    """Drop the page cache; say once when this process may not (not root)."""
    from ringllm.measure import drop_page_cache

    ok = drop_page_cache()
    if not ok and all(dropped):
        log("cannot drop the page cache (not root): the runs and the ceiling may read from DRAM, not the disk")
    dropped.append(ok)


def startup_bench(args, command: str) -> dict:
    from ringllm.checkpoint.layout import load_layout
    from ringllm.disk_probe import measure_disk_with_loaders
    from ringllm.shm.slot_plan import plan_model

    layout = load_layout(args.model)      # a damaged checkpoint fails here, before any run
    dropped: list[bool] = []
    runs = []
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        work = Path(tmp)
        cmd = generate_command(args, work / "metrics.json")
        for i in range(args.runs):
            drop_cache(dropped)
            label = f"run {i + 1} of {args.runs}"
            log(f"{label}: {shown(cmd)}")
            metrics, seconds = run_generate(cmd, work, label, args.run_timeout)
            startup = metrics.get("startup") or {}
            if not isinstance(startup.get("fill"), dict) or metrics.get("gpu_resident_layers") is None:
                raise RingllmError(f"{label}: its --metrics-json has no startup.fill or gpu_resident_layers: "
                                   "this ringllm predates the start-up metrics")
            # first_token_wall_s counts from the engine's start; the command's imports come before
            # it and its exit after: together command_s - wall_s (an upper bound of the former)
            wall = metrics.get("wall_s")
            runs.append({"first_token_wall_s": metrics.get("first_token_wall_s"), "startup": startup,
                         "command_s": seconds, "outside_engine_s": seconds - wall if wall is not None else None,
                         "gpu_resident_layers": metrics["gpu_resident_layers"], "metrics": metrics})
            log(f"{label}: first token {fmt_s(metrics.get('first_token_wall_s'))} s from the engine's start")

    engine = runs[0]["metrics"].get("engine") or {}
    loaders = engine.get("loaders") or args.loaders or 1
    resident = runs[0]["gpu_resident_layers"]
    plans = plan_model(layout, engine.get("merge_gap", 1 << 20))
    drop_cache(dropped)
    log(f"the disk ceiling with {loaders} loader(s)")
    probe = measure_disk_with_loaders(plans[resident:] + plans[:resident], loaders,
                                      engine.get("chunk_bytes", 16 << 20), engine.get("dispatch_depth", 2),
                                      max_bytes=args.ceiling_bytes, max_seconds=CEILING_MAX_SECONDS)
    for run in runs:
        run["bytes"] = first_token_bytes(layout, run["startup"]["fill"]["bytes"], run["gpu_resident_layers"])
        run.update(verdict(run["first_token_wall_s"], run["bytes"]["total"], probe.gbps))
        run["waited_for"], run["running_into_first_pass"] = first_pass_waited_for(run["startup"])
    first = runs[0]["metrics"]
    return {"card": first.get("device"), "model": str(args.model), "layers": layout.config.num_layers,
            "command": command, "generate_command": shown(cmd),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "page_cache_dropped": all(dropped), "new_tokens": args.new_tokens, "target_slack_s": TARGET_SLACK_S,
            "ceiling": {"gbps": probe.gbps, "loaders": probe.loaders, "bytes": probe.bytes, "seconds": probe.seconds,
                        "direct": probe.direct, "chunks": probe.chunks},
            "runs": runs}


def fmt_s(v, fmt=".2f") -> str:
    return format(v, fmt) if v is not None else "-"


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def format_table(report: dict) -> str:
    c = report["ceiling"]
    lines = [f"{report['card']}: {report['model']} ({report['layers']} layers), {report['new_tokens']} new tokens; "
             f"page cache dropped before each run: {'yes' if report['page_cache_dropped'] else 'NO (not root)'}",
             f"  {report['generate_command']}",
             f"disk ceiling (loaders): {c['gbps']:.2f} GB/s with {c['loaders']} loader(s) "
             f"({'O_DIRECT' if c['direct'] else 'buffered'}; {fmt_bytes(c['bytes'])} in {c['seconds']:.2f} s)",
             f"target: the first token's bytes at that ceiling + {report['target_slack_s']:g} s; "
             f"times in seconds from the engine's start; outside: the command's seconds outside the engine "
             f"(imports before it, exit after)", ""]
    head = ["run", "first token", "target", "verdict", "needs", "outside", *PHASES, "first pass waited for"]
    rows = []
    for i, run in enumerate(report["runs"], 1):
        spans = phase_spans(run["startup"])
        waited = run["waited_for"] or "-"
        if run["running_into_first_pass"]:
            waited += " (running on: " + ", ".join(f"{n} until {spans[n][1]:.2f}"
                                                    for n in run["running_into_first_pass"]) + ")"
        rows.append([str(i), fmt_s(run["first_token_wall_s"]), fmt_s(run["target_s"]),
                     {True: "met", False: "MISSED", None: "-"}[run["met"]], fmt_bytes(run["bytes"]["total"]),
                     fmt_s(run["outside_engine_s"]),
                     *(f"{spans[n][0]:.2f}->{spans[n][1]:.2f}" if n in spans else "-" for n in PHASES), waited])
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    for k, r in enumerate([head, *rows]):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    lines.append("")
    for i, run in enumerate(report["runs"], 1):
        b = run["bytes"]
        lm_head = "(tied: the embeddings)" if b["lm_head_tied"] else fmt_bytes(b["lm_head"])
        lines.append(f"run {i} needs {fmt_bytes(b['total'])} = ring fill {fmt_bytes(b['fill'])} + "
                     f"{b['resident_layers']} GPU-resident layer(s) {fmt_bytes(b['resident_layer_bytes'])} + "
                     f"embeddings {fmt_bytes(b['embed'])} + final norm {fmt_bytes(b['final_norm'])} + lm_head "
                     f"{lm_head}: {fmt_s(run['read_s'], '.3f')} s of reading at the ceiling")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.startup_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face Llama model directory")
    ap.add_argument("--out", type=Path, required=True, help="directory for startup-bench.json and startup-bench.txt")
    ap.add_argument("--gpu-mem", default=None, help="passed to ringllm generate (e.g. 24GiB)")
    ap.add_argument("--preset", choices=("conservative", "balanced", "aggressive", "auto"), default=None,
                    help="passed to ringllm generate")
    ap.add_argument("--loaders", type=int, default=None, help="passed to ringllm generate (default: its own)")
    ap.add_argument("--runs", type=int, default=1, help="generate runs, the page cache dropped before each")
    ap.add_argument("--new-tokens", type=int, default=3, help="--max-new-tokens of each run")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="passed to ringllm generate")
    ap.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE",
                    help="an engine parameter by its guide name, passed to ringllm generate")
    ap.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S, help="seconds one run may take")
    ap.add_argument("--ceiling-gib", type=float, default=CEILING_MAX_BYTES / 2**30,
                    help=f"the disk probe reads at most this many GiB (or for {CEILING_MAX_SECONDS:.0f} s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("runs", "new_tokens", "ceiling_gib", "run_timeout"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')}: must be above 0")
    args.ceiling_bytes = int(args.ceiling_gib * 2**30)
    command = shlex.join([sys.executable, "-m", "ringllm.tools.startup_bench",
                          *(argv if argv is not None else sys.argv[1:])])
    try:
        check_inputs(args)
        report = startup_bench(args, command)
    except RingllmError as err:
        print(f"ringllm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:          # the run was stopped and waited for; the probe cleans up
        print("ringllm: interrupted", file=sys.stderr)
        return 130
    from ringllm.tools.bench import save_report

    save_report(args.out, "startup-bench", report, format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
