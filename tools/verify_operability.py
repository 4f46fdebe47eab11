"""GPU-machine check of the user-facing run (docs/operability-gpu.md), in one call:

    python3 -m ringllm.tools.verify_operability --out OUT_DIR [--gpu-mem 24GiB]

1. The CUDA tests (tests/test_gpu.py and the CLI tests, whose resource fixture also checks the
   machine's pinned memory after each test): the ring is pinned while a run lasts, every pinned
   byte is returned after it, and the tokens equal the CPU's.
2. `ringllm generate --preset auto --measure --metrics-json` on tools.gpu_bench's 70B-shaped
   checkpoint: the printed choices, the metrics, and a trace of the pinned bytes (the GPU
   process's VmLck/VmPin and the machine-wide FOLL_PIN counters) sampled while it runs and after.
3. The same with the bench's settings (`--preset conservative`), which is disk-fed here.
Everything lands in OUT_DIR: pytest.txt, summary.json, and per run <name>.log (the tokens and
the log lines), metrics-<name>.json and pinned-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT_WORDS = 128        # the bench's prompt length


def sample_pinned(proc: subprocess.Popen, trace: list, stop: threading.Event) -> None:
    """Every 0.25 s: seconds since start, the GPU process's VmLck and VmPin, machine-wide pinned."""
    import psutil

    from ringllm.supervisor.checks import process_memory
    from ringllm.shm.resources import system_pinned_bytes

    t0 = time.monotonic()
    while not stop.is_set():
        gpu = None
        try:
            gpu = next((c for c in psutil.Process(proc.pid).children(recursive=True)
                        if c.name() == "ringllm-gpu"), None)
        except psutil.Error:
            pass
        mem = process_memory(gpu.pid) if gpu else {"locked": 0, "pinned": 0}
        trace.append({"t": round(time.monotonic() - t0, 2), "gpu_vmlck": mem["locked"], "gpu_vmpin": mem["pinned"],
                      "system_pinned": system_pinned_bytes()})
        stop.wait(0.25)


def generate(name: str, model: Path, out: Path, extra: list[str], new_tokens: int) -> dict:
    from ringllm.shm.resources import system_pinned_bytes

    prompt = model / "prompt.txt"
    prompt.write_text(" ".join(f"t{3 + i}" for i in range(PROMPT_WORDS)))
    metrics = out / f"metrics-{name}.json"
    cmd = [sys.executable, "-m", "ringllm", "generate", "--model", str(model), "--prompt-file", str(prompt),
           "--no-chat", "--max-new-tokens", str(new_tokens), "--metrics-json", str(metrics), *extra]
    before = system_pinned_bytes()
    trace: list = []
    stop = threading.Event()
    t0 = time.monotonic()
    with open(out / f"{name}.log", "w") as log:     # the tokens, then the log lines
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=sample_pinned, args=(proc, trace, stop), daemon=True)
        sampler.start()
        code = proc.wait()
    wall = time.monotonic() - t0
    after_exit = system_pinned_bytes()
    time.sleep(2.0)
    stop.set()
    sampler.join()
    after_2s = system_pinned_bytes()
    pinned = {"command": cmd, "exit_code": code, "wall_seconds": wall, "system_pinned_before": before,
              "system_pinned_after_exit": after_exit, "system_pinned_2s_after": after_2s,
              "peak_system_pinned_above_before": max((s["system_pinned"] or 0) for s in trace) - (before or 0),
              "peak_gpu_vmlck": max(s["gpu_vmlck"] for s in trace), "peak_gpu_vmpin": max(s["gpu_vmpin"] for s in trace),
              "trace": trace}
    (out / f"pinned-{name}.json").write_text(json.dumps(pinned, indent=1))
    print(f"[verify_operability] {name}: exit {code} in {wall:.0f} s; pinned above before: peak "
          f"{pinned['peak_system_pinned_above_before'] / 2**30:.2f} GiB, after exit "
          f"{((after_exit or 0) - (before or 0)) / 2**20:.1f} MiB", flush=True)
    return {"exit_code": code, "metrics": json.loads(metrics.read_text()) if metrics.exists() else None,
            **{k: v for k, v in pinned.items() if k != "trace"}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/ringllm-bench"))
    ap.add_argument("--gpu-mem", default="24GiB")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from ringllm.tools.gpu_bench import bench_checkpoint

    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                            "tests/test_cli_streaming.py"], capture_output=True, text=True, env=os.environ)
        (args.out / "pytest.txt").write_text(r.stdout + r.stderr)
        summary["tests"] = {"exit_code": r.returncode, "last_line": r.stdout.strip().splitlines()[-1:]}
        print(f"[verify_operability] tests: {summary['tests']}", flush=True)
    model, _ = bench_checkpoint(args.scratch)
    common = ["--gpu-mem", args.gpu_mem]
    summary["auto"] = generate("auto", model, args.out, [*common, "--preset", "auto", "--measure"], new_tokens=16)
    summary["conservative"] = generate("conservative", model, args.out, [*common, "--preset", "conservative"],
                                       new_tokens=4)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
