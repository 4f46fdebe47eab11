"""`ringllm serve` on the streaming engine (the default): the supervisor, coordinator, loaders and a
GPU process running the batching engine over streamed weights. A real server process each test:
concurrent requests through the official openai client equal transformers' greedy tokens alone;
one weight pass advances several requests; a cancelled stream frees its row; SIGTERM drains and
exits 0; a GPU process killed mid-request means 503s, a non-zero exit, and nothing left behind
(the autouse leak check in conftest.py also runs after each test)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from tests.conftest import hf_greedy_cached  # noqa: E402
from tests.test_serve_lifecycle import free_port  # noqa: E402

STREAMING = ["--device", "cpu", "--dtype", "float32", "--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1"]
EOS = 2


class ServerProcess:
    def __init__(self, model_dir, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ringllm", "serve", "--model", str(model_dir),
                                      "--port", str(self.port), "--served-model-name", "tiny", *STREAMING, *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.err = ""
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"serve exited: {self.proc.communicate()[1]}"
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return float(re.search(rf"^{name} (\S+)$", text, flags=re.M).group(1))

    def gpu_pid(self, name: str = "ringllm-gpu") -> int:
        """The pid of the server's child process `name` (rank r > 0 of --tensor-parallel: ringllm-gpu<r>)."""
        kids = [p for p in psutil.Process(self.proc.pid).children() if p.name() == name]
        assert len(kids) == 1, [(p.pid, p.name()) for p in psutil.Process(self.proc.pid).children()]
        return kids[0].pid

    def wait(self, timeout=60) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        self.err = self.proc.stderr.read()
        return rc

    def kill(self):
        """After a failed assertion: SIGTERM (the server cleans up), SIGKILL only if that hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def run_id(self) -> str:
        return re.search(r"in /ringllm-(\S+)-ring;", self.err).group(1)


def queues_left(run_id: str, loaders: int = 2, gpus: int = 1) -> list[str]:
    """The run's message queues still there (gpus: its GPU processes, one queue a rank)."""
    import posix_ipc

    from ringllm.shm.resources import RunNames

    left = []
    for name in RunNames(run_id, loaders, gpus).queues:
        try:
            posix_ipc.MessageQueue(name).close()
            left.append(name)
        except posix_ipc.ExistentialError:
            pass
    return left


def expected_tokens(hf, prompt_ids, max_tokens):
    ref = hf_greedy_cached(hf, prompt_ids, max_tokens)
    return ref[:ref.index(EOS) + 1] if EOS in ref else ref


PROMPTS = ["w10 w11 w12", "w40 w3 w77 w5", "w100 w101", "w7 w8 w9 w20 w21 w22"]


def test_concurrent_requests_share_passes_cancel_frees_row_sigterm_exits_0(tiny):
    model_dir, hf = tiny
    server = ServerProcess(model_dir, "--max-batch", "4")
    try:
        server.gpu_pid()      # the streaming engine serves: a GPU process, not the server's own thread
        client = server.client()
        results, errors = {}, []

        def ask(prompt):
            try:
                r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
                results[prompt] = r
            except Exception as err:   # noqa: BLE001 - reported by the assertion below
                errors.append(repr(err))

        from ringllm.checkpoint.layout import load_layout
        from ringllm.checkpoint.text import TextCodec

        codec = TextCodec(model_dir, load_layout(model_dir).config)
        passes_before = server.metric("ringllm_passes_total")
        threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        tokens = 0
        for prompt in PROMPTS:
            ids = codec.tokenizer.encode(prompt, add_special_tokens=True).ids
            ref = expected_tokens(hf, ids, 24)
            r = results[prompt]
            want = codec.decode([t for t in ref if t != EOS])
            assert (r.choices[0].text, r.choices[0].finish_reason) == \
                (want, "stop" if ref[-1] == EOS else "length"), prompt
            assert r.usage.completion_tokens == len(ref)
            tokens += len(ref)
        passes = server.metric("ringllm_passes_total") - passes_before
        # one weight pass advanced several requests: fewer passes than tokens
        assert 0 < passes < tokens, (passes, tokens)

        # a cancelled stream (the client leaves) frees its row: kv and running go back to 0
        long_ids = codec.tokenizer.encode(PROMPTS[1], add_special_tokens=True).ids
        full = len(expected_tokens(hf, long_ids, 200))      # what it would generate, not cancelled
        stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=200, temperature=0, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 20
        while server.metric("ringllm_requests_running") or server.metric("ringllm_kv_tokens_used") \
                or server.metric("ringllm_requests_in_flight"):
            assert time.monotonic() < deadline, "the cancelled request kept its row"
            time.sleep(0.1)
        assert server.metric("ringllm_generated_tokens_total") < tokens + full, "the cancel did not stop it"
        # and the row serves a new request
        r = client.completions.create(model="tiny", prompt="w100 w101", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == len(expected_tokens(hf, codec.tokenizer.encode(
            "w100 w101", add_special_tokens=True).ids, 5))

        server.proc.send_signal(signal.SIGTERM)
        rc = server.wait()
    finally:
        server.kill()
    assert rc == 0, server.err
    assert "draining" in server.err, server.err
    assert not queues_left(server.run_id()), server.err


def test_gpu_process_killed_means_503_nonzero_exit_nothing_left(tiny):
    model_dir, _ = tiny
    server = ServerProcess(model_dir, "--max-batch", "2")
    try:
        killed_mid_stream_means_503_nonzero_exit_nothing_left(server, "gpu")
    finally:
        server.kill()


def killed_mid_stream_means_503_nonzero_exit_nothing_left(server: ServerProcess, process: str, gpus: int = 1):
    """SIGKILL the server's ringllm-<process> (gpu; gpu1 for rank 1) while a request streams: the
    stream ends with 503 engine_unavailable naming it, later requests get 503 (or a refused
    connection once the server is gone), the server exits 1 naming it, and no queue of the run
    (every rank's) is left. Waits for the server's exit."""
    pid = server.gpu_pid(f"ringllm-{process}")
    client = server.client()
    first = client.completions.create(model="tiny", prompt="w10 w11", max_tokens=3, temperature=0)
    assert first.choices[0].finish_reason in ("stop", "length")
    # a request in flight: streamed, long, read until its first pieces came
    out: dict = {"events": []}

    def read_stream():
        try:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "w10 w11", "max_tokens": 240,
                                    "temperature": 0, "stream": True}) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out["events"].append(line[len("data: "):])
        except Exception as err:   # noqa: BLE001
            out["error"] = repr(err)

    reader = threading.Thread(target=read_stream)
    reader.start()
    deadline = time.monotonic() + 30
    while len(out["events"]) < 2:
        assert time.monotonic() < deadline, out
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    reader.join(30)
    # new requests: 503 naming the process while the server is still up, or refused once it exited
    late = None
    try:
        late = httpx.post(server.url + "/v1/completions", timeout=10,
                          json={"model": "tiny", "prompt": "w10", "max_tokens": 2})
    except httpx.TransportError:
        pass
    rc = server.wait()
    assert out.get("status") == 200, out
    errors = [json.loads(e)["error"] for e in out["events"] if e != "[DONE]" and "error" in json.loads(e)]
    assert errors and errors[0]["code"] == "engine_unavailable", out["events"][-3:]
    assert f"the {process} process exited unexpectedly" in errors[0]["message"], errors[0]
    assert out["events"][-1] == "[DONE]"
    if late is not None:
        assert late.status_code == 503 and f"{process} process" in late.text, late.text
    assert rc == 1, server.err
    last = server.err.strip().splitlines()[-1]
    assert last.startswith(f"ringllm: error: the streaming engine stopped: the {process} process exited "
                           "unexpectedly"), last
    assert not queues_left(server.run_id(), gpus=gpus), server.err


def test_kv_rows_over_the_gpu_cap_refused_in_one_line(tiny):
    model_dir, _ = tiny
    # 2048 rows of 256 slots: a KV cache of 384 MiB alone (3 layers x k, v x 2 heads x 16 x 4 bytes
    # a slot), over the cap whatever the rest takes
    r = subprocess.run([sys.executable, "-m", "ringllm", "serve", "--model", str(model_dir), "--port",
                        str(free_port()), *STREAMING, "--gpu-mem", "300MiB", "--max-batch", "2048"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ringllm: error:")]
    assert len(errors) == 1 and "--gpu-mem 300.0 MiB" in errors[0] and "KV cache 384.0 MiB" in errors[0], r.stderr
    assert "memory plan: 2048 sequences (--max-batch) of 256 tokens" in r.stderr, r.stderr


def test_request_and_event_messages_keep_to_the_cap():
    """A prompt and a pass's events bigger than one message travel in several, in order."""
    from ringllm.shm.channel import MESSAGE_BYTES, Events, PromptPart, Submit, decode, encode, event_messages, \
        submit_messages
    from ringllm.workers.sampling import SamplingParams

    prompt = [2**32 - 1 - i for i in range(700)]      # 5 msgpack bytes each: 3.5 KB
    msgs = [decode(encode(m)) for m in submit_messages(7, prompt, 9, SamplingParams(0.7, 0.9, 5, 2**40), [2, 3])]
    assert len(msgs) > 1 and all(isinstance(m, PromptPart) for m in msgs[:-1]) and isinstance(msgs[-1], Submit)
    assert [t for m in msgs for t in m.tokens] == prompt and msgs[-1].prompt_len == len(prompt)
    assert (msgs[-1].max_tokens, msgs[-1].temperature, msgs[-1].top_k, msgs[-1].seed, msgs[-1].eos_ids) == \
        (9, 0.7, 5, 2**40, [2, 3])
    rows = [[2**31 + i, 2**32 - 1, "cancelled", 4096, 4096] for i in range(100)]
    events = [decode(encode(m)) for m in event_messages(rows, True)]
    assert all(isinstance(m, Events) and len(encode(m)) <= MESSAGE_BYTES for m in events)
    assert [m.last for m in events] == [False] * (len(events) - 1) + [True]
    assert [r for m in events for r in m.events] == rows


def test_an_fp8_checkpoint_serves_what_transformers_compressed_tensors_generates(tiny, tmp_path):
    """`ringllm serve` on an FP8 checkpoint in the published layout (written by the tests' own
    writer, tests.fp8_reference): concurrent completions give transformers + compressed-tensors'
    greedy tokens on the same files, and nothing is left behind."""
    from tests.fp8_reference import write_fp8_checkpoint
    from tests.test_fp8_engine import transformers_fp8

    from ringllm.checkpoint.layout import load_layout
    from ringllm.checkpoint.text import TextCodec

    fp8 = write_fp8_checkpoint(tiny[0], tmp_path / "fp8")
    hf = transformers_fp8(fp8)
    codec = TextCodec(fp8, load_layout(fp8).config)
    server = ServerProcess(fp8, "--max-batch", "4")
    try:
        client = server.client()
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.setdefault(p, client.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0))) for p in PROMPTS[:3]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for prompt in PROMPTS[:3]:
            ref = expected_tokens(hf, codec.tokenizer.encode(prompt, add_special_tokens=True).ids, 12)
            assert results[prompt].choices[0].text == codec.decode([t for t in ref if t != EOS]), prompt
        server.proc.send_signal(signal.SIGTERM)
        rc = server.wait()
    finally:
        server.kill()
    assert rc == 0, server.err
    assert not queues_left(server.run_id()), server.err


def test_one_bad_request_fails_alone_and_every_row_still_serves(tiny):
    """On the streaming engine: a temperature too small to divide by samples greedily (it made
    every request 503 and the server exit 1); NaN sampling values and seeds outside 64 bits are
    400s naming the field (a seed made a bare 500) while another stream goes on; afterwards
    --max-batch requests are served with transformers' tokens and SIGTERM exits 0."""
    import math

    model_dir, hf = tiny
    server = ServerProcess(model_dir, "--max-batch", "2")
    try:
        from ringllm.checkpoint.layout import load_layout
        from ringllm.checkpoint.text import TextCodec

        codec = TextCodec(model_dir, load_layout(model_dir).config)

        def want(prompt, max_tokens):
            ref = expected_tokens(hf, codec.tokenizer.encode(prompt, add_special_tokens=True).ids, max_tokens)
            return codec.decode([t for t in ref if t != EOS])

        client = server.client()
        honest: dict = {"text": "", "chunks": 0}

        def read_honest():
            try:
                for chunk in client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                                       stream=True):
                    honest["chunks"] += 1
                    honest["text"] += chunk.choices[0].text
            except Exception as err:   # noqa: BLE001 - asserted below
                honest["error"] = repr(err)

        reader = threading.Thread(target=read_honest)
        reader.start()
        deadline = time.monotonic() + 30
        while not honest["chunks"] and "error" not in honest:
            assert time.monotonic() < deadline, honest
            time.sleep(0.01)
        r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1e-45, seed=3)
        assert r.choices[0].text == want(PROMPTS[0], 12)
        for field, value in (("temperature", math.nan), ("top_p", math.nan), ("seed", 2**64), ("seed", 2**64)):
            bad = httpx.post(server.url + "/v1/completions", headers={"Content-Type": "application/json"}, timeout=30,
                             content=json.dumps({"model": "tiny", "prompt": "w10", "max_tokens": 3, field: value}))
            assert bad.status_code == 400 and bad.json()["error"]["param"] == field, (field, bad.text)
        reader.join(60)
        assert "error" not in honest and honest["text"] == want(PROMPTS[1], 200), honest
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.setdefault(p, client.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0))) for p in PROMPTS[2:4]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results[p].choices[0].text for p in PROMPTS[2:4]] == [want(p, 12) for p in PROMPTS[2:4]]
        server.proc.send_signal(signal.SIGTERM)
        rc = server.wait()
    finally:
        server.kill()
    assert rc == 0, server.err
    assert not queues_left(server.run_id()), server.err
