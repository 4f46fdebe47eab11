"""`ringllm serve` as a process: SIGTERM drains (no new requests; one in flight finishes, one past
the deadline is cancelled with its stream closed properly) and the process exits 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.conftest import make_hf_checkpoint, write_tokenizer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_context_model(path):
    """A tiny model with a long context whose EOS can never be sampled (an id past the
    vocabulary), so that a request runs exactly as long as its max_tokens."""
    make_hf_checkpoint(path, max_position_embeddings=4096, eos_token_id=1000)
    write_tokenizer(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["eos_token"]
    cfg_path.write_text(json.dumps(cfg))
    return path


def read_stream(url, body, out: dict):
    """One streamed completion: out gets the finish reason, the chunk count, whether [DONE] came."""
    out.update(chunks=0, finish=None, done=False)
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                choice = json.loads(data)["choices"][0]
                out["chunks"] += 1
                out["finish"] = choice["finish_reason"] or out["finish"]
    except Exception as err:
        out["error"] = repr(err)


def test_sigterm_drains_and_exits_0(tmp_path):
    model = long_context_model(tmp_path / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ringllm", "serve", "--model", str(model), "--port", str(port),
                             "--device", "cpu", "--drain-timeout", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"serve exited: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        short, long_ = {}, {}
        body = {"model": "tiny", "prompt": "w10 w11", "temperature": 0, "stream": True}
        threads = [threading.Thread(target=read_stream, args=(url, {**body, "max_tokens": n}, out))
                   for n, out in ((100, short), (3800, long_))]
        threads[0].start()
        deadline = time.monotonic() + 30
        while not short.get("chunks"):      # streaming; the long one queues behind it
            assert time.monotonic() < deadline, short
            time.sleep(0.01)
        threads[1].start()
        while not long_.get("status"):
            assert time.monotonic() < deadline, long_
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:     # no new request is admitted while draining
            late = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=5)
            assert late.status_code == 503, late.text
        except httpx.TransportError:
            pass    # or the listener is already closed
        for t in threads:
            t.join(30)
        rc = proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0, err
    assert "draining" in err and "cancelled" in err, err
    assert short == {"chunks": 101, "finish": "length", "done": True, "status": 200}, short
    assert long_["finish"] == "cancelled" and long_["done"] and long_["chunks"] < 3800, long_


def test_port_taken_is_one_error_line(tmp_path):
    model = tmp_path / "tiny"
    make_hf_checkpoint(model)
    write_tokenizer(model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ringllm", "serve", "--model", str(model), "--port", str(port),
                            "--device", "cpu"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "RINGLLM_API_KEY": "k"})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"ringllm: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
