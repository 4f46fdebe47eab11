"""The server's front door over real HTTP: what a web page may not do (Content-Type, Host, Origin),
the body limit and read timeout, tokenizing off the event loop, and the API-key settings refused
or warned about at start."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.test_serve import MODEL_NAME, LiveServer  # noqa: E402

BODY = {"model": MODEL_NAME, "prompt": "w10 w11", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny):
    s = LiveServer(tiny[0])
    yield s
    s.close()


def post(server, headers, body=BODY, path="/v1/completions"):
    return httpx.post(server.url + path, content=json.dumps(body), headers=headers, timeout=30)


def error_of(r) -> dict:
    return r.json()["error"]


def test_cross_site_requests_are_refused(server):
    # what a web page can send to 127.0.0.1 without a CORS preflight, and what DNS rebinding adds
    r = post(server, {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "attacker.example"})
    assert r.status_code != 200
    r = post(server, {"Content-Type": "text/plain"})
    assert r.status_code == 415 and "Content-Type" in error_of(r)["message"] and "text/plain" in error_of(r)["message"]
    r = post(server, {})        # no Content-Type at all (httpx adds none for raw content)
    assert r.status_code == 415 and "Content-Type" in error_of(r)["message"]
    r = post(server, {"Content-Type": "application/json", "Host": "attacker.example"})
    assert r.status_code == 421 and "attacker.example" in error_of(r)["message"]
    assert "--allowed-hosts" in error_of(r)["message"]
    r = post(server, {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert r.status_code == 403 and "http://evil.example" in error_of(r)["message"]
    assert "--allowed-origins" in error_of(r)["message"]
    r = post(server, {"Content-Type": "application/json"}, {**BODY, "stop": ["x" * 1001]})   # stop is capped
    assert r.status_code == 400 and error_of(r)["param"] == "stop" and "1000" in error_of(r)["message"]
    r = httpx.get(server.url + "/v1/models", headers={"Host": "attacker.example"})     # reading too
    assert r.status_code == 421
    # what local clients send is served: loopback names, with or without the port, a charset
    port = server.url.rsplit(":", 1)[1]
    for host in ("127.0.0.1:" + port, "localhost:" + port, "localhost", "[::1]:" + port):
        r = post(server, {"Content-Type": "application/json; charset=utf-8", "Host": host})
        assert r.status_code == 200, (host, r.text)


def test_allowed_hosts_and_origins(tiny):
    s = LiveServer(tiny[0], api_key="k", allowed_hosts=("api.example",), allowed_origins=("https://app.example",))
    try:
        ok = {"Content-Type": "application/json", "Host": "api.example:8000", "Origin": "https://app.example",
              "Authorization": "Bearer k"}
        r = post(s, ok)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        preflight = httpx.options(s.url + "/v1/completions", headers={
            "Host": "api.example", "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
        assert post(s, {**ok, "Authorization": "Bearer wrong"}).status_code == 401
        assert post(s, {**ok, "Host": "localhost"}).status_code == 200     # loopback names stay allowed
        assert post(s, {**ok, "Host": "other.example"}).status_code == 421
        assert post(s, {**ok, "Origin": "https://other.example"}).status_code == 403
    finally:
        s.close()
    s = LiveServer(tiny[0], allowed_hosts=None)      # a non-loopback bind without --allowed-hosts: any name
    try:
        assert post(s, {"Content-Type": "application/json", "Host": "my-gpu-box:8000"}).status_code == 200
    finally:
        s.close()


def test_chunked_body_over_the_limit_is_413(server):
    """A body without Content-Length (chunked) is counted as it arrives: the 64 KiB limit of this
    server holds for it too."""
    raw = json.dumps({**BODY, "prompt": "w5 " * 30000}).encode()     # 90 KB of valid JSON

    def chunks():
        for i in range(0, len(raw), 4096):
            yield raw[i:i + 4096]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_a_body_that_stops_arriving_is_408(tiny):
    s = LiveServer(tiny[0], body_timeout_s=0.5)
    try:
        port = int(s.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\":")
            answer = b""       # the server answers after 0.5 s, not at the socket's 30 s
            while b"body_timeout" not in answer:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer
    finally:
        s.close()


def test_tokenizing_does_not_block_other_requests(tiny):
    """While one request's prompt is being tokenized, /health is answered: the tokenizer here waits
    until it is, so with tokenizing on the event loop /health times out."""
    s = LiveServer(tiny[0])
    started, health_answered = threading.Event(), threading.Event()
    encode = s.codec.encode

    def slow_encode(*args, **kwargs):
        started.set()
        health_answered.wait(10)
        return encode(*args, **kwargs)

    s.codec.encode = slow_encode
    try:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", post(s, {"Content-Type": "application/json"})))
        t.start()
        assert started.wait(10)
        try:
            health = httpx.get(s.url + "/health", timeout=5)
        finally:
            health_answered.set()
            t.join(30)
        assert health.status_code == 200
        assert result["r"].status_code == 200
    finally:
        s.close()


def test_empty_api_key_is_refused_at_start(tiny, capsys, monkeypatch):
    from ringllm.cli import main

    with socket.socket() as taken:      # were the key accepted, the start would end here, not serve
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        rc = main(["serve", "--model", str(tiny[0]), "--device", "cpu", "--port", port, "--api-key", ""])
        assert rc == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ringllm: error: --api-key is empty")
        monkeypatch.setenv("RINGLLM_API_KEY", "")
        rc = main(["serve", "--model", str(tiny[0]), "--device", "cpu", "--port", port])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ringllm: error: RINGLLM_API_KEY is empty")


def test_open_bind_without_a_key_warns(tmp_path, caplog, monkeypatch):
    """One warning line, before anything else (here the model directory is missing)."""
    import logging

    from ringllm.cli import main

    monkeypatch.delenv("RINGLLM_API_KEY", raising=False)
    caplog.set_level(logging.INFO, logger="ringllm")
    rc = main(["serve", "--model", str(tmp_path / "none"), "--host", "0.0.0.0", "--device", "cpu"])
    warnings = [r.getMessage() for r in caplog.records if "without an API key" in r.getMessage()]
    assert rc == 1 and len(warnings) == 1 and "0.0.0.0" in warnings[0], warnings
    caplog.clear()
    rc = main(["serve", "--model", str(tmp_path / "none"), "--host", "127.0.0.1", "--device", "cpu"])
    assert rc == 1 and not [r for r in caplog.records if "without an API key" in r.getMessage()]


def test_connections_beyond_the_limit_get_503(tiny):
    """`ringllm serve --max-connections 3`: with two connections open (one of them a slow
    client's, in the middle of its headers), a request on a third is refused with 503; once the
    slow one closes, requests are served again."""
    import subprocess
    import sys

    from tests.test_serve_lifecycle import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ringllm", "serve", "--model", str(tiny[0]), "--port", str(port),
                             "--device", "cpu", "--resident", "--max-connections", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get_health(conn) -> bytes:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return conn.recv(65536)

    try:
        with httpx.Client(timeout=30) as client:     # one connection, kept open
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "serve did not come up"
                try:
                    if client.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
                assert get_health(slow).startswith(b"HTTP/1.1 200")    # the server holds it now
                slow.sendall(b"GET /health HTTP/1.1\r\n")             # and it waits for the rest
                with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
                    assert get_health(third).startswith(b"HTTP/1.1 503")
            deadline = time.monotonic() + 30    # the server notices the closed connections as it reads them
            while client.get(url + "/health").status_code != 200:
                assert time.monotonic() < deadline, "closed connections still count"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(60)
