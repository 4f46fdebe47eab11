"""Tensor parallel in the streaming engine (issue #16): N GPU processes (ranks, gloo on cpu) share
the one ring, each copying and computing its share of every layer. Their tokens are transformers'
and the one-process engine's; bad input is one line; a dead rank ends the run within seconds and
leaves nothing behind."""
from __future__ import annotations

import subprocess
import sys
import time

import posix_ipc
import pytest

from ringllm.checkpoint.layout import load_layout
from ringllm.config import build_config
from ringllm.supervisor.parallel import TensorParallelPlan
from ringllm.supervisor.supervisor import Supervisor
from ringllm.workers.generation import SamplingParams
from tests.conftest import hf_greedy_cached, make_hf_checkpoint, write_tokenizer
from tests.test_lifecycle import assert_nothing_left, long_run_model, start, wait_for_children, wait_for_tokens  # noqa: F401
from tests.test_streaming import assert_run_cleaned

# 3 key/value heads: 2 ranks split them 2 + 1, 3 ranks 1 + 1 + 1 (uneven shares are allowed)
THREE_KV = dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16, hidden_size=96, intermediate_size=112,
                num_hidden_layers=4)
PROMPT = [5, 9, 17, 3, 44]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_ranks_give_transformers_tokens_through_a_disk_fed_ring(tmp_path, world, sharded):
    """A ring of 2 slots for 4 streamed layers: every slot is offered to every rank, evicted and
    reloaded each pass; a layer straddling shards with `sharded`."""
    d = tmp_path / "m"
    hf = make_hf_checkpoint(d, max_shard_size="60KB" if sharded else None, **THREE_KV)
    write_tokenizer(d)
    want = hf_greedy_cached(hf, PROMPT, 10)
    engine = build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1, gpu_resident_layers=0)
    sup = Supervisor(load_layout(d), engine, "cpu", "float32", parallel=TensorParallelPlan(world))
    result = sup.run([PROMPT], 10, SamplingParams(), (), lambda i, t: None)
    assert result.outputs == [want]
    assert result.coordinator["ring_evictions"] > 0          # disk-fed: slots came and went
    assert result.gpu_info["world"] == world
    assert_run_cleaned(sup)


@pytest.mark.parametrize("world", [2, 3])
def test_smollm2_with_ranks_answers_as_one_process(demo_model_dir, world):
    common = ["generate", "--model", str(demo_model_dir), "--device", "cpu", "--dtype", "float32",
              "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]
    one = subprocess.run([sys.executable, "-m", "ringllm", *common, "--resident"], capture_output=True, text=True,
                         timeout=300)
    ranks = subprocess.run([sys.executable, "-m", "ringllm", *common, "--tensor-parallel", str(world),
                            "--loaders", "2"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert ranks.returncode == 0, ranks.stderr
    assert ranks.stdout == one.stdout and one.stdout.strip()


@pytest.mark.parametrize("extra,line", [
    (["--tensor-parallel", "0"], "--tensor-parallel must be >= 1, got 0"),
    (["--tensor-parallel", "4"], "--tensor-parallel 4: the model has 3 key/value heads"),
    (["--tensor-parallel", "2", "--devices", "0"], "--devices 0: 2 different device indices"),
    (["--tensor-parallel", "2", "--devices", "0,0"], "ranks may share a GPU only with --tp-backend gloo"),
    (["--tensor-parallel", "2", "--tp-backend", "nccl"], "--tp-backend nccl needs --device cuda"),
    (["--tensor-parallel", "2", "--resident"], "--resident is one process"),
])
def test_bad_tensor_parallel_input_is_one_line(tmp_path, extra, line):
    d = tmp_path / "m"
    make_hf_checkpoint(d, **THREE_KV)
    write_tokenizer(d)
    r = subprocess.run([sys.executable, "-m", "ringllm", "generate", "--model", str(d), "--device", "cpu",
                        "--prompt", "w5", "--max-new-tokens", "2", *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ringllm: error:") and line in last, r.stderr


def test_a_dead_rank_ends_the_run_and_leaves_nothing(long_run_model):
    proc = start(long_run_model, "--tensor-parallel", "2")
    kids, run_id = wait_for_children(proc, ("ringllm-coord", "ringllm-gpu", "ringllm-gpu1", "ringllm-load0"))
    wait_for_tokens(proc)
    t0 = time.monotonic()
    kids["ringllm-gpu1"].kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - t0 < 10
    assert err.strip().splitlines()[-1].startswith("ringllm: error: the gpu1 process exited unexpectedly"), err
    assert_nothing_left(run_id, kids)
    with pytest.raises(posix_ipc.ExistentialError):      # the second rank's queue too
        posix_ipc.MessageQueue(f"/ringllm-{run_id}-gpu1")


def test_speculative_decoding_with_ranks_gives_the_one_process_tokens(tmp_path):
    """Rank 0 drafts (prompt lookup, or the draft model only it loads) and hands each tree to the
    others; every rank verifies it through the split layers: greedy output is the resident
    engine's without a draft."""
    d, draft = tmp_path / "m", tmp_path / "draft"
    make_hf_checkpoint(d, **THREE_KV)
    write_tokenizer(d)
    make_hf_checkpoint(draft, seed=1, **{**THREE_KV, "num_hidden_layers": 1})
    write_tokenizer(draft)
    common = ["generate", "--model", str(d), "--device", "cpu", "--dtype", "float32", "--no-chat",
              "--prompt", "w5 w6 w7 w5 w6 w7 w5 w6", "--max-new-tokens", "16", "--loaders", "2"]
    runs = {}
    for name, extra in (("resident", ["--resident"]), ("ngram", ["--tensor-parallel", "2", "--draft", "ngram"]),
                        ("model", ["--tensor-parallel", "3", "--draft-model", str(draft)])):
        r = subprocess.run([sys.executable, "-m", "ringllm", *common, *extra], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        runs[name] = r
    assert runs["ngram"].stdout == runs["model"].stdout == runs["resident"].stdout and runs["resident"].stdout.strip()
    assert "tokens per pass" in runs["ngram"].stderr and "drafts accepted" in runs["model"].stderr


def test_sampled_tokens_agree_across_ranks_and_a_rank_that_diverges_fails_the_run(tmp_path):
    """Sampling: every rank draws from the same gathered logits with one seed (the supervisor
    picks it when none is given), and each rank reports a digest of its tokens at the end: a rank
    sampling with another seed (a fault) makes the run fail in one line, not print wrong text."""
    from ringllm.checkpoint.errors import RingllmError
    from ringllm.faults import FaultPlan

    d = tmp_path / "m"
    make_hf_checkpoint(d, **THREE_KV)
    write_tokenizer(d)
    layout = load_layout(d)
    engine = build_config(loaders=2, cpu_cap=4, gpu_ahead_layers=1, gpu_resident_layers=0)
    sampled = SamplingParams(temperature=1.0, seed=5)

    def run(params, world, faults=None):
        sup = Supervisor(layout, engine, "cpu", "float32", parallel=TensorParallelPlan(world),
                         **({"faults": faults} if faults else {}))
        try:
            return sup.run([PROMPT], 12, params, (), lambda i, t: None).outputs
        finally:
            assert_run_cleaned(sup)

    assert run(sampled, 2) == run(sampled, 1)
    run(SamplingParams(temperature=1.0), 2)          # no seed: one for both ranks, so they agree
    with pytest.raises(RingllmError, match=r"rank\(s\) \[1\] sampled other tokens than rank 0"):
        run(sampled, 2, FaultPlan(rank_seed_skew=True))


def test_a_hung_rank_ends_the_run_naming_it_and_leaves_nothing(tmp_path):
    """Rank 1 stops (SIGSTOP) mid-run: alive, so no death to notice. Rank 0 gives up on it past
    start-up within twice the wait timeout (its gathers' timeout, or its wait for a slot that rank
    1 still holds), and the error names the stopped rank; the stopped process is removed too."""
    from ringllm.checkpoint.errors import RingllmError
    from ringllm.faults import FaultPlan

    d = tmp_path / "m"
    make_hf_checkpoint(d, **THREE_KV)
    write_tokenizer(d)
    engine = build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1, gpu_resident_layers=0, wait_timeout_s=2.0)
    sup = Supervisor(load_layout(d), engine, "cpu", "float32", parallel=TensorParallelPlan(2),
                     faults=FaultPlan(rank_stops_after_tokens=3))
    t0 = time.monotonic()
    with pytest.raises(RingllmError, match=r"^gpu: .*; gpu1 is stopped \(not running\)$"):
        sup.run([PROMPT], 40, SamplingParams(), (), lambda i, t: None)
    assert time.monotonic() - t0 < 30
    assert_run_cleaned(sup)


def test_only_rank_0_writes_the_stats_page(tmp_path):
    """[P11] one writer per stats record: `ringllm top` reads rank 0's copy counter, growing. Ranks
    copy unequal shares (3 kv heads over 2 ranks): had rank 1 written the record too, a reader
    would see the counter jump back and forth (or a torn record)."""
    import threading

    from ringllm.shm.seqlock import TornRecord
    from ringllm.shm.stats import RUNNING

    d = tmp_path / "m"
    make_hf_checkpoint(d, **THREE_KV)
    write_tokenizer(d)
    engine = build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1, gpu_resident_layers=0)
    sup = Supervisor(load_layout(d), engine, "cpu", "float32", parallel=TensorParallelPlan(2))
    seen, errors, done = [], [], threading.Event()

    def watch():
        while not done.is_set() and not errors:
            page = sup.page
            try:
                if page is not None and (snapshot := page.read())["status"] == RUNNING:
                    seen.append(snapshot["gpu"]["h2d_bytes"])
            except TornRecord as err:      # writers that collided left the record unreadable
                errors.append(err)
            except (ValueError, OSError):  # the page closed at the run's end
                break
            time.sleep(0.001)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        result = sup.run([PROMPT], 40, SamplingParams(), (), lambda i, t: None)
    finally:
        done.set()
        reader.join()
    assert not errors
    assert len(set(seen)) > 10                 # the reader saw the counter move
    assert all(a <= b for a, b in zip(seen, seen[1:])), "the copy counter went back: two ranks write it"
    assert max(seen) <= result.gpu["h2d_bytes"]
    assert_run_cleaned(sup)
