"""The serve fuzzer (issue #23): `ringllm serve` under hostile requests beside honest streams.

    python -m ringllm.tools.serve_fuzz [--model DIR] [--requests 2000] [--honest 64] [--seed S]
                                       [--resident] [--url URL] [--replay I] [--out report.json]
                                       [-- serve flags]

It starts `ringllm serve` on 127.0.0.1 (a tiny random checkpoint of its own without --model; CPU,
float32), or attaches to one (--url: a server without --api-key serving --model's weights), then
at once:
- honest streams: --honest clients (the official openai client; greedy; completions and chat,
  streamed and not), each asking again and again until the hostile requests are done, and each
  answer must be exactly transformers' greedy text on the same weights (computed once, before
  the server starts, independent of ringllm);
- hostile requests: --requests probes drawn from tools/fuzz_catalogue.py by a seeded RNG (probe i
  from seed S alone, so `--replay i` sends just it), over raw sockets, 8 at a time. Each must end
  in a 4xx, or, where the catalogue says it may be valid, in a 200 with a well-formed body (a
  stream may end in its own error event); a 5xx, an engine error event, no answer, a reset or a
  hang (over 60 s) is a failure.
After them: the engine is idle with its KV cache empty, /health is ok, an honest request still
gets transformers' text; and for a server it started: SIGTERM -> exit 0, no child process and no
/dev/shm segment of its run left, no traceback in its log. Failures are grouped by mutation,
each with its reproducer (the raw request, and the --replay command). Exit 0 when there is none.
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError
from ringllm.tools.fuzz_catalogue import FuzzTarget, Probe, draw

MODEL_NAME = "fuzz"
MAX_CONTEXT = 256
MAX_BODY_BYTES = 1 << 18            # the server's --max-body-bytes: an over-limit probe stays cheap
HOSTILE_WORKERS = 8
PROBE_TIMEOUT_S = 60.0              # a probe without an answer by then is "hung"
HONEST_TIMEOUT_S = 120.0
MAX_HONEST_ROUNDS = 1000            # per honest client: bounded even if the hostile side stalls
RESPONSE_CAP_BYTES = 16 << 20       # read no more than this of one answer
IDLE_TIMEOUT_S = 30.0               # after the run: the engine must be idle within this
EXAMPLES_PER_GROUP = 5
STREAMING_FLAGS = ["--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1"]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    outcome: str         # "refused 400", "accepted", "hung up", or what went wrong


# --- the reference -------------------------------------------------------------------------
@dataclass(frozen=True)
class HonestRequest:
    chat: bool
    stream: bool
    text: str            # the prompt, or the user message
    max_tokens: int
    want: str            # transformers' greedy text
    want_finish: str


def honest_requests(model_dir: Path, count: int, seed: int) -> list[HonestRequest]:
    """`count` honest requests with transformers' greedy answers (CPU, float32)."""
    import random

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # transformers renders the chat template and generates; text <-> ids is the checkpoint's
    # tokenizer.json as it defines them (transformers' tokenizer also treats tokenizer_config's
    # bos_token as special where tokenizer.json does not, as in the tests' tiny tokenizer)
    raw_tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    vocab = model.config.vocab_size
    out = []
    for i in range(count):
        rng = random.Random(f"{seed}:honest:{i}")
        words = raw_tokenizer.decode([rng.randrange(3, vocab) for _ in range(rng.randint(2, 8))])
        chat, stream, max_tokens = i % 2 == 1, i // 2 % 2 == 1, rng.randint(4, 16)
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": words}], add_generation_prompt=True,
                                           tokenize=False)
            ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
        else:
            ids = raw_tokenizer.encode(words).ids
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos_ids),
                                  pad_token_id=min(eos_ids))
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=config)[0, len(ids):].tolist()
        finish = "stop" if new and new[-1] in eos_ids else "length"
        text_out = raw_tokenizer.decode([t for t in new if t not in eos_ids])
        out.append(HonestRequest(chat, stream, words, max_tokens, text_out, finish))
    return out


def ask_honestly(client, req: HonestRequest) -> Verdict:
    """One honest request through the openai client: exactly the reference text and finish."""
    try:
        kw = dict(model=MODEL_NAME, max_tokens=req.max_tokens, temperature=0, stream=req.stream)
        if req.chat:
            r = client.chat.completions.create(messages=[{"role": "user", "content": req.text}], **kw)
            if req.stream:
                chunks = [c.choices[0] for c in r if c.choices]
                text, finish = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
            else:
                text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        else:
            r = client.completions.create(prompt=req.text, **kw)
            if req.stream:
                chunks = [c.choices[0] for c in r if c.choices]
                text, finish = "".join(c.text for c in chunks), chunks[-1].finish_reason
            else:
                text, finish = r.choices[0].text, r.choices[0].finish_reason
    except Exception as err:    # the openai client's errors and a broken stream alike: a failure
        return Verdict(False, f"{type(err).__name__}: {str(err)[:300]}")
    if (text, finish) != (req.want, req.want_finish):
        return Verdict(False, f"got {text!r} ({finish}), transformers: {req.want!r} ({req.want_finish})")
    return Verdict(True, "exact")


# --- hostile probes ------------------------------------------------------------------------
def read_answer(sock: socket.socket, until: bytes | None = None) -> bytes:
    """What the server sends until it closes (or, with `until`, until that is seen after the head),
    within PROBE_TIMEOUT_S in all: a stream kept open by pings is hung too."""
    data, deadline = bytearray(), time.monotonic() + PROBE_TIMEOUT_S
    while len(data) < RESPONSE_CAP_BYTES:
        if time.monotonic() > deadline:
            raise socket.timeout
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        head_end = data.find(b"\r\n\r\n")
        if until is not None and head_end >= 0 and (until in data[head_end:] or not data.startswith(b"HTTP/1.1 200")):
            break
    return bytes(data)


def parse_answer(data: bytes) -> tuple[int | None, dict, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not sep or match is None:
        return None, {}, b""
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "chunked" in headers.get("transfer-encoding", ""):
        decoded, rest = bytearray(), body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            decoded += rest[:size]
            rest = rest[size + 2:]
        body = bytes(decoded)
    return int(match.group(1)), headers, body


def body_problem(headers: dict, body: bytes) -> str | None:
    """None for a well-formed 200: a completion, or a stream of chunks (or its own error event)
    ending in [DONE]; else what is wrong with it."""
    try:
        if "text/event-stream" in headers.get("content-type", ""):
            events = [line[5:].strip() for line in body.decode().splitlines() if line.startswith("data:")]
            if not events or events[-1] != "[DONE]":
                return f"the stream does not end with [DONE] (last: {events[-1:]!r})"
            finish = None
            for event in map(json.loads, events[:-1]):
                if "error" in event:
                    if event["error"].get("type") == "server_error":
                        return f"an engine error event: {event['error']}"
                    return None
                for choice in event["choices"]:
                    finish = choice.get("finish_reason") or finish
                    if not isinstance(choice.get("text", choice.get("delta", {}).get("content", "")), (str, type(None))):
                        return f"a chunk without text: {event}"
            return None if finish in ("stop", "length") else f"the stream's finish_reason is {finish!r}"
        answer = json.loads(body)
        choice = answer["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        if not isinstance(text, str) or choice["finish_reason"] not in ("stop", "length"):
            return f"choice {choice}"
        if not all(isinstance(answer["usage"][k], int) for k in ("prompt_tokens", "completion_tokens")):
            return f"usage {answer['usage']}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        return f"{type(err).__name__} {err} in {body[:300]!r}"
    return None


def collateral(outcome: str) -> str | None:
    """The group of a failure that says the engine or the server is down, whichever request
    caused it (the culprit is among the first of them: the log's traceback names it)."""
    signs = {"down:server-gone": ("cannot connect", "APIConnectionError"),
             "down:engine_unavailable": ("engine_unavailable", "streaming engine stopped"),
             "down:engine_error": ("engine_error", "the engine failed while generating")}
    return next((group for group, words in signs.items() if any(w in outcome for w in words)), None)


def send_probe(probe: Probe, address: tuple[str, int]) -> Verdict:
    try:
        sock = socket.create_connection(address, timeout=PROBE_TIMEOUT_S)
    except OSError as err:
        return Verdict(False, f"cannot connect: {err}")
    try:
        try:
            sock.sendall(probe.raw if probe.sent_limit is None else probe.raw[:probe.sent_limit])
        except (BrokenPipeError, ConnectionResetError):
            pass     # a server may answer (413) before reading the whole body: read what it said
        if probe.hang_up in ("mid-body", "after-send"):
            return Verdict(True, "hung up")
        data = read_answer(sock, b"data:" if probe.hang_up == "mid-stream" else None)
    except socket.timeout:
        return Verdict(False, f"hung: no answer within {PROBE_TIMEOUT_S:.0f} s")
    except ConnectionResetError:
        return Verdict(False, "connection reset by the server")
    finally:
        sock.close()
    status, headers, body = parse_answer(data)
    if status is None:
        return Verdict(False, f"closed without an HTTP answer ({data[:100]!r})")
    if 400 <= status < 500:
        return Verdict(True, f"refused {status}")
    if status != 200:
        return Verdict(False, f"HTTP {status}: {body[:300]!r}")
    if probe.must_refuse:
        return Verdict(False, f"accepted (200) a request it must refuse: {body[:200]!r}")
    if probe.hang_up == "mid-stream":
        return Verdict(True, "hung up mid-stream")
    problem = body_problem(headers, body)
    return Verdict(problem is None, "accepted" if problem is None else f"200 with a bad body: {problem}")


# --- the run -------------------------------------------------------------------------------
def engine_state(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    names = ("requests_running", "requests_waiting", "requests_in_flight", "kv_tokens_used")
    return {n: float(re.search(rf"^ringllm_{n} (\S+)$", text, flags=re.M).group(1)) for n in names}


def wait_idle(url: str) -> str | None:
    """None once nothing is in flight and the KV cache is empty; else what is still held."""
    deadline, state = time.monotonic() + IDLE_TIMEOUT_S, {}
    while time.monotonic() < deadline:
        try:
            state = engine_state(url)
        except Exception as err:    # httpx's errors, a missing metric: the server is not answering
            return f"/metrics: {type(err).__name__}: {err}"
        if not any(state.values()):
            return None
        time.sleep(0.2)
    return f"still held {IDLE_TIMEOUT_S:.0f} s after the last request: {state}"


# lines inside a traceback, or between the chained ones: not yet the exception's own line
CONTINUED = (" ", "\n", "Traceback", "During handling", "The above exception")


def logged_errors(lines: list[str]) -> dict[str, int]:
    """The exceptions in a server log ("Traceback ..." up to the exception's line): how often each
    was logged, by its message and last frame."""
    errors: dict[str, int] = {}
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(CONTINUED)), None)
            if end is None:
                continue
            frame = next((lines[j].strip() for j in range(end - 1, i, -1) if lines[j].lstrip().startswith("File ")), "")
            key = f"{lines[end].strip()[:300]} (at {frame})"
            errors[key] = errors.get(key, 0) + 1
    return errors


class Failures:
    """Failures grouped by mutation, a few examples each with a reproducer."""

    def __init__(self, replay_command: str):
        self.groups: dict[str, dict] = {}
        self.replay_command = replay_command
        self.lock = threading.Lock()

    def add(self, group: str, outcome: str, index: int | None = None, probe: Probe | None = None) -> None:
        with self.lock:
            g = self.groups.setdefault(group, {"count": 0, "examples": []})
            g["count"] += 1
            if len(g["examples"]) < EXAMPLES_PER_GROUP:
                example = {"outcome": outcome}
                if probe is not None:
                    raw = probe.raw if len(probe.raw) <= 2000 else probe.raw[:2000] + b"...(%d bytes)" % len(probe.raw)
                    example.update(index=index, detail=probe.detail, request=raw.decode("latin-1"),
                                   replay=self.replay_command.replace("INDEX", str(index)))
                g["examples"].append(example)


def run_fuzz(model_dir: Path | None = None, requests: int = 2000, honest: int = 64, seed: int = 0,
             resident: bool = False, url: str | None = None, replay: int | None = None,
             serve_args: tuple[str, ...] = (), log=lambda m: None) -> dict:
    """The whole fuzz run; returns the report (report["ok"]: no failure)."""
    # the command that sends probe INDEX alone, to the same kind of server
    replay_command = " ".join(["python -m ringllm.tools.serve_fuzz", f"--seed {seed}", "--replay INDEX"]
                              + ["--resident"] * resident + [f"--model {model_dir}"] * (model_dir is not None)
                              + [f"--url {url}"] * (url is not None) + ["--", *serve_args] * bool(serve_args))
    with tempfile.TemporaryDirectory(prefix="ringllm-fuzz-") as tmp:
        if model_dir is None:
            from ringllm.tools.make_checkpoint import make_checkpoint

            model_dir = make_checkpoint(Path(tmp) / "tiny", "tiny", dtype_name="float32", progress=False)
        return _run(Path(model_dir), requests, honest, seed, resident, url, replay, list(serve_args), log,
                    replay_command)


def _run(model_dir, requests, honest, seed, resident, url, replay, serve_args, log, replay_command) -> dict:
    import openai
    import psutil

    from ringllm.checkpoint.layout import load_layout
    from ringllm.shm.resources import leftover_names, run_id_of
    from ringllm.tools.serve_bench import free_port, start_serve, stop_serve

    t0 = time.monotonic()
    config = load_layout(model_dir).config
    if url is not None and not re.match(r"http://(127\.0\.0\.1|localhost):\d+/?$", url):
        raise RingllmError(f"--url {url}: the fuzzer only talks to http://127.0.0.1:PORT")
    server = reader = starting = None
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "ringllm", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", MODEL_NAME, "--max-context", str(min(MAX_CONTEXT, config.max_position_embeddings)),
               "--max-batch", "16", "--max-waiting", "1024", "--max-body-bytes", str(MAX_BODY_BYTES),
               "--drain-timeout", "10", "--device", "cpu", "--dtype", "float32",
               *(["--resident"] if resident else STREAMING_FLAGS), *serve_args]
        log(f"[serve_fuzz] {' '.join(cmd)}")
        # the server starts while transformers computes the reference (both take seconds)
        starting = ThreadPoolExecutor(1).submit(start_serve, cmd, url, 300)
    log(f"[serve_fuzz] transformers' greedy text for {honest} honest requests")
    try:
        honest_reqs = honest_requests(model_dir, max(honest, 1), seed)
    except BaseException:
        if starting is not None:
            server, _, reader = starting.result()
            stop_serve(server, reader)
        raise
    if starting is not None:
        server, stderr_lines, reader = starting.result()
    host_port = url.split("//", 1)[1].rstrip("/")
    address = (host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1]))
    target = FuzzTarget(host_port, MODEL_NAME, config.vocab_size, MAX_BODY_BYTES)
    failures = Failures(replay_command)
    counts: dict[str, int] = {}
    count_lock = threading.Lock()
    hostile_done = threading.Event()

    def honest_client(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="fuzz", max_retries=0, timeout=HONEST_TIMEOUT_S)
        req = honest_reqs[i % len(honest_reqs)]
        for _ in range(MAX_HONEST_ROUNDS):
            verdict = ask_honestly(client, req)
            with count_lock:
                counts["honest"] = counts.get("honest", 0) + 1
            if not verdict.ok:
                kind = ("chat" if req.chat else "completion") + (" streamed" if req.stream else "")
                failures.add(collateral(verdict.outcome) or f"honest:{kind}", f"honest {kind}: {verdict.outcome}")
            if hostile_done.is_set():
                return

    def hostile(index: int) -> None:
        probe = draw(seed, index, target)
        verdict = send_probe(probe, address)
        with count_lock:
            key = verdict.outcome.split(" ")[0] if verdict.ok else "failed"
            counts[key] = counts.get(key, 0) + 1
        if not verdict.ok:
            # a request that had to be refused fails on its own account, whatever it got instead
            down = None if probe.must_refuse else collateral(verdict.outcome)
            failures.add(down or probe.mutation, verdict.outcome, index, probe)

    try:
        indices = [replay] if replay is not None else list(range(requests))
        honest_threads = [threading.Thread(target=honest_client, args=(i,), daemon=True) for i in range(honest)]
        for t in honest_threads:
            t.start()
        log(f"[serve_fuzz] {time.monotonic() - t0:.1f} s: {len(indices)} hostile requests beside {honest} honest streams on {url}")
        with ThreadPoolExecutor(HOSTILE_WORKERS) as pool:
            list(pool.map(hostile, indices))
        hostile_done.set()
        for t in honest_threads:
            t.join(HONEST_TIMEOUT_S * 2)
            if t.is_alive():
                failures.add("honest:hung", f"an honest client did not finish within {HONEST_TIMEOUT_S * 2:.0f} s")
        log(f"[serve_fuzz] {time.monotonic() - t0:.1f} s: checking the server after the run")
        idle = wait_idle(url)
        if idle is not None:
            failures.add("after:engine-idle", idle)
        client = openai.OpenAI(base_url=url + "/v1", api_key="fuzz", max_retries=0, timeout=HONEST_TIMEOUT_S)
        last = ask_honestly(client, honest_reqs[0])
        if not last.ok:
            failures.add("after:still-answers", last.outcome)
    finally:
        hostile_done.set()
        if server is not None:
            kids = psutil.Process(server.pid).children(recursive=True) if server.poll() is None else []
            code = stop_serve(server, reader, timeout_s=60)
    log(f"[serve_fuzz] {time.monotonic() - t0:.1f} s: the server stopped")
    exit_code = None
    if server is not None:
        exit_code = code
        if code != 0:
            failures.add("after:sigterm-exit", f"the server exited {code} on SIGTERM: {''.join(stderr_lines[-3:])}")
        alive = [f"{p.pid} {p.name()}" for p in kids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if alive:
            failures.add("after:processes-left", f"still running: {alive}")
        left = [n for n in leftover_names() if (run_id_of(n) or "").split("-")[0] == str(server.pid)]
        if left:
            failures.add("after:shm-left", f"left in /dev/shm: {left}")
        for error, count in logged_errors(stderr_lines).items():
            failures.add("after:server-traceback", f"{count}x in the server's log: {error}")
    return {"seed": seed, "requests": len(indices), "honest": honest, "engine": "resident" if resident else "streaming",
            "url": url, "counts": counts, "server_exit": exit_code,
            "failures": failures.groups, "ok": not failures.groups}


def summary(report: dict) -> str:
    c = report["counts"]
    lines = [f"serve fuzz, seed {report['seed']}, {report['engine']} engine: {report['requests']} hostile requests "
             f"(refused {c.get('refused', 0)}, accepted {c.get('accepted', 0)}, hung up {c.get('hung', 0)}, "
             f"failed {c.get('failed', 0)}), {c.get('honest', 0)} honest requests from {report['honest']} clients; "
             f"server exit {report['server_exit']}"]
    for group, g in sorted(report["failures"].items()):
        first = g["examples"][0]
        lines.append(f"FAIL {group}: {g['count']}x; e.g. {first['outcome'][:300]}")
        if "replay" in first:
            lines.append(f"     {first['detail'][:120]}; replay: {first['replay']}")
    lines.append("no failure" if report["ok"] else f"{len(report['failures'])} failing group(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.serve_fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="Llama checkpoint to serve (default: a tiny random one written for the run)")
    ap.add_argument("--requests", type=int, default=2000, help="hostile requests")
    ap.add_argument("--honest", type=int, default=None,
                    help="honest clients streaming beside them (default 64; 0 with --replay)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resident", action="store_true", help="serve with the in-process engine (default: streaming)")
    ap.add_argument("--url", default=None, help="attach to this server (127.0.0.1, no --api-key, serving --model, "
                                                f"--served-model-name {MODEL_NAME}) instead of starting one")
    ap.add_argument("--replay", type=int, default=None, help="send only hostile request number I of --seed")
    ap.add_argument("--out", type=Path, default=None, help="write the report (JSON) here")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: more flags for ringllm serve")
    args = ap.parse_args(argv)
    if args.honest is None:
        args.honest = 0 if args.replay is not None else 64
    if args.requests < 0 or args.honest < 0:
        ap.error("--requests and --honest must be >= 0")
    if args.url is not None and args.model is None:
        ap.error("--url needs --model (the weights it serves, for the reference text)")
    try:
        report = run_fuzz(args.model, args.requests, args.honest, args.seed, args.resident, args.url, args.replay,
                          tuple(a for a in args.serve_args if a != "--"),
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    except RingllmError as err:
        print(f"ringllm: error: {err}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
