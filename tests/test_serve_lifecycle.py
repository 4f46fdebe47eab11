"""`ringllm serve` as a process: SIGTERM drains (still listening: new requests get 503 and /health
says draining; one in flight finishes, one past the deadline ends with an error event and [DONE]);
a second signal ends the drain at once, as cleanly; the process exits 0."""
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
    """One streamed completion: out gets the finish reason, the chunk count, whether [DONE] came,
    and the code of an error event."""
    out.update(chunks=0, finish=None, done=False, error_code=None)
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
                if "error" in json.loads(data):
                    out["error_code"] = json.loads(data)["error"]["code"]
                    continue
                choice = json.loads(data)["choices"][0]
                out["chunks"] += 1
                out["finish"] = choice["finish_reason"] or out["finish"]
    except Exception as err:
        out["error"] = repr(err)


def start_server(model, drain_s: float):
    """(process, url) of `ringllm serve` (its default engine, on cpu), once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ringllm", "serve", "--model", str(model), "--port", str(port),
                             "--device", "cpu", "--drain-timeout", str(drain_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"serve exited: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "serve did not come up"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def wait_draining(url):
    """Until /health says draining: the server listens through its drain."""
    deadline = time.monotonic() + 10
    while (health := httpx.get(url + "/health", timeout=5)).status_code == 200:
        assert time.monotonic() < deadline, "no drain"
        time.sleep(0.02)
    assert health.status_code == 503 and health.json() == {"status": "draining"}, health.text


def test_sigterm_drains_and_exits_0(tmp_path):
    model = long_context_model(tmp_path / "tiny")
    proc, url = start_server(model, 4)
    try:
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
        wait_draining(url)
        # no new request is admitted while draining
        late = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=5)
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down", late.text
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
    assert short == {"chunks": 101, "finish": "length", "done": True, "status": 200, "error_code": None}, short
    # cancelled by the drain: an error event (OpenAI has no finish_reason for it), then [DONE]
    assert long_["error_code"] == "server_shutting_down" and long_["finish"] is None, long_
    assert long_["done"] and long_["chunks"] < 3800, long_


def test_a_second_signal_ends_the_drain_with_every_stream_closed(tmp_path):
    model = long_context_model(tmp_path / "tiny")
    proc, url = start_server(model, 600)
    try:
        out = {}
        body = {"model": "tiny", "prompt": "w10 w11", "temperature": 0, "stream": True, "max_tokens": 3800}
        reader = threading.Thread(target=read_stream, args=(url, body, out))
        reader.start()
        deadline = time.monotonic() + 30
        while not out.get("chunks"):
            assert time.monotonic() < deadline, out
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        wait_draining(url)
        proc.send_signal(signal.SIGINT)       # Ctrl-C again: do not wait the 600 s
        reader.join(30)
        rc = proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0, err
    assert "CancelledError" not in err and "Traceback" not in err, err
    assert out["error_code"] == "server_shutting_down" and out["done"] and out["chunks"] < 3800, out


def test_drain_timeout_must_be_a_finite_number(tmp_path, capsys):
    from ringllm.cli import main

    model = tmp_path / "tiny"
    make_hf_checkpoint(model)
    write_tokenizer(model)
    for value in ("nan", "inf", "-1"):
        code = main(["serve", "--model", str(model), "--device", "cpu", "--drain-timeout", value])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ringllm: error:")]
        assert code != 0 and len(lines) == 1 and "--drain-timeout" in lines[0], (value, code, lines)


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
