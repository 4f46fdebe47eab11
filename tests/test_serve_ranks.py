"""`ringllm serve --tensor-parallel 2` on cpu, a real server process each test. Every pass is a
chain of collectives, so both ranks must batch the same requests: rank 0 takes them and hands
each round's arrivals, cancels and the stop to rank 1 (workers/gpu_process.serve_requests).
Concurrent greedy requests give transformers' tokens and SIGTERM drains; rank 1 killed mid-stream
means 503s, a non-zero exit and nothing left; a client that leaves mid-stream (its cancel reaches
both ranks) leaves the other request's tokens as transformers' and the server serving; an
unseeded sampled request draws only tokens transformers' nucleus allows (the ranks agree on its
seed); a stop string stops where transformers' greedy text (a one-process server's) has it.
--resident with ranks is refused in one line. The autouse leak check in conftest.py runs after
each test."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

from tests.test_serve_lifecycle import free_port  # noqa: E402
from tests.test_serve_streaming import EOS, PROMPTS, ServerProcess, expected_tokens, \
    killed_mid_stream_means_503_nonzero_exit_nothing_left, queues_left  # noqa: E402

TWO_RANKS = ("--tensor-parallel", "2")


@pytest.fixture(scope="module")
def codec(tiny):
    from ringllm.checkpoint.layout import load_layout
    from ringllm.checkpoint.text import TextCodec

    return TextCodec(tiny[0], load_layout(tiny[0]).config)


def greedy_text(hf, codec, prompt: str, max_tokens: int) -> str:
    """transformers' greedy completion of `prompt` as the server answers it (EOS not in the text)."""
    ref = expected_tokens(hf, codec.tokenizer.encode(prompt, add_special_tokens=True).ids, max_tokens)
    return codec.decode([t for t in ref if t != EOS])


def stop_and_check_exit_0(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    rc = server.wait()
    assert rc == 0, server.err
    assert not queues_left(server.run_id(), gpus=2), server.err


def wait_until_idle(server: ServerProcess, why: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while server.metric("ringllm_requests_running") or server.metric("ringllm_kv_tokens_used") \
            or server.metric("ringllm_requests_in_flight"):
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_two_ranks_serve_concurrent_requests_as_transformers_and_drain(tiny, codec):
    """Rank 0 takes the requests and hands them to rank 1 each round, both run the same passes;
    concurrent completions give transformers' greedy tokens, a seeded sampled request its
    one-process tokens, and SIGTERM drains, exits 0 and removes both ranks' queues."""
    model_dir, hf = tiny
    one = ServerProcess(model_dir, "--max-batch", "4")
    try:
        sampled_alone = one.client().completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10,
                                                        temperature=0.9, seed=7).choices[0].text
        one.proc.send_signal(signal.SIGTERM)
        assert one.wait() == 0, one.err
    finally:
        one.kill()
    server = ServerProcess(model_dir, "--max-batch", "4", *TWO_RANKS)
    try:
        ranks = [p.name() for p in psutil.Process(server.proc.pid).children()]
        assert {"ringllm-gpu", "ringllm-gpu1"} <= set(ranks), ranks
        client = server.client()
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.setdefault(p, client.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0))) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for prompt in PROMPTS:
            assert results[prompt].choices[0].text == greedy_text(hf, codec, prompt, 12), prompt
        sampled = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0.9, seed=7)
        assert sampled.choices[0].text == sampled_alone
        stop_and_check_exit_0(server)
    finally:
        server.kill()


def test_rank_1_killed_mid_stream_means_503_nonzero_exit_nothing_left(tiny):
    """rank 1's GPU process (ringllm-gpu1) SIGKILLed while a request streams: as for the one GPU
    process of test_serve_streaming, and the -gpu1 queue is gone too."""
    server = ServerProcess(tiny[0], "--max-batch", "2", *TWO_RANKS)
    try:
        killed_mid_stream_means_503_nonzero_exit_nothing_left(server, "gpu1", gpus=2)
    finally:
        server.kill()


def test_client_leaving_mid_stream_leaves_the_other_request_as_transformers(tiny, codec):
    """A streamed request whose client goes away while another request runs beside it: its cancel
    reaches both ranks (else their batches differ and the gathers fail), its row is freed, the
    other request still gets transformers' tokens, and the server serves the next one."""
    model_dir, hf = tiny
    server = ServerProcess(model_dir, "--max-batch", "4", *TWO_RANKS)
    try:
        client = server.client()
        generated_before = server.metric("ringllm_generated_tokens_total")
        leaving = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                            stream=True)
        chunks = iter(leaving)
        next(chunks)
        other: dict = {}

        def ask_other():
            try:
                other["r"] = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=60, temperature=0)
            except Exception as err:   # noqa: BLE001 - reported by the assertion below
                other["error"] = repr(err)

        beside = threading.Thread(target=ask_other)
        beside.start()
        deadline = time.monotonic() + 20
        while server.metric("ringllm_requests_running") < 2:
            assert time.monotonic() < deadline, "the second request never ran beside the first"
            time.sleep(0.01)
        next(chunks), next(chunks)
        leaving.close()      # the client goes away mid-stream
        assert beside.is_alive(), "the other request ended before the cancel: it tests nothing"
        beside.join(60)
        assert "error" not in other, other
        r = other["r"]
        assert (r.choices[0].text, r.choices[0].finish_reason) == (greedy_text(hf, codec, PROMPTS[2], 60), "length")
        wait_until_idle(server, "the cancelled request kept its row")
        generated = server.metric("ringllm_generated_tokens_total") - generated_before
        assert generated < 200 + 60, f"{generated} tokens: the cancel did not stop the request"
        # and the server serves on
        r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0)
        assert r.choices[0].text == greedy_text(hf, codec, PROMPTS[3], 12)
        stop_and_check_exit_0(server)
    finally:
        server.kill()


TOP_P = 0.05      # at temperature 1 about 5 of the tiny model's 128 tokens: a wrong context shows


def outside_nucleus(hf, codec, prompt: str, text: str, finish: str) -> list[tuple[int, int]]:
    """(step, token) of each sampled token that transformers' top-p nucleus at its place (the
    prompt and the tokens before it, temperature 1) does not hold. Ranks that drew different
    tokens would have fed each other activations of other sequences: their tokens leave it."""
    import torch

    vocab = codec.tokenizer.get_vocab()
    tokens = [vocab[w] for w in text.split()] + ([EOS] if finish == "stop" else [])
    seq = codec.tokenizer.encode(prompt, add_special_tokens=True).ids
    with torch.no_grad():
        probs = hf(torch.tensor([seq + tokens])).logits[0, len(seq) - 1:-1].softmax(-1)
    outside = []
    for step, (p, token) in enumerate(zip(probs, tokens)):
        mass_above = float(p[p > p[token]].sum())
        if mass_above > TOP_P + 1e-4:       # the sampler keeps a token while the mass above it <= top_p
            outside.append((step, token))
    return outside


def test_unseeded_sampling_answered_and_stop_string_as_one_process(tiny, codec):
    """Requests without a seed (temperature 1): rank 0 gives each a seed for every rank, so the
    ranks draw the same tokens; each token is one transformers' nucleus allows. Beside them a stop
    string stops the text where transformers' greedy text (what one process serves) has it, and
    its cancel leaves both ranks idle."""
    model_dir, hf = tiny
    server = ServerProcess(model_dir, "--max-batch", "4", *TWO_RANKS)
    try:
        client = server.client()
        stop_prompt = PROMPTS[3]
        full = greedy_text(hf, codec, stop_prompt, 30)
        stop = full.split()[3]
        want = full[:full.index(stop)]
        results, errors = {}, []

        def ask(key, **kw):
            try:
                results[key] = client.completions.create(model="tiny", **kw)
            except Exception as err:   # noqa: BLE001 - reported by the assertion below
                errors.append(repr(err))

        asks = [dict(prompt=p, max_tokens=16, temperature=1.0, top_p=TOP_P) for p in PROMPTS[:3]]
        threads = [threading.Thread(target=ask, args=(i,), kwargs=kw) for i, kw in enumerate(asks)]
        threads.append(threading.Thread(target=ask, args=("stop",), kwargs=dict(
            prompt=stop_prompt, max_tokens=30, temperature=0, stop=[stop])))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for i, kw in enumerate(asks):
            choice = results[i].choices[0]
            assert results[i].usage.completion_tokens == len(choice.text.split()) + (choice.finish_reason == "stop")
            assert not outside_nucleus(hf, codec, kw["prompt"], choice.text, choice.finish_reason), \
                (kw["prompt"], choice.text)
        assert (results["stop"].choices[0].text, results["stop"].choices[0].finish_reason) == (want, "stop")
        streamed = list(client.completions.create(model="tiny", prompt=stop_prompt, max_tokens=30, temperature=0,
                                                  stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == want
        assert streamed[-1].choices[0].finish_reason == "stop"
        wait_until_idle(server, "a request stopped by its stop string kept its row")
        r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0)
        assert r.choices[0].text == greedy_text(hf, codec, PROMPTS[2], 12)
        stop_and_check_exit_0(server)
    finally:
        server.kill()


def test_resident_with_ranks_refused_in_one_line(tiny):
    """serve refuses --resident --tensor-parallel 2 as generate does, before anything starts
    (it used to serve on one process, the ranks silently dropped)."""
    model_dir, _ = tiny
    proc = subprocess.Popen([sys.executable, "-m", "ringllm", "serve", "--model", str(model_dir), "--port",
                             str(free_port()), "--device", "cpu", "--resident", *TWO_RANKS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.terminate()       # it serves instead of refusing: stop it, then fail
        err = proc.communicate(timeout=30)[1]
        pytest.fail(f"serve --resident --tensor-parallel 2 kept running instead of refusing:\n{err}")
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == ["ringllm: error: --tensor-parallel 2 runs the streaming engine (one process "
                                        "a rank); --resident is one process"], err


def test_ranks_that_sample_apart_stop_the_server_at_that_pass(tiny):
    """Every pass, the ranks compare what they sampled (a server has no end at which to compare):
    rank 1 sampling with another seed (FaultPlan.rank_seed_skew) stops the engine with the
    divergence named, instead of serving tokens from activations that no longer belong together."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.config import build_config
    from ringllm.faults import FaultPlan
    from ringllm.supervisor.parallel import TensorParallelPlan
    from ringllm.supervisor.serving import EngineDown, ServedEngine
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.engine import Request
    from ringllm.workers.sampling import SamplingParams
    from tests.test_streaming import assert_run_cleaned

    layout = load_layout(tiny[0])
    engine = build_config(loaders=2, gpu_ahead_layers=1)

    def serve(faults):
        sup = Supervisor(layout, engine, "cpu", "float32", parallel=TensorParallelPlan(2), faults=faults)
        served = ServedEngine.start(sup, 2, 64)
        tokens = []
        try:
            served.submit(Request("a", (5, 9, 17), 12, SamplingParams(temperature=1.0, seed=7)))
            deadline = time.monotonic() + 120
            while len(tokens) < 12 and time.monotonic() < deadline:
                tokens += [e.token for e in served.step() if e.token is not None]
            return tokens
        finally:
            served.close()
            assert_run_cleaned(sup)

    assert len(serve(FaultPlan())) == 12          # agreeing ranks serve the request
    with pytest.raises(EngineDown, match=r"gpu: tensor parallel: rank\(s\) \[1\] sampled other tokens than rank 0"):
        serve(FaultPlan(rank_seed_skew=True))
