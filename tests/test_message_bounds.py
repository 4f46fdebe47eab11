"""No message grows with the length of a run ([P12]): speculative decoding on the streaming engine
(child processes, the default) for 10,000 tokens with each draft kind ends with its summary and
metrics, and every message type of shm/channel.py, built at the largest size a run can give it,
encodes within the cap."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_hf_checkpoint, make_model_dir, write_tokenizer

LONG = 10_000
PROMPT = [9, 10, 11, 9, 10, 11, 9, 10]
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}      # write_tokenizer's; the other words are w<id>


def ringllm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory):
    """Two tiny targets with room for LONG new tokens, and each in transformers, each chosen so that
    10,000 tokens take few passes:
    - "looping" (seed 1): its greedy text falls into a loop (never its EOS), which prompt lookup
      copies many tokens a pass;
    - "sharp" (weights drawn wide, initializer_range 1.0): sharp next-token distributions, so that
      drafting for itself its trees grow deep and are accepted whole (8 tokens a pass; with the
      default 0.02 the trees stay one level wide: 5,000 passes, 190 s). Its EOS (token 2) gets the
      logit 0 (a zero lm_head row), far below the top logit of so sharp a model: it never ends early."""
    root = tmp_path_factory.mktemp("long")
    looping = make_hf_checkpoint(root / "looping", seed=1, max_position_embeddings=LONG + 64)
    sharp = make_hf_checkpoint(root / "sharp", seed=1, max_position_embeddings=LONG + 64, initializer_range=1.0)
    with torch.no_grad():
        sharp.lm_head.weight[SPECIAL["</s>"]] = 0
    sharp.save_pretrained(root / "sharp", safe_serialization=True)
    for name in ("looping", "sharp"):
        write_tokenizer(root / name)
    return {"looping": (root / "looping", looping), "sharp": (root / "sharp", sharp)}


def transformers_greedy_after_each(hf, prompt, out) -> list[int]:
    """transformers' greedy token after prompt + out[:i] for every i, in one forward over the whole
    text (2,000 cached steps took 20-30 s here): equal to `out` exactly when out is greedy decoding."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out[:-1]])).logits[0]
    return logits[len(prompt) - 1:].argmax(-1).tolist()


# the sharp target drafts for itself (its drafts are accepted: ~8x fewer passes than a random draft's),
# and each pass still grows its tree level by level
@pytest.mark.parametrize("target_name, draft_flags", [("looping", ("--draft", "ngram", "--spec-tokens", "8")),
                                                      ("sharp", ("--draft-model", "TARGET", "--spec-tokens", "8"))],
                         ids=["ngram", "draft-model"])
def test_10000_tokens_of_speculative_decoding_on_the_streaming_engine(long_runs, tmp_path, target_name, draft_flags):
    target, hf = long_runs[target_name]
    flags = [str(target) if f == "TARGET" else f for f in draft_flags]
    metrics = tmp_path / "metrics.json"
    r = ringllm("generate", "--model", str(target), "--device", "cpu", "--no-chat", "--dtype", "float32",
                "--prompt", " ".join(f"w{t}" for t in PROMPT), "--max-new-tokens", str(LONG),
                "--loaders", "2", "--set", "GPU_AHEAD_LAYERS=1", *flags, "--metrics-json", str(metrics))
    assert r.returncode == 0, r.stderr[-2000:]
    out = [SPECIAL[w] if w in SPECIAL else int(w[1:]) for w in r.stdout.split()]
    assert len(out) == LONG and out == transformers_greedy_after_each(hf, PROMPT, out)
    spec = json.loads(metrics.read_text())["speculation"]
    assert spec["tokens"] == LONG - 1 and spec["passes"] > 30       # the bug showed after ~30 passes
    assert spec["tokens_per_pass"] > 4          # the runs are as short as the fixture says
    assert "tokens per pass" in r.stderr


# --- every message type at the largest size a run can give it ---------------------------------------
# The bounds: msgpack ints take at most 9 bytes (any 64-bit value; steps, byte counts, job and
# request ids only grow with a run but stay below 2**64); token ids and counts of tokens are below
# 2**32 (vocab 152k, context 128k); files are table indices; free text is cut (Fatal); lists are
# split into parts; the dict reports travel in Parts whatever their size.
U64, U32 = 2**64 - 1, 2**32 - 1
CONTEXT, VOCAB = 131072, 152064          # Llama-3.1's context; Qwen2's vocabulary, the largest we plan for


def largest_scalars(cls):
    """cls with every field at its largest: ints 2**64 - 1, floats, flags set."""
    import dataclasses

    values = {"int": U64, "float": 1.2345678901234567e308, "bool": True}
    return cls(*(values[f.type] for f in dataclasses.fields(cls)))


def roundtrip(msg):
    """msg through a real queue, the sender in a thread (a report in parts needs more messages than
    a queue holds): what the receiver gets."""
    import os
    import threading
    import uuid

    import posix_ipc

    from ringllm.shm.channel import Channel

    name = f"/msgbounds-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rx = Channel(name, create=True)
    try:
        tx = Channel(name)
        sender = threading.Thread(target=tx.send, args=(msg,), kwargs={"timeout": 30})
        sender.start()
        got = rx.receive(timeout=30)
        sender.join(timeout=30)
        tx.close()
        return got
    finally:
        rx.close()
        posix_ipc.unlink_message_queue(name)


def test_every_message_type_fits_the_cap_at_the_largest_size_a_run_gives_it():
    from ringllm.shm import channel as ch
    from ringllm.workers.engine import CANCELLED, LENGTH, STOP, RequestStats, TokenLogprob
    from ringllm.workers.sampling import MAX_TOP_LOGPROBS, SamplingParams
    from ringllm.workers.speculation import SpecStats

    built: dict[type, list] = {}

    def check(*messages):
        for msg in messages:
            built.setdefault(type(msg), []).append(msg)
            for frame in ch.frames(msg):
                assert len(frame) <= ch.MESSAGE_BYTES, (type(msg).__name__, len(frame))
                built.setdefault(type(ch.decode(frame)), []).append(msg)

    # fixed messages: a few integers, each as large as msgpack carries
    for cls in (ch.Shutdown, ch.StatsRequest, ch.Mark, ch.LoaderRestarted, ch.Cancel, ch.ReadJob, ch.ChunkDone,
                ch.Want, ch.SlotReady, ch.Release, ch.ResidentLayers):
        check(largest_scalars(cls))
    # free text: cut to fit, whatever its length and script
    check(*(ch.Fatal(role, U64, text) for role in ("coordinator", "loader", "gpu")
            for text in ("模型" * 100_000, "\udcff" * 50_000, "x" * 10**6)))
    # a served request: a prompt filling the context, the largest sampling values, a logit_bias for
    # every token of the vocabulary, logprobs of the prompt too, several EOS ids
    sampling = SamplingParams(temperature=1.2345678901234567e308, top_p=0.123456789, top_k=U32, seed=U64,
                              presence_penalty=-1.2345678901234567, frequency_penalty=1.2345678901234567,
                              logit_bias=tuple((t, -99.12345678901234) for t in range(VOCAB)))
    check(*ch.submit_messages(U64, [VOCAB - 1] * CONTEXT, U32, sampling, [VOCAB - 1] * 16,
                              logprobs=MAX_TOP_LOGPROBS, prompt_logprobs=True, draft=False))
    # an engine step of 10,000 requests, each event as wide as one gets: the request id grows with
    # the server's run; the longest finish name, a logprob with the most alternatives, the prompt's
    # logprobs (echo)
    finish = max((STOP, LENGTH, CANCELLED, "error"), key=len)
    widest = (VOCAB - 1, -1.2345678901234567e308)
    entry = TokenLogprob(*widest, (widest,) * MAX_TOP_LOGPROBS)
    counts = RequestStats(U64, U64, U64)       # a finish event's passes, drafted, accepted
    rows = [row for i in range(10_000) for row in ch.event_rows(U64 - i, VOCAB - 1, finish, CONTEXT, CONTEXT, entry,
                                                                 (entry,) * (4096 if i == 0 else 3), counts)]
    check(*ch.event_messages(rows, forward=True))
    # a Part: its data at the room frames() gives it
    check(ch.Part(U32, True, b"\xff" * (ch.MESSAGE_BYTES - ch.PART_HEADER)))
    # the reports: the GPU process's with a speculation table for --spec-tokens 1023 (the bench's
    # widest pass), each row at its widest; the coordinator's counters; a Ready with a long device name
    spec = SpecStats(draft="/" + "d" * 4096, passes=U64, tokens=U64, drafted=U64, accepted=U64, branched=U64,
                     draft_seconds=1e308)
    for width in range(1, 1025):
        spec.record_verify(width, 1e308)
        spec.record_verify(width, 1e308)
    finished = ch.Finished({"new_tokens": U64, "phases": {f"phase{i}": [1e308, 1e308] for i in range(16)},
                            "speculation": spec.as_dict(), "outputs_digest": "f" * 64, "rank": U64})
    stats = ch.Stats("coordinator", {f"counter{i}": U64 for i in range(200)})
    ready = ch.Ready("gpu", U64, {"pid": U32, "name": "NVIDIA " + "H" * 10_000, "free_bytes": U64})
    check(finished, stats, ready)
    for msg in (finished, stats, ready):
        assert roundtrip(msg) == msg
    assert set(built) == set(ch._KINDS.values()), set(ch._KINDS.values()) - set(built)


# --- a seed is the one integer a client chooses freely: it must fit 64 bits (Submit's seed field) ----

def test_a_seed_beyond_64_bits_is_refused_by_the_command_in_one_line(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=1)
    r = ringllm("generate", "--model", str(d), "--device", "cpu", "--resident", "--prompt", "w9 w10",
                "--max-new-tokens", "2", "--temperature", "1", "--seed", str(2**64), timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"ringllm: error: --seed must be a 64-bit integer (-2**63 .. 2**64 - 1), got {2**64}"), r.stderr


def test_reports_of_several_senders_in_parts_are_rejoined_each_on_its_own():
    """Tensor-parallel ranks share the supervisor's queue: their Finished parts may interleave."""
    from ringllm.shm.channel import Finished, Part, PartedMessages, decode, frames

    mine = Finished({"rank": 0, "table": list(range(2000))})
    other = Finished({"rank": 1, "table": [-t for t in range(2000)]})
    a = [decode(f) for f in frames(mine)]
    b = [Part(a[0].sender + 1, p.last, p.data) for p in map(decode, frames(other))]
    assert len(a) > 2 and len(b) > 2 and all(isinstance(p, Part) for p in a + b)
    parted, whole = PartedMessages(), []
    for pa, pb in zip(a, b):
        whole += [m for m in (parted.add(pb), parted.add(pa)) if m is not None]
    assert whole == [other, mine] and parted.pending == {}
