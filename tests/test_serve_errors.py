"""`ringllm serve --resident`: request fields checked at admission (one 400 naming the field), a
failure inside one request failing that request alone, errors mapped to their OpenAI status, and
/health telling an engine that makes no progress. HTTP in, tokens out: every served text is
compared with transformers' greedy decode. The streaming engine's side is in
test_serve_streaming.py, the drain's in test_serve_lifecycle.py."""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.test_serve import MODEL_NAME, PROMPTS, LiveServer, SlowEngine, expected  # noqa: E402

MAX_BATCH = 2


@pytest.fixture(scope="module")
def server(tiny):
    s = LiveServer(tiny[0], delay_s=0.005, max_batch=MAX_BATCH)
    yield s
    s.close()


def post(server, body: dict) -> httpx.Response:
    # json.dumps writes NaN and Infinity, as Python's json (and so the server's) reads them
    return httpx.post(server.url + "/v1/completions", content=json.dumps({"model": MODEL_NAME, **body}),
                      headers={"Content-Type": "application/json"}, timeout=30)


def greedy_text(server, tiny, prompt: str, max_tokens: int) -> str:
    ids = server.codec.tokenizer.encode(prompt, add_special_tokens=True).ids
    return expected(tiny, server.codec, ids, max_tokens)[0]


class Stream(threading.Thread):
    """A streamed greedy completion read in the background: .text, .finish, .error when done."""

    def __init__(self, server, prompt: str, max_tokens: int, **extra):
        super().__init__()
        self.server, self.prompt, self.max_tokens, self.extra = server, prompt, max_tokens, extra
        self.text, self.finish, self.error, self.chunks = "", None, None, 0
        self.start()

    def run(self):
        try:
            for chunk in self.server.client().completions.create(
                    model=MODEL_NAME, prompt=self.prompt, max_tokens=self.max_tokens, stream=True,
                    **{"temperature": 0, **self.extra}):
                self.chunks += 1
                self.text += chunk.choices[0].text
                self.finish = chunk.choices[0].finish_reason or self.finish
        except Exception as err:     # noqa: BLE001 - the test asserts on it
            self.error = repr(err)

    def wait_started(self):
        deadline = time.monotonic() + 30
        while not self.chunks and self.error is None:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.005)


def test_bad_numbers_are_400_naming_the_field_while_another_stream_goes_on(server, tiny):
    honest = Stream(server, PROMPTS[1], 200)
    honest.wait_started()
    bad = [("temperature", math.nan), ("top_p", math.nan), ("temperature", math.inf), ("top_p", -math.inf),
           ("temperature", 2.01), ("top_p", 1.0001), ("seed", 2**64), ("seed", -2**63 - 1), ("seed", 1.5)]
    for field, value in bad:
        r = post(server, {"prompt": "w10", "max_tokens": 4, field: value})
        assert r.status_code == 400, (field, value, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"], (field, value, error)
    honest.join(60)
    assert honest.error is None, honest.error
    assert honest.text == greedy_text(server, tiny, PROMPTS[1], 200)
    assert server.wait_idle()


def test_boundary_values_and_greedy_equivalents_are_served(server, tiny):
    want = greedy_text(server, tiny, PROMPTS[0], 12)
    for body in ({"top_p": 1}, {"temperature": 2, "seed": 1}, {"temperature": 0}, {"temperature": 2, "top_p": 1}):
        r = post(server, {"prompt": PROMPTS[0], "max_tokens": 12, **body})
        assert r.status_code == 200, (body, r.text)
    # greedy in all but name: top_p 0 keeps the top token only (OpenAI accepts it); a temperature
    # too small to divide the logits by (1e-45 makes them inf) samples the top token too
    for body in ({"top_p": 0, "temperature": 1, "seed": 3}, {"temperature": 1e-45, "seed": 3},
                 {"temperature": 5e-324}):
        r = post(server, {"prompt": PROMPTS[0], "max_tokens": 12, **body})
        assert r.status_code == 200, (body, r.text)
        assert r.json()["choices"][0]["text"] == want, body
    assert server.wait_idle()


def test_seeds_outside_64_bits_are_refused_and_every_row_still_serves(server, tiny):
    client = server.client()
    for _ in range(2 * MAX_BATCH):      # each would have taken a row for good
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL_NAME, prompt="w10", max_tokens=3, temperature=1, seed=2**64)
        assert err.value.param == "seed" and "seed" in err.value.message
    # the edges of the range are served; then max-batch greedy requests at once, as transformers
    for seed in (2**64 - 1, -2**63):
        r = client.completions.create(model=MODEL_NAME, prompt="w10", max_tokens=3, temperature=1, seed=seed)
        assert r.usage.completion_tokens >= 1
    streams = [Stream(server, p, 16) for p in PROMPTS[:MAX_BATCH]]
    for s in streams:
        s.join(60)
        assert s.error is None, s.error
        assert s.text == greedy_text(server, tiny, s.prompt, 16)
    assert server.wait_idle()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_a_failure_inside_one_request_fails_it_alone(server, tiny, monkeypatch):
    """A sampler that raises for one request (seed 666), as a bug or a bad value the admission
    missed would: that request ends with 500 (its stream with an error event and [DONE]), the
    others stream transformers' text and the server serves on."""
    from ringllm.workers.generation import Sampler

    draw = Sampler.__call__

    def failing(self, logits):
        if self.params.seed == 666:
            raise RuntimeError("injected failure of one request's sampler")
        return draw(self, logits)

    monkeypatch.setattr(Sampler, "__call__", failing)
    honest = Stream(server, PROMPTS[3], 240)
    honest.wait_started()
    r = post(server, {"prompt": "w10 w11", "max_tokens": 8, "temperature": 1, "seed": 666})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error", r.text
    # the failure came while the honest stream ran (240 passes of >= 5 ms each; this one failed
    # in its first): else this test would prove nothing
    assert honest.finish is None, "the honest stream finished before the failure: make it longer"
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": MODEL_NAME, "prompt": "w10", "max_tokens": 8, "temperature": 1, "seed": 666,
                            "stream": True}) as s:
        events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error", events
    honest.join(60)
    assert honest.error is None, honest.error
    assert honest.text == greedy_text(server, tiny, PROMPTS[3], 240)
    assert post(server, {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0}).json()["choices"][0]["text"] == \
        greedy_text(server, tiny, PROMPTS[2], 6)
    assert server.wait_idle()


class NoPassEngine(SlowEngine):
    """An engine that takes requests but runs no pass (a hung GPU process, say) until released."""

    stuck = True

    def step(self):
        if self.stuck:
            time.sleep(0.01)
            return []
        return self.engine.step()


def test_health_tells_an_engine_that_makes_no_progress(tiny):
    s = LiveServer(tiny[0], wrap=lambda engine: NoPassEngine(engine, 0.0),
                   runner_options={"stall_floor_s": 0.3})
    try:
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}      # idle is not stalled
        stuck = Stream(s, "w10", 4)
        deadline = time.monotonic() + 20
        while (health := httpx.get(s.url + "/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health said ok while a request waited on an engine without passes"
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "stalled", health.text
        assert "no pass" in health.json()["reason"], health.text
        s.engine.stuck = False          # passes again: the request completes, and the engine is healthy
        stuck.join(30)
        assert stuck.error is None and stuck.finish in ("stop", "length"), stuck.error
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
    finally:
        s.close()


class DyingEngine(SlowEngine):
    """The first pass with work fails as the streaming engine does when a child dies, naming a
    file by its full path."""

    def step(self):
        from ringllm.supervisor.serving import EngineDown

        raise EngineDown("the streaming engine stopped: loader 0: /secret/dir/model.safetensors: read failed")


def test_after_the_engine_died_requests_get_503_engine_unavailable_without_paths(tiny):
    s = LiveServer(tiny[0], wrap=lambda engine: DyingEngine(engine, 0.0))
    try:
        for _ in range(2):          # the one in flight as it died, then a new one
            r = post(s, {"prompt": "w10", "max_tokens": 4})
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "engine_unavailable", error
            assert "model.safetensors: read failed" in error["message"] and "/secret" not in error["message"], error
    finally:
        s.close()


class RefusingEngine(SlowEngine):
    """The engine dies as a request arrives (its submit finds it down), or its GPU queue stays full."""

    def __init__(self, engine, error):
        super().__init__(engine, 0.0)
        self.error = error

    def submit(self, req):
        raise self.error


@pytest.mark.parametrize("kind", ["engine_down", "queue_busy"])
def test_a_request_the_engine_cannot_take_is_503(tiny, kind):
    import posix_ipc

    from ringllm.supervisor.serving import EngineDown, ServedEngine

    if kind == "engine_down":
        wrap = lambda engine: RefusingEngine(engine, EngineDown("the streaming engine stopped: gpu"))  # noqa: E731
        code = "engine_unavailable"
    else:       # the streaming engine's client over a GPU queue that stays full
        class BusyQueue:
            def send(self, msg, timeout):
                raise posix_ipc.BusyError("The queue is full")

        class Sup:
            names = type("Names", (), {"gpu_queue": "q"})
            channels, procs = {"q": BusyQueue()}, {}

        wrap = lambda engine: ServedEngine(Sup(), MAX_BATCH, 256)  # noqa: E731
        code = "engine_busy"
    s = LiveServer(tiny[0], wrap=wrap)
    try:
        r = post(s, {"prompt": "w10", "max_tokens": 4})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == code, r.text
        assert s.runner.in_flight == 0
    finally:
        s.close()


class FlakyCancelEngine(SlowEngine):
    """The first cancel cannot be sent (the GPU queue is full); later ones go through."""

    def cancel(self, request_id):
        import posix_ipc

        if not self.cancelled:
            self.cancelled.append(None)
            raise posix_ipc.BusyError("The queue is full")
        super().cancel(request_id)


def test_a_cancel_that_could_not_be_sent_is_sent_by_the_drain(tiny):
    from ringllm.serve.runner import EngineRunner
    from ringllm.serve.server import load_engine
    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.engine import Request
    from ringllm.workers.sampling import SamplingParams

    engine, _ = load_engine(load_layout(tiny[0]), "cpu", "float32", 1, 256)
    engine = FlakyCancelEngine(engine, 0.01)      # 250 tokens take >= 2.5 s: running when cancelled
    runner = EngineRunner(engine, 1, 1)
    runner.start()

    async def scenario():
        queue = runner.submit(Request("r", (5, 6), 250, SamplingParams()))
        await queue.get()
        runner.cancel("r")      # not sent: must not count as sent
        cancelled = await asyncio.to_thread(runner.drain, 0.0)
        events = [await queue.get()]
        while events[-1].finish is None:
            events.append(await queue.get())
        return cancelled, events

    try:
        cancelled, events = asyncio.run(scenario())
    finally:
        runner.stop()
    assert cancelled == 1 and engine.cancelled == [None, "r"]
    assert events[-1].finish == "cancelled" and events[-1].completion_tokens < 250
