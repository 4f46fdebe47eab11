"""serve's memory plan reserves the workspace of the largest pass it runs (the prefill budget plus a
token for every other row, attention over --max-context for each row), not --max-batch x
--max-context tokens at once: on the 70B shape it is what `ringllm serve` prints and what the GPU
process keeps layers beside; and a tiny model's real passes, measured by the allocator, fit in it."""
from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from ringllm.config import GIB, build_config
from ringllm.supervisor.startup import resident_estimate
from ringllm.tools.make_checkpoint import make_checkpoint
from ringllm.workers.engine import Engine, Request
from ringllm.workers.gpu_process import GpuArgs, resident_layer_count
from ringllm.workers.memory_plan import WORKSPACE_SLACK, layers_that_fit, plan_gpu_memory, serve_pass_tokens
from ringllm.workers.sampling import SamplingParams
from tests.conftest import make_hf_checkpoint
from tests.test_model_vs_transformers import ringllm_model


@pytest.fixture(scope="module")
def l70(tmp_path_factory):
    """The 70B shape, headers only (the data are holes): real sizes, no disk."""
    return make_checkpoint(tmp_path_factory.mktemp("l70") / "l70", "llama-3.1-70b", 80, progress=False, sparse=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gib(amount: str, unit: str) -> float:
    return float(amount) / (1 if unit == "GiB" else 1024)


def test_serve_70b_plans_the_workspace_of_one_pass(l70):
    """--max-batch 8 --max-context 8192 under a cap too small for its KV cache alone (20 GiB): the
    refusal lists the workspace, which is one pass's (about 2.4 GiB, most of it the 8 rows' keys
    and values repeated for the 64 query heads), not 8 x 8192 tokens' (18.5 GiB)."""
    r = subprocess.run([sys.executable, "-m", "ringllm", "serve", "--model", str(l70), "--device", "cpu",
                        "--port", str(free_port()), "--max-batch", "8", "--max-context", "8192",
                        "--gpu-mem", "10GiB", "--loaders", "1"], capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("ringllm: error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    kv = re.search(r"KV cache ([\d.]+) (GiB|MiB)", errors[0])
    workspace = re.search(r"workspace ([\d.]+) (GiB|MiB)", errors[0])
    assert kv and workspace, errors[0]
    assert gib(*kv.groups()) == 20.0, errors[0]        # 80 layers x 2 x 8 rows x 8192 x 8 heads x 128 x 2 bytes
    assert gib(*workspace.groups()) < 3, f"serve plans a workspace of {workspace[0]}: {errors[0]}"


def test_gpu_process_keeps_the_layers_the_pass_workspace_leaves(l70):
    """Under --gpu-mem 64GiB with GPU_RESIDENT_LAYERS auto, serve's GPU process (and the
    supervisor's estimate, which starts the loaders on it) keep the layers that fit beside one
    pass's workspace: the 18 GiB more that 8 x 8192 tokens at once took are 11 layers of 1.6 GiB."""
    layout, cap = load_layout(l70), 64 * GIB
    engine = build_config(gpu_mem=cap)
    args = GpuArgs(0, "", "", "", "", layout, (), engine, "cuda", "bfloat16", (), 0, SamplingParams(), (),
                   serve=(8, 8192))
    kept = resident_layer_count(args, "cuda", free_bytes=None)
    assert resident_estimate(layout, engine, 8, 8192, "bfloat16", "cuda", serving=True) == kept
    one_pass = plan_gpu_memory(layout, engine, 8, 8192, "bfloat16", embed_on_host=True,
                               pass_tokens=serve_pass_tokens(8, 8192))
    all_at_once = plan_gpu_memory(layout, engine, 8, 8192, "bfloat16", embed_on_host=True)
    assert one_pass.workspace < 3 * GIB
    assert kept == layers_that_fit(layout, one_pass, cap)
    assert kept - layers_that_fit(layout, all_at_once, cap) >= 11, kept


class PeakCpuBytes:
    """The most bytes torch's CPU allocator held at once beyond what it held at the start, from
    the profiler's raw allocation and free events, those inside an op included (an independent
    measure of what a pass allocates)."""

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        held = self.peak = 0
        for _, nbytes in events:
            held += nbytes
            self.peak = max(self.peak, held)


def test_the_largest_passes_fit_the_planned_workspace(tmp_path):
    """A tiny model served with 4 rows of 128 slots and a 32-token prefill budget, run to the
    passes the plan must hold: a full prefill chunk deep in the context beside 3 decoding rows,
    then 4 rows decoding at the end of their context. The bytes torch allocates during each pass
    stay within the planned workspace (without its fixed slack, which would hide everything at
    this size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # parallel kernels may take scratch per thread: one, on any machine
    try:
        peaks, plan = run_measured_passes(tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert max(peaks) > 0, "the measure saw no allocation"
    assert max(peaks) <= plan.workspace - WORKSPACE_SLACK, (max(peaks), plan.workspace - WORKSPACE_SLACK)


def run_measured_passes(tmp_path):
    """(bytes allocated at the peak of each pass, the plan) of a run to a full cache."""
    d = tmp_path / "tiny"
    make_hf_checkpoint(d, seed=1, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    layout = load_layout(d)
    batch, context, chunk = 4, 128, 32
    plan = plan_gpu_memory(layout, build_config(), batch, context, "float32", embed_on_host=False,
                           pass_tokens=serve_pass_tokens(batch, context, chunk))
    engine = Engine(ringllm_model(d), batch, context, prefill_chunk=chunk)
    g = torch.Generator().manual_seed(2)
    prompts = [tuple(torch.randint(3, 128, (n,), generator=g).tolist()) for n in (100, 101, 102, 120)]
    peaks = []
    for i, p in enumerate(prompts):
        engine.submit(Request(f"r{i}", p, context - len(p), SamplingParams()))
    while not engine.idle():
        with PeakCpuBytes() as measured:
            engine.step()
        peaks.append(measured.peak)
    assert engine.passes == len(peaks)
    return peaks, plan
