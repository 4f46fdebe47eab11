"""`ringllm serve` through the official openai client: completions and chat, streamed and not,
against transformers' greedy tokens; the API key; cancellation; concurrency; the queue limit.
The SIGTERM drain is in test_serve_lifecycle.py (a real process)."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.conftest import hf_greedy_cached  # noqa: E402

MODEL_NAME = "tiny"
EOS = 2


class SlowEngine:
    """The served engine with a pause before every step, so that requests stay in flight while a
    test acts; it records the ids cancelled."""

    def __init__(self, engine, delay_s: float):
        self.engine, self.delay_s, self.cancelled = engine, delay_s, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.engine.cancel(request_id)

    def step(self):
        time.sleep(self.delay_s)
        return self.engine.step()


class LiveServer:
    """The app on uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, model_dir, api_key=None, max_waiting=256, delay_s=0.0, max_batch=4, wrap=None,
                 runner_options=None, **settings):
        """wrap(engine): the engine the runner drives instead of SlowEngine(engine, delay_s)."""
        import uvicorn

        from ringllm.checkpoint.layout import load_layout
        from ringllm.checkpoint.text import TextCodec
        from ringllm.serve.app import ServeSettings, create_app
        from ringllm.serve.runner import EngineRunner
        from ringllm.serve.server import listen, load_engine

        layout = load_layout(model_dir)
        self.codec = TextCodec(model_dir, layout.config)
        context = layout.config.max_position_embeddings
        engine, max_batch = load_engine(layout, "cpu", "float32", max_batch, context)
        self.engine = wrap(engine) if wrap is not None else SlowEngine(engine, delay_s)
        self.runner = EngineRunner(self.engine, max_batch, max_waiting, **(runner_options or {}))
        app = create_app(self.runner, self.codec, ServeSettings(MODEL_NAME, context, api_key, 1 << 16, 5.0,
                                                                    **settings))
        self.sock = listen("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_config=None, lifespan="off"))
        self.runner.start()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, api_key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=30, **kw)

    def wait_idle(self, timeout_s=5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.runner.in_flight == 0 and self.engine.idle() and self.engine.kv_tokens_used == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.runner.stop()
        self.sock.close()


@pytest.fixture(scope="module")
def server(tiny):
    s = LiveServer(tiny[0])
    yield s
    s.close()


def expected(tiny, codec, prompt_ids, max_tokens):
    """transformers' greedy continuation, cut at EOS: (text, finish_reason, completion_tokens)."""
    ref = hf_greedy_cached(tiny[1], prompt_ids, max_tokens)
    if EOS in ref:
        ref = ref[:ref.index(EOS) + 1]
        return codec.decode(ref[:-1]), "stop", len(ref)
    return codec.decode(ref), "length", len(ref)


PROMPTS = ["w10 w11 w12", "w40 w3 w77 w5", "w100 w101", "w7 w8 w9 w20 w21 w22"]


def test_completion_matches_transformers(server, tiny):
    client = server.client()
    for prompt in PROMPTS:
        ids = server.codec.tokenizer.encode(prompt, add_special_tokens=True).ids
        text, finish, n = expected(tiny, server.codec, ids, 12)
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == text, prompt
        assert r.choices[0].finish_reason == finish
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    assert server.wait_idle()


def test_streamed_completion(server, tiny):
    client = server.client()
    prompt = PROMPTS[1]
    ids = server.codec.tokenizer.encode(prompt, add_special_tokens=True).ids
    text, finish, n = expected(tiny, server.codec, ids, 20)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_streamed_and_not(server, tiny):
    client = server.client()
    # the reference prompt: TextCodec's own rendering of one user turn (what `generate` sends)
    ids = server.codec.encode("w9 w10 w11", chat=True)
    text, finish, n = expected(tiny, server.codec, ids, 16)
    messages = [{"role": "user", "content": "w9 w10 w11"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_stop_string_ends_the_request(server, tiny):
    client = server.client()
    prompt = PROMPTS[3]
    ids = server.codec.tokenizer.encode(prompt, add_special_tokens=True).ids
    full, _, _ = expected(tiny, server.codec, ids, 30)
    words = full.split()
    assert len(words) >= 4, "the reference continuation is too short to pick a stop string"
    stop = words[3]
    want = full[:full.index(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=30, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert server.wait_idle()


def test_bad_requests_are_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="w5 " * 250, max_tokens=10)
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert "context of 256 tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="w5", n=2)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="w5", temperature=-1)
    for ids in ([5, 128], [-1, 5]):       # token ids outside the vocabulary of 128
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=2)
        assert err.value.param == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="w5")
    with pytest.raises(openai.APIStatusError) as err:      # over the 64 KiB body limit of this server
        client.completions.create(model=MODEL_NAME, prompt="w5 " * 30000)
    assert err.value.status_code == 413
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_api_key_enforced(tiny):
    import httpx

    s = LiveServer(tiny[0], api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model=MODEL_NAME, prompt="w5", max_tokens=2)
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(s.url + "/health").status_code == 200
        r = s.client(api_key="sekrit").completions.create(model=MODEL_NAME, prompt="w5", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        s.close()


def test_cancelled_stream_frees_its_slot(tiny):
    s = LiveServer(tiny[0], delay_s=0.01)      # 200 tokens take >= 2 s: still running when it is cut
    try:
        client = s.client()
        stream = client.completions.create(model=MODEL_NAME, prompt="w10 w11", max_tokens=200, temperature=0,
                                           stream=True)
        it = iter(stream)
        next(it), next(it)
        assert s.runner.in_flight == 1
        stream.response.close()       # the client goes away mid-stream
        assert s.wait_idle(1.5), (f"a cancelled stream still holds the engine: {s.runner.in_flight} in flight, "
                                  f"{s.engine.kv_tokens_used} KV tokens")
        assert len(s.engine.cancelled) == 1
        # the slot is free: the next request runs at once (the engine takes one at a time)
        r = client.completions.create(model=MODEL_NAME, prompt="w12", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        s.close()


def test_disconnect_cancels_a_request_not_streamed(tiny):
    import httpx

    s = LiveServer(tiny[0], delay_s=0.02)      # 200 tokens take >= 4 s
    try:
        with pytest.raises(httpx.ReadTimeout):      # the client gives up and closes its connection
            httpx.post(s.url + "/v1/completions", json={"prompt": "w10", "max_tokens": 200, "temperature": 0},
                       timeout=0.5)
        assert s.wait_idle(1.5), f"a request whose client left still runs: {s.runner.in_flight} in flight"
        assert len(s.engine.cancelled) == 1
    finally:
        s.close()


def test_queue_full_is_503(tiny):
    s = LiveServer(tiny[0], max_waiting=1, delay_s=0.01, max_batch=2)
    try:
        client = s.client()
        held = [client.completions.create(model=MODEL_NAME, prompt="w10", max_tokens=150, temperature=0, stream=True)
                for _ in range(3)]            # two running (--max-batch 2), one waiting: the queue is full
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=MODEL_NAME, prompt="w10", max_tokens=2)
        assert err.value.status_code == 503 and err.value.code == "queue_full"
        for stream in held:
            stream.response.close()
        assert s.wait_idle(3.0)
    finally:
        s.close()


def test_concurrent_clients(server, tiny, caplog):
    """64 clients at once, streamed and not: every answer is transformers' greedy text; afterwards
    nothing is in flight and no KV is held."""
    import logging

    caplog.set_level(logging.INFO, logger="ringllm.serve.access")
    refs = {}
    for prompt in PROMPTS:
        ids = server.codec.tokenizer.encode(prompt, add_special_tokens=True).ids
        refs[prompt] = expected(tiny, server.codec, ids, 6)[0]
    results, errors = [None] * 64, []

    def one(i):
        try:
            client, prompt = server.client(), PROMPTS[i % len(PROMPTS)]
            if i % 2:
                chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                                   stream=True)
                results[i] = "".join(c.choices[0].text for c in chunks)
            else:
                results[i] = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6,
                                                       temperature=0).choices[0].text
        except Exception as err:     # collected: a thread's exception would not fail the test
            errors.append(repr(err))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - t0 < 60
    assert not errors, errors[:3]
    assert results == [refs[PROMPTS[i % len(PROMPTS)]] for i in range(64)]
    assert server.wait_idle()
    def logged():   # a streamed response's line is written just after its last byte went out
        return sum('"POST /v1/completions" 200' in r.getMessage() for r in caplog.records
                   if r.name == "ringllm.serve.access")

    deadline = time.monotonic() + 5
    while logged() < 64 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert logged() == 64


def test_metrics_and_health(server):
    import httpx

    server.client().completions.create(model=MODEL_NAME, prompt="w10", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["ringllm_requests_running"] == 0 and values["ringllm_requests_waiting"] == 0
    assert values["ringllm_generated_tokens_total"] >= 3 and values["ringllm_passes_total"] >= 3
    assert values["ringllm_tokens_per_second"] > 0 and values["ringllm_seconds_per_pass"] > 0
    assert "ringllm_kv_tokens_used" in values
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_curl(server, tiny):
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("no curl")
    body = json.dumps({"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", server.url + "/v1/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=30).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    ids = server.codec.tokenizer.encode(PROMPTS[0], add_special_tokens=True).ids
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected(tiny, server.codec, ids, 5)[0]


def test_a_pass_longer_than_a_step_is_counted_once_with_all_its_seconds():
    """The streaming engine's step() returns after a bounded wait even when the GPU process's pass
    has not ended (supervisor.serving.STEP_WAIT_S): /metrics must count passes by the engine's own
    counter and give a pass every second it took, not one 'pass' per step() call."""
    from ringllm.serve.runner import EngineRunner

    class SlowPassEngine:
        """Each weight pass takes three step() calls of 0.05 s; two passes, then idle."""
        running = waiting = kv_tokens_used = 0

        def __init__(self):
            self.calls, self.passes = 0, 0

        def idle(self):
            return self.passes >= 2

        def step(self):
            time.sleep(0.05)
            self.calls += 1
            if self.calls % 3 == 0:
                self.passes += 1
            return []

    engine = SlowPassEngine()
    runner = EngineRunner(engine, 1, 1)
    runner.start()
    deadline = time.monotonic() + 10
    while not engine.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    stats = runner.stats()
    runner.stop()
    assert engine.calls == 6 and stats.passes_total == 2
    assert stats.pass_seconds_total >= 6 * 0.05 * 0.95
    assert stats.seconds_per_pass >= 3 * 0.05 * 0.95
