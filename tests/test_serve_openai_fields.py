"""OpenAI request fields beyond the basics, through the official openai client: logprobs and
top_logprobs (completions and chat), echo with max_tokens 0 (the prompt's log-probabilities),
presence/frequency penalties and logit_bias, against transformers' log-softmax on the same
weights; the fields ringllm does not implement are refused with 400 naming them.

Tolerance: the engine and transformers both compute in float32 on the CPU, but with other kernels
and summation orders (the engine's attention is its own); log-probabilities agree to ~1e-5 here,
LOGPROB_TOL leaves a margin of 10x for other CPUs' BLAS."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.test_serve import MODEL_NAME, LiveServer  # noqa: E402

LOGPROB_TOL = 2e-4


@pytest.fixture(scope="module")
def server(tiny):
    torch.set_num_threads(1)       # the same sums on any machine
    s = LiveServer(tiny[0])
    yield s
    s.close()


def hf_log_softmax(hf, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log-probabilities [len(ids), V]: row i is the distribution of token i+1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def reference_greedy(hf, prompt: list[int], steps: int, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """Greedy decoding with OpenAI's formulas applied to transformers' logits: logit_bias added to
    the token's logit, then for each token generated so far (count c > 0):
    logit -= presence + frequency * c."""
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float().clone()
        for tok, b in (bias or {}).items():
            logits[tok] += b
        for tok in set(out):
            logits[tok] -= presence + frequency * out.count(tok)
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def token_text(server, tok: int) -> str:
    return server.codec.tokenizer.decode([tok], skip_special_tokens=False)


def prompt_ids(server, prompt: str) -> list[int]:
    return server.codec.tokenizer.encode(prompt, add_special_tokens=True).ids


def test_completion_logprobs_and_top_logprobs_match_transformers(server, tiny):
    prompt = "w40 w3 w77 w5"
    ids = prompt_ids(server, prompt)
    r = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                           logprobs=5)
    want = reference_greedy(tiny[1], ids, 6)
    lp = r.choices[0].logprobs
    assert lp is not None, "logprobs were asked for"
    assert lp.tokens == [token_text(server, t) for t in want]
    ref = hf_log_softmax(tiny[1], ids + want)
    for i, tok in enumerate(want):
        row = ref[len(ids) - 1 + i]
        assert abs(lp.token_logprobs[i] - float(row[tok])) < LOGPROB_TOL
        top = row.topk(5)
        assert set(lp.top_logprobs[i]) == {token_text(server, int(t)) for t in top.indices}
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(lp.top_logprobs[i][token_text(server, t)] - v) < LOGPROB_TOL
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert server.wait_idle()


def test_chat_logprobs_streamed_and_not_match_transformers(server, tiny):
    messages = [{"role": "user", "content": "w10 w11 w12"}]
    ids = server.codec.tokenizer.encode(server.codec.render_messages(messages, ""), add_special_tokens=False).ids
    want = reference_greedy(tiny[1], ids, 5)
    ref = hf_log_softmax(tiny[1], ids + want)
    client = server.client()
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    streamed = [e for c in client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5,
                                                          temperature=0, logprobs=True, top_logprobs=3, stream=True)
                for e in ((c.choices[0].logprobs.content or []) if c.choices and c.choices[0].logprobs else [])]
    for content in (r.choices[0].logprobs.content, streamed):
        got = [e for e in content]
        assert [e.token for e in got] == [token_text(server, t) for t in want if t != 2]
        for i, e in enumerate(got):
            row = ref[len(ids) - 1 + i]
            assert abs(e.logprob - float(row[want[i]])) < LOGPROB_TOL
            assert e.bytes == list(e.token.encode())
            top = row.topk(3)
            assert [t.token for t in e.top_logprobs] == [token_text(server, int(t)) for t in top.indices]
            assert all(abs(t.logprob - v) < LOGPROB_TOL for t, v in zip(e.top_logprobs, top.values.tolist()))
    # logprobs without top_logprobs: the chosen tokens' only
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[], []]
    assert server.wait_idle()


def test_echo_with_max_tokens_0_scores_the_prompt(server, tiny):
    """What evaluation harnesses send: the prompt's own log-probabilities, nothing generated."""
    prompt = "w7 w8 w9 w20 w21 w22 w40 w3"
    ids = prompt_ids(server, prompt)
    ref = hf_log_softmax(tiny[1], ids)
    batch_engine = server.engine.engine
    batch_engine.prefill_chunk = 3        # the prompt prefilled over three passes: its logprobs come in parts
    try:
        r = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    finally:
        batch_engine.prefill_chunk = 512
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert c.logprobs.tokens == [token_text(server, t) for t in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(c.logprobs.token_logprobs[i] - float(ref[i - 1, ids[i]])) < LOGPROB_TOL
        top = ref[i - 1].topk(2)
        assert {k: pytest.approx(v, abs=LOGPROB_TOL) for k, v in c.logprobs.top_logprobs[i].items()} == \
            {token_text(server, int(t)): v for t, v in zip(top.indices, top.values.tolist())}
    # echo alone: the prompt back, no logprobs; an empty prompt is still refused
    r = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True)
    assert (r.choices[0].text, r.choices[0].logprobs, r.usage.prompt_tokens) == (prompt, None, len(ids))
    with pytest.raises(openai.BadRequestError) as err:
        server.client().completions.create(model=MODEL_NAME, prompt="", max_tokens=0, echo=True)
    assert err.value.param == "prompt"
    # echo with generation: the prompt's text, then the completion's; logprobs over both
    want = reference_greedy(tiny[1], ids, 3)
    r = server.client().completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3, echo=True, logprobs=0,
                                           temperature=0)
    lp = r.choices[0].logprobs
    assert lp.tokens == [token_text(server, t) for t in ids + want]
    full = hf_log_softmax(tiny[1], ids + want)
    assert lp.token_logprobs[0] is None
    for i in range(1, len(ids) + 3):
        assert abs(lp.token_logprobs[i] - float(full[i - 1, (ids + want)[i]])) < LOGPROB_TOL
    assert server.wait_idle()


def test_penalties_and_logit_bias_follow_openai_formulas(server, tiny):
    prompt = "w10 w11 w12"
    ids = prompt_ids(server, prompt)
    client = server.client()
    plain = reference_greedy(tiny[1], ids, 10)
    cases = [dict(presence=1.5), dict(frequency=0.8), dict(presence=-0.5, frequency=1.2),
             dict(bias={plain[0]: -100.0, 17: 3.5})]
    for case in cases:
        want = reference_greedy(tiny[1], ids, 10, **case)
        assert want != plain, f"{case} must change the greedy tokens for this test to mean anything"
        r = client.completions.create(
            model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0, logprobs=0,
            presence_penalty=case.get("presence"), frequency_penalty=case.get("frequency"),
            logit_bias={str(k): v for k, v in case.get("bias", {}).items()} or None)
        assert r.choices[0].logprobs.tokens == [token_text(server, t) for t in want], case
        # the reported logprobs are the model's own (vLLM's default): before bias and penalties
        ref = hf_log_softmax(tiny[1], ids + want)
        for i, tok in enumerate(want):
            assert abs(r.choices[0].logprobs.token_logprobs[i] - float(ref[len(ids) - 1 + i, tok])) < LOGPROB_TOL
    assert server.wait_idle()


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("response_format", {"type": "json_object"}), ("suffix", " w9"),
    ("logprobs", 21), ("top_logprobs", 21), ("top_logprobs", 2),          # top_logprobs needs logprobs (chat)
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("presence_penalty", "high"),
    ("logit_bias", {"5": 101}), ("logit_bias", {"w5": 1}), ("logit_bias", {"500": 1}), ("logit_bias", [1]),
    ("echo", "yes"), ("max_tokens", 0),          # 0 only with echo
    ("ringllm_draft", "no"),                      # the extension takes true or false only
])
def test_unsupported_or_bad_fields_are_400_naming_the_field(server, field, value):
    chat = field in ("tools", "tool_choice", "functions", "function_call", "response_format", "top_logprobs")
    body = {field: value}
    if field == "logprobs" and chat:
        body["logprobs"] = True
    with pytest.raises(openai.BadRequestError) as err:
        if chat:
            server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "w5"}],
                                                    max_tokens=2, extra_body=body)
        else:
            server.client().completions.create(model=MODEL_NAME, prompt="w5", max_tokens=2, extra_body=body)
    assert err.value.status_code == 400
    assert err.value.param == field, err.value.message
    assert field in err.value.message
    assert server.wait_idle()


def test_harmless_fields_are_accepted(server, tiny):
    """Fields clients send that do not change the output: a 200 and the same tokens."""
    ids = prompt_ids(server, "w10 w11 w12")
    want = reference_greedy(tiny[1], ids, 4)
    r = server.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "w10"}], max_tokens=4, temperature=0,
        response_format={"type": "text"}, user="u1", metadata={"k": "v"}, store=False,
        parallel_tool_calls=False, service_tier="auto")
    assert r.choices[0].finish_reason in ("length", "stop")
    r = server.client().completions.create(model=MODEL_NAME, prompt=ids, max_tokens=4, temperature=0, user="u1",
                                           presence_penalty=0, frequency_penalty=0, logit_bias={})
    assert r.choices[0].text == server.codec.decode(want)


def test_streaming_engine_carries_logprobs_echo_and_options_in_bounded_messages(tiny):
    """The default engine (GPU process child): a long prompt's logprobs with 20 alternatives each
    and a logit_bias of many entries cross the message channel in parts; values as transformers'."""
    from tests.test_serve_streaming import ServerProcess, queues_left
    import signal

    model_dir, hf = tiny
    server = ServerProcess(model_dir)
    try:
        client = server.client()
        ids = [3 + (7 * i) % 120 for i in range(60)]
        ref = hf_log_softmax(hf, ids)
        r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True, logprobs=20)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < LOGPROB_TOL
            assert len(lp.top_logprobs[i]) == 20
            assert abs(max(lp.top_logprobs[i].values()) - float(ref[i - 1].max())) < LOGPROB_TOL

        prompt = ids[:5]
        bias = {t: 0.01 * (t % 7) for t in range(3, 120)}      # 117 entries: Options in several messages
        bias[prompt[0]] = 5.0
        want = reference_greedy(hf, prompt, 8, presence=0.7, frequency=0.4, bias=bias)
        assert want != reference_greedy(hf, prompt, 8)
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                      presence_penalty=0.7, frequency_penalty=0.4,
                                      logit_bias={str(k): v for k, v in bias.items()})
        got = r.choices[0].logprobs
        full = hf_log_softmax(hf, prompt + want)
        assert len(got.tokens) == len(want)
        for i, tok in enumerate(want):
            assert abs(got.token_logprobs[i] - float(full[len(prompt) - 1 + i, tok])) < LOGPROB_TOL
        server.proc.send_signal(signal.SIGTERM)
        rc = server.wait()
    finally:
        server.kill()
    assert rc == 0, server.err
    assert not queues_left(server.run_id()), server.err


def test_logprob_events_and_request_options_keep_to_the_message_cap():
    from ringllm.shm.channel import MESSAGE_BYTES, Events, Options, Submit, decode, encode, event_messages, \
        event_rows, submit_messages
    from ringllm.workers.sampling import SamplingParams

    top = [[2**32 - 1 - k, -1e-300 * k - 0.1] for k in range(20)]      # the widest entries msgpack writes
    entry = [2**32 - 1, -123.456789, top]
    rows = event_rows(2**31, None, None, 0, 0, None, [entry] * 45)
    rows += event_rows(2**31, 2**32 - 1, "length", 4096, 4096, entry)
    events = [decode(encode(m)) for m in event_messages(rows, True)]
    assert all(isinstance(m, Events) and len(encode(m)) <= MESSAGE_BYTES for m in events)
    assert [r for m in events for r in m.events] == rows
    assert [e for r in rows for e in r[6]] == [entry] * 45

    bias = tuple((2**32 - 1 - k, -99.123456789) for k in range(300))
    sampling = SamplingParams(0.5, 1.0, 0, 1, 1.5, -2.0, bias)
    msgs = [decode(encode(m)) for m in submit_messages(3, [5] * 900, 4, sampling, [2], 20, True)]
    options = [m for m in msgs if isinstance(m, Options)]
    assert len(options) > 1 and isinstance(msgs[-1], Submit)
    assert tuple(tuple(p) for m in options for p in m.logit_bias) == bias
    assert {(m.logprobs, m.prompt_logprobs, m.presence_penalty, m.frequency_penalty) for m in options} == \
        {(20, True, 1.5, -2.0)}
    plain = submit_messages(3, [5], 4, SamplingParams(), [2])
    assert not any(isinstance(m, Options) for m in plain)
