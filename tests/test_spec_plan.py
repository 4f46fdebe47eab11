"""Speculation in the run's plan: `--draft-model DIR`, the draft model and the verify pass's logits
in the GPU memory plan (against the draft's safetensors tensors, read with safetensors), every
planner call planning the same, `--spec-tokens auto` (the pass-cost rule), and the end-of-run
summary's speculation numbers, through the command."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from ringllm.config import build_config
from ringllm.workers.gpu_process import GpuArgs, resident_layer_count
from ringllm.workers.memory_plan import fmt_bytes, plan_gpu_memory
from ringllm.workers.spec_plan import (DRAFT_MODEL_CAP, MIN_SPEC_TOKENS, NGRAM_CAP, PassCost, SpecPlan,
                                       choose_spec_tokens, pass_cost, spec_cap, spec_plan)
from ringllm.workers.speculation import DraftParams, SpeculativeSampling
from tests.conftest import make_model_dir

PROMPT = "w9 w10 w11 w9 w10 w11 w9 w10"      # prompt lookup finds "w9 w10" followed by 6 tokens


def ringllm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True, timeout=timeout)


def errors(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("ringllm: error:")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target, draft): a bf16 target of 4 layers and a smaller untied bf16 draft of 2 layers."""
    root = tmp_path_factory.mktemp("pair")
    target = make_model_dir(root / "m", dtype=torch.bfloat16, num_hidden_layers=4)
    draft = make_model_dir(root / "d", dtype=torch.bfloat16, num_hidden_layers=2, seed=5, intermediate_size=64)
    return target, draft


def safetensors_device_bytes(model_dir: Path, elem_bytes: int) -> tuple[int, int]:
    """(bytes on the device, largest FP8 weight's elements) of a model loaded whole, from its
    safetensors files: every tensor in the compute dtype, except FP8 weights and their scales
    (kept as stored)."""
    from safetensors import safe_open

    total, fp8 = 0, 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                n = math.prod(t.get_shape())
                stored = n * {"F8_E4M3": 1, "F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
                if t.get_dtype() == "F8_E4M3":
                    total, fp8 = total + stored, max(fp8, n)
                elif name.endswith("_scale"):
                    total += stored
                else:
                    total += n * elem_bytes
    return total, fp8


def kv_bytes(model_dir: Path, slots: int, elem_bytes: int) -> int:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    return 2 * raw["num_hidden_layers"] * slots * raw["num_key_value_heads"] * head_dim * elem_bytes


def with_draft(kind, k=4) -> SpeculativeSampling:
    return SpeculativeSampling(draft=DraftParams(str(kind), spec_tokens=k))


# --- 1. --draft-model DIR ------------------------------------------------------------------------

def test_draft_model_flag_runs_the_draft_and_both_flags_are_refused(pair, tmp_path):
    target, draft = pair
    common = ("generate", "--model", str(target), "--device", "cpu", "--no-chat", "--prompt", PROMPT,
              "--max-new-tokens", "10", "--dtype", "float32")
    plain = ringllm(*common, "--resident")
    assert plain.returncode == 0, plain.stderr
    metrics = tmp_path / "m.json"
    r = ringllm(*common, "--draft-model", str(draft), "--metrics-json", str(metrics))
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout and r.stdout.strip()
    spec = json.loads(metrics.read_text())["speculation"]
    assert spec["draft"] == str(draft) and spec["drafted"] > 0, spec
    for both in (("--draft", "ngram"), ("--draft", str(draft))):
        r = ringllm(*common, *both, "--draft-model", str(draft))
        assert r.returncode == 1 and errors(r) == r.stderr.strip().splitlines(), r.stderr
        assert errors(r)[0].startswith(f"ringllm: error: --draft {both[1]} and --draft-model {draft}: give one")
    r = ringllm(*common, "--draft-model", str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"ringllm: error: --draft-model {tmp_path}: not a model directory (no config.json there)")
    helptext = " ".join(ringllm("generate", "--help").stdout.split())
    assert "--draft-model DIR" in helptext and "the same as --draft-model DIR" in helptext


# --- 2. the draft model and the verify logits in the memory plan --------------------------------

@pytest.mark.parametrize("dtype, elem", [("float32", 4), ("bfloat16", 2)])
def test_plan_counts_the_draft_as_its_safetensors_tensors_say(pair, dtype, elem):
    target, draft = pair
    layout, engine, slots, k = load_layout(target), build_config(), 40, 6
    without = plan_gpu_memory(layout, engine, 1, slots, dtype, embed_on_host=True)
    plan = plan_gpu_memory(layout, engine, 1, slots, dtype, embed_on_host=True, spec=spec_plan(with_draft(draft, k)))
    weights, _ = safetensors_device_bytes(draft, elem)
    assert plan.draft_weights == weights
    assert plan.draft_kv == kv_bytes(draft, slots, elem)
    # the verify pass's logits: k + 1 rows of the vocabulary, float32 + compute dtype (8 bytes covers both)
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    assert plan.workspace - without.workspace == 8 * k * vocab
    assert plan.total - without.total == weights + kv_bytes(draft, slots, elem) + 8 * k * vocab
    # prompt lookup: the logits only
    ngram = plan_gpu_memory(layout, engine, 1, slots, dtype, embed_on_host=True, spec=spec_plan(with_draft("ngram", k)))
    assert ngram.total - without.total == 8 * k * vocab and ngram.draft == 0


def test_plan_counts_a_tied_draft_once_and_an_fp8_draft_as_stored(pair, tmp_path):
    from ringllm.cli import main

    target, _ = pair
    tied = make_model_dir(tmp_path / "tied", num_hidden_layers=2, seed=7, tie_word_embeddings=True)
    fp8 = tmp_path / "fp8"
    assert main(["convert", "--to", "fp8", str(tied), str(fp8)]) == 0
    layout = load_layout(target)
    for d in (tied, fp8):
        plan = plan_gpu_memory(layout, build_config(), 1, 32, "float32", True, spec_plan(with_draft(d)))
        weights, largest_fp8 = safetensors_device_bytes(d, 4)
        assert plan.draft_weights == weights, d
        if d == fp8:    # an FP8 weight is dequantized at each use, one at a time
            assert largest_fp8 and plan.conversion >= 4 * largest_fp8


def test_every_planner_call_keeps_fewer_layers_for_the_draft(pair):
    """GPU_RESIDENT_LAYERS=-1 under --gpu-mem: the GPU process and the supervisor's estimate keep
    the layers that fit beside the draft (its safetensors bytes) and the wider logits."""
    from ringllm.supervisor.startup import resident_estimate

    target, draft = pair
    layout = load_layout(target)
    prompts, new, k = ((5, 6, 7),), 4, 3
    slots = 3 + new + k
    base = plan_gpu_memory(layout, build_config(), 1, slots, "float32", embed_on_host=True)
    vocab = layout.config.vocab_size
    draft_bytes = safetensors_device_bytes(draft, 4)[0] + kv_bytes(draft, slots, 4) + 8 * k * vocab
    layer = base.layer_bytes
    budget = base.total + 3 * layer + layer // 2           # 3 layers without the draft
    with_d = base.total + draft_bytes
    expected = (budget - with_d) // layer
    assert 0 < expected < 3, "the draft should cost at least one layer here"
    engine = build_config(gpu_mem=budget)
    for sampling, keep in ((SpeculativeSampling(draft=DraftParams("ngram", spec_tokens=k)), None),
                           (with_draft(draft, k), expected)):
        args = GpuArgs(0, "", "", "", "", layout, (), engine, "cuda", "float32", prompts, new, sampling, ())
        got = resident_layer_count(args, "cuda", free_bytes=10 * budget)
        estimate = resident_estimate(layout, engine, 1, slots, "float32", "cuda", spec_plan(sampling))
        if keep is None:    # prompt lookup: only the logits, less than a layer here
            keep = (budget - base.total - 8 * k * vocab) // layer
            assert keep == 3
        assert got == estimate == keep


def test_gpu_mem_that_fits_without_the_draft_is_refused_with_it(pair):
    target, draft = pair
    layout = load_layout(target)
    common = ["generate", "--model", str(target), "--device", "cpu", "--no-chat", "--prompt", "w5 w6",
              "--max-new-tokens", "4", "--dtype", "float32", "--spec-tokens", "3"]
    slots = prompt_tokens(target, "w5 w6") + 4 + 3
    ngram_total = plan_gpu_memory(layout, build_config(), 1, slots, "float32", False, SpecPlan(3)).total
    weights = safetensors_device_bytes(draft, 4)[0]
    cap = ngram_total + weights // 2
    r = ringllm(*common, "--draft", "ngram", "--gpu-mem", str(cap))
    assert r.returncode == 0, r.stderr                   # fits without the draft model
    r = ringllm(*common, "--draft-model", str(draft), "--gpu-mem", str(cap))
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    line = errors(r)[0]
    assert line.startswith(f"ringllm: error: --gpu-mem {fmt_bytes(cap)} cannot hold the draft model {draft}: "), line
    assert f"({weights} bytes of weights" in line and f"+ {kv_bytes(draft, slots, 4)} bytes of KV cache" in line


def prompt_tokens(model_dir: Path, text: str) -> int:
    from ringllm.checkpoint.text import TextCodec
    return len(TextCodec(model_dir, load_layout(model_dir).config).encode(text, chat=False))


def test_auto_preset_explains_the_draft_bytes(pair):
    target, draft = pair
    r = ringllm("generate", "--model", str(target), "--device", "cpu", "--no-chat", "--prompt", "w5 w6",
                "--max-new-tokens", "3", "--dtype", "float32", "--preset", "auto", "--draft-model", str(draft),
                "--spec-tokens", "2")
    assert r.returncode == 0, r.stderr
    slots = prompt_tokens(target, "w5 w6") + 3 + 2
    expected = safetensors_device_bytes(draft, 4)[0] + kv_bytes(draft, slots, 4)
    assert f"draft model {draft}: {fmt_bytes(expected)} ({expected} bytes) on the cpu" in r.stderr, r.stderr
