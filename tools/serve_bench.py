"""The serving load test (issue #15): aggregate tokens/s and per-token latency of `ringllm serve`
at 1, 8, 32 and 64 concurrent streams, in one command.

    python -m ringllm.tools.serve_bench --model DIR --out DIR [--streams 1,8,32,64] [--max-tokens 32]
                                        [--prompt-tokens 32] [--gpu-mem 24GiB] [--device cuda]
                                        [--set NAME=VALUE ...] [--loaders K] [--preset P]

It starts `python -m ringllm serve` (the streaming engine, --max-batch = the most streams, a
context of prompt + max_tokens) on a free port of 127.0.0.1, waits for /health, then per stream
count N sends N streamed /v1/completions at once (each its own random token-id prompt, greedy,
max_tokens), reading the server-sent events as a client does (httpx). Per N: the wall time from
the first request sent to the last [DONE], tokens received, aggregate tokens/s, its ratio to the
1-stream figure (the issue's target: 64 streams >= 40x), and the per-token latency of the streams
(the gaps between a stream's successive tokens, its first token after the request not counted:
that is the prefill's) at p50 and p95. Writes serve-bench.json and serve-bench.txt, then stops the
server with SIGTERM (it drains and removes everything).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

TARGET_64_OVER_1 = 40.0
START_TIMEOUT_S = 1800.0      # an 80-layer server fills its ring from disk before /health is ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def one_stream(url: str, model: str, prompt: list[int], max_tokens: int, out: dict, timeout_s: float) -> None:
    """A streamed completion read as a client reads it: the arrival time of every token chunk."""
    import httpx

    t0 = time.perf_counter()
    arrivals: list[float] = []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    usage = None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                out.update(error=f"HTTP {r.status_code}: {r.read()[:200]!r}")
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    arrivals.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except Exception as err:   # the row reports it; the other streams go on
        out.update(error=f"{type(err).__name__}: {err}")
        return
    # tokens: the server's count (a token whose text is held back, e.g. part of a character, sends
    # no chunk of its own); latency: the chunks as they arrived
    out.update(start=t0, arrivals=arrivals, end=time.perf_counter(),
               tokens=usage["completion_tokens"] if usage else len(arrivals))


def run_round(url: str, model: str, streams: int, prompt_tokens: int, max_tokens: int, vocab: int,
              rng: random.Random, timeout_s: float) -> dict:
    results = [{} for _ in range(streams)]
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_tokens)] for _ in range(streams)]
    threads = [threading.Thread(target=one_stream, args=(url, model, p, max_tokens, r, timeout_s))
               for p, r in zip(prompts, results)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r.get("tokens", 0) for r in results)
    gaps = [b - a for r in results for a, b in zip(r.get("arrivals", []), r.get("arrivals", [])[1:])]
    firsts = [r["arrivals"][0] - r["start"] for r in results if r.get("arrivals")]
    return {"streams": streams, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
            "token_latency_p50_s": percentile(gaps, 0.5), "token_latency_p95_s": percentile(gaps, 0.95),
            "first_token_p50_s": percentile(firsts, 0.5), "errors": errors}


def start_serve(cmd: list[str], url: str, timeout_s: float = START_TIMEOUT_S):
    """Start `ringllm serve` (cmd) and wait until `url`/health answers 200: (process, the list its
    stderr lines go to, the thread that reads them). Raises RingllmError with the server's last
    line if it exits first."""
    import httpx

    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_tail: list[str] = []
    reader = threading.Thread(target=lambda: [stderr_tail.append(line) for line in server.stderr], daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if server.poll() is not None:
                raise RingllmError(f"ringllm serve exited with {server.returncode}: "
                                   f"{(stderr_tail or ['(no output)'])[-1].strip()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return server, stderr_tail, reader
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RingllmError(f"ringllm serve did not answer /health within {timeout_s:.0f} s")
            time.sleep(0.5)
    except BaseException:
        stop_serve(server, reader)
        raise


def stop_serve(server: subprocess.Popen, reader: threading.Thread, timeout_s: float = 120.0) -> int | None:
    """SIGTERM (the server drains and removes everything); SIGKILL if it is still there after
    timeout_s. Returns the exit status, None when it had to be killed."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        code = None
    reader.join(timeout=5)
    return code


def serve_bench(model_dir: Path, streams: list[int], max_tokens: int, prompt_tokens: int, serve_args: list[str],
                log=print, seed: int = 0) -> dict:
    from ringllm.checkpoint.layout import load_layout

    layout = load_layout(model_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ringllm", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch", str(max(streams)), "--max-context", str(prompt_tokens + max_tokens),
           "--served-model-name", "bench", *serve_args]
    log(f"[serve_bench] {' '.join(cmd)}")
    server, stderr_tail, reader = start_serve(cmd, url)
    try:
        rng = random.Random(seed)
        vocab = layout.config.vocab_size
        run_round(url, "bench", 1, prompt_tokens, 2, vocab, rng, 600.0)      # warm-up: one short request
        rounds = []
        for n in streams:
            r = run_round(url, "bench", n, prompt_tokens, max_tokens, vocab, rng, 3600.0)
            rounds.append(r)
            log(f"[serve_bench] {n} streams: {r['tokens']} tokens in {r['wall_s']:.2f} s = "
                f"{r['tokens_per_s']:.2f} tok/s; errors {len(r['errors'])}")
    finally:
        stop_serve(server, reader)
    one = next((r["tokens_per_s"] for r in rounds if r["streams"] == 1), None)
    for r in rounds:
        r["over_1_stream"] = r["tokens_per_s"] / one if one and r["tokens_per_s"] else None
    at_64 = next((r["over_1_stream"] for r in rounds if r["streams"] == 64), None)
    # the card, as the server's GPU process named it ("GPU process ready on NVIDIA H200 (cuda:0, ...)")
    ready = next((m.group(1) for line in stderr_tail if (m := re.search(r"GPU process ready on (.+?) \(", line))), None)
    return {"model": str(model_dir), "layers": layout.config.num_layers, "card": ready or "cpu", "command_serve": cmd,
            "max_tokens": max_tokens, "prompt_tokens": prompt_tokens, "rounds": rounds,
            "server_exit": server.returncode, "target_64_over_1": TARGET_64_OVER_1,
            "met": None if at_64 is None else at_64 >= TARGET_64_OVER_1,
            "server_log_tail": stderr_tail[-20:]}


def format_table(report: dict) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = [f"ringllm serve on {report.get('card', '?')}, {report['model']} ({report['layers']} layers): "
             f"{report['prompt_tokens']}-token "
             f"prompts, {report['max_tokens']} tokens each, greedy, streamed", "",
             f"{'streams':>8}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'x 1 stream':>12}{'p50 s/tok':>11}"
             f"{'p95 s/tok':>11}{'1st tok p50':>13}{'errors':>8}", "-" * 89]
    for r in report["rounds"]:
        lines.append(f"{r['streams']:>8}{r['tokens']:>8}{r['wall_s']:>9.2f}{f(r['tokens_per_s'], '9.2f')}"
                     f"{f(r['over_1_stream'], '12.2f')}{f(r['token_latency_p50_s'], '11.3f')}"
                     f"{f(r['token_latency_p95_s'], '11.3f')}{f(r['first_token_p50_s'], '13.2f')}{len(r['errors']):>8}")
    verdict = {True: "met", False: "not met", None: "not measured"}[report["met"]]
    lines += ["", f"target: 64 streams >= {report['target_64_over_1']:.0f}x the 1-stream tokens/s: {verdict}; "
                  f"server exit {report['server_exit']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.serve_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Llama model directory")
    ap.add_argument("--out", type=Path, required=True, help="directory for serve-bench.json and serve-bench.txt")
    ap.add_argument("--streams", default="1,8,32,64", help="concurrent streams per round, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens each request asks for")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (random token ids)")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER,
                    help="after --: flags for ringllm serve (e.g. -- --gpu-mem 24GiB --preset auto)")
    args = ap.parse_args(argv)
    try:
        streams = [int(s) for s in args.streams.split(",")]
    except ValueError:
        ap.error(f"--streams: comma-separated counts, got {args.streams!r}")
    if not streams or min(streams) < 1 or args.max_tokens < 2 or args.prompt_tokens < 1:
        ap.error("--streams counts >= 1, --max-tokens >= 2, --prompt-tokens >= 1")
    serve_args = [a for a in args.serve_args if a != "--"]
    try:
        from ringllm.cli_input import check_model_arg

        check_model_arg(args.model)
        args.out.mkdir(parents=True, exist_ok=True)
        report = serve_bench(args.model, streams, args.max_tokens, args.prompt_tokens, serve_args,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    except RingllmError as err:
        print(f"ringllm: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"ringllm: error: --out {args.out}: {err.strerror}", file=sys.stderr)
        return 1
    report.update(command=[sys.executable, "-m", "ringllm.tools.serve_bench", *(argv if argv is not None else sys.argv[1:])],
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), pid=os.getpid())
    from ringllm.tools.bench import save_report

    save_report(args.out, "serve-bench", report, format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
