"""The streaming pipeline (supervisor + coordinator + loaders + GPU process on device cpu) gives
exactly the tokens of the in-process reference and of transformers, with a ring that wraps."""
from __future__ import annotations

import posix_ipc
import psutil
import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from ringllm.config import build_config
from ringllm.faults import FaultPlan
from ringllm.supervisor.supervisor import Supervisor
from tests.conftest import LLAMA3_ROPE, hf_greedy_cached, make_hf_checkpoint
from ringllm.workers.generation import Sampler, SamplingParams, generate
from ringllm.workers.model import Llama
from ringllm.workers.resident import ResidentSource, load_resident_weights

CPU = torch.device("cpu")


def resident_tokens(model_dir, prompts, max_new, dtype=torch.float32, eos=()):
    layout = load_layout(model_dir)
    model = Llama(layout.config, load_resident_weights(layout, dtype, CPU),
                  ResidentSource(layout, dtype, CPU), dtype, CPU)
    return generate(model, prompts, max_new, Sampler(SamplingParams(), CPU), eos)


def hf_greedy(hf, prompt, max_new):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def stream_tokens(model_dir, prompts, max_new, dtype="float32", eos=(), sampling=SamplingParams(),
                  on_tokens=None, **engine):
    layout = load_layout(model_dir)
    cfg = build_config(**engine)
    sup = Supervisor(layout, cfg, "cpu", dtype)
    result = sup.run(prompts, max_new, sampling, eos, on_tokens or (lambda i, t: None))
    assert_run_cleaned(sup)
    return result


def assert_run_cleaned(sup: Supervisor):
    """Every resource this run created is gone, and so are its processes."""
    for name in sup.names.queues:
        with pytest.raises(posix_ipc.ExistentialError):
            posix_ipc.MessageQueue(name)
    for name in sup.names.segments:
        with pytest.raises(posix_ipc.ExistentialError):
            posix_ipc.SharedMemory(name)
    assert not sup.names.manifest_path.exists()
    assert [c for c in psutil.Process().children(recursive=True) if c.is_running()
            and c.status() != psutil.STATUS_ZOMBIE] == []


@pytest.mark.parametrize("loaders", [1, 4])
def test_tiny_model_streams_like_reference_and_transformers(tmp_path, loaders):
    d = tmp_path / "m"
    hf = make_hf_checkpoint(d, num_hidden_layers=7, rope_scaling=LLAMA3_ROPE, max_shard_size="60KB")
    gen = torch.Generator().manual_seed(loaders)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (11, 4)]
    # ring of 3 slots for 7 layers: it must wrap and evict on every pass
    result = stream_tokens(d, prompts, 10, loaders=loaders, cpu_cap=3, gpu_ahead_layers=2,
                           cpu_ring_offset=1, chunk_bytes=4096)
    assert result.outputs == resident_tokens(d, prompts, 10)
    assert result.outputs == [hf_greedy(hf, p, 10) for p in prompts]
    c = result.coordinator
    assert c["ring_evictions"] > 0 and c["ring_loads"] > 7      # layers were read more than once
    assert c["disk_bytes"] >= c["ring_loads"] * 4096
    assert result.gpu["h2d_bytes"] > 0


def test_processes_are_separate_and_named(tmp_path):
    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=3)
    seen = []

    def look(prompt, token):
        if not seen:
            seen.extend(sorted(p.name() for p in psutil.Process().children(recursive=True)
                               if p.name().startswith("ringllm")))

    stream_tokens(d, [[5, 6, 7]], 3, loaders=3, on_tokens=look, cpu_cap=4)
    assert seen == ["ringllm-coord", "ringllm-gpu", "ringllm-load0", "ringllm-load1", "ringllm-load2"]


def test_smollm2_streamed_matches_reference_and_transformers(demo_model_dir):
    from transformers import AutoModelForCausalLM

    from ringllm.checkpoint.text import TextCodec

    layout = load_layout(demo_model_dir)
    codec = TextCodec(demo_model_dir, layout.config)
    prompt = codec.encode("Write a short poem about the sea.", chat=True)
    # 30 layers through a 12-slot ring, two loaders
    result = stream_tokens(demo_model_dir, [prompt], 32, loaders=2, cpu_cap=12)
    assert result.outputs[0] == resident_tokens(demo_model_dir, [prompt], 32)[0]
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    assert result.outputs[0] == hf_greedy_cached(hf, prompt, 32)


def test_bf16_streamed_equals_bf16_reference(demo_model_dir):
    """Same precision (the checkpoint's bf16) on both sides: identical tokens, EOS respected."""
    from ringllm.checkpoint.text import TextCodec

    layout = load_layout(demo_model_dir)
    codec = TextCodec(demo_model_dir, layout.config)
    prompt = codec.encode("What is the capital of France?", chat=True)
    streamed = stream_tokens(demo_model_dir, [prompt], 24, dtype="bfloat16", eos=codec.eos_ids, loaders=4,
                             cpu_cap=5, gpu_ahead_layers=3)
    reference = resident_tokens(demo_model_dir, [prompt], 24, torch.bfloat16, codec.eos_ids)
    assert streamed.outputs == reference
    assert "Paris" in codec.decode(streamed.outputs[0])


def test_sampling_with_seed_matches_reference(tmp_path):
    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=2)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=123)
    layout = load_layout(d)
    model = Llama(layout.config, load_resident_weights(layout, torch.float32, CPU),
                  ResidentSource(layout, torch.float32, CPU), torch.float32, CPU)
    ref = generate(model, [[4, 5, 6]], 12, Sampler(params, CPU), ())
    assert stream_tokens(d, [[4, 5, 6]], 12, sampling=params, cpu_cap=2, gpu_ahead_layers=1).outputs == ref


@pytest.mark.parametrize("run", range(3))
def test_stress_random_delays(tmp_path, run):
    """Random delays in every loader and in the GPU process, a 2-slot ring over 5 layers, many
    small chunks: the protocol still delivers exactly the reference tokens."""
    import random

    seed = random.randrange(2**31)
    print(f"chaos seed={seed}")
    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=5, seed=run)
    prompts = [[3, 9, 27, 81 % 128], [5, 25]]
    layout = load_layout(d)
    sup = Supervisor(layout, build_config(loaders=3, cpu_cap=2, gpu_ahead_layers=random.Random(seed).randint(1, 2),
                                          cpu_ring_offset=1, chunk_bytes=4096),
                     "cpu", "float32", faults=FaultPlan(chaos_seed=seed, chaos_delay_s=0.004))
    result = sup.run(prompts, 6, SamplingParams(), (), lambda i, t: None)
    assert_run_cleaned(sup)
    assert result.outputs == resident_tokens(d, prompts, 6), f"chaos seed={seed}"


def test_loader_read_error_ends_run_cleanly(tmp_path):
    from ringllm.checkpoint.errors import RingllmError

    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=3)
    sup = Supervisor(load_layout(d), build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1), "cpu", "float32",
                     faults=FaultPlan(read_errors=((0, 1), (1, 1))))
    with pytest.raises(RingllmError, match=r"loader\d: .*model.safetensors: read error .*injected"):
        sup.run([[4, 5]], 4, SamplingParams(), (), lambda i, t: None)
    assert_run_cleaned(sup)


@pytest.mark.parametrize("resident", [3, 7])
def test_gpu_resident_layers(tmp_path, resident):
    """Layers kept on the GPU are never read into the ring; tokens are unchanged."""
    d = tmp_path / "m"
    make_hf_checkpoint(d, num_hidden_layers=7, seed=9)
    prompts = [[7, 8, 9, 10]]
    result = stream_tokens(d, prompts, 5, loaders=2, cpu_cap=2, gpu_ahead_layers=1, gpu_resident_layers=resident)
    assert result.outputs == resident_tokens(d, prompts, 5)
    layout = load_layout(d)
    layer_bytes = sum(e.extent.nbytes for g in layout.groups[0] for e in g.entries)
    passes = 5   # prefill + 4 decode steps
    if resident == 7:
        assert result.coordinator["ring_loads"] == 0 and result.gpu["h2d_bytes"] == 0
    else:   # the 4 streamed layers each pass, plus what was prefetched for a pass that never came
        assert passes * 4 * layer_bytes <= result.gpu["h2d_bytes"] <= (passes * 4 + 2) * layer_bytes
        # each streamed layer once a pass, plus at most one window (offset 4 + cap 2) read ahead
        assert passes * 4 <= result.coordinator["ring_loads"] <= passes * 4 + 4 + 2
    assert result.gpu_info["resident_layers"] == resident
