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


def test_auto_preset_on_a_gpu_keeps_fewer_layers_for_the_draft_and_says_why(pair):
    """At the smallest budget where --preset auto keeps all 4 layers without a draft, the draft
    (its safetensors bytes, KV cache, the wider logits) costs ceil(draft / layer) of them."""
    from ringllm.autotune import Machine, auto_tune

    target, draft = pair
    layout, slots, k = load_layout(target), 24, 3
    spec = spec_plan(with_draft(draft, k))
    layer = plan_gpu_memory(layout, build_config(), 1, slots, "float32", True).layer_bytes

    def kept(budget, spec=None):
        choice = auto_tune(layout, Machine(budget, 2**30, 1), 1, slots, "float32", True, spec)
        return choice.values["gpu_resident_layers"], choice

    low, high = 0, 2**30          # the smallest budget that keeps every layer, without a draft
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if kept(mid)[0] == 4 else (mid, high)
    draft_bytes = safetensors_device_bytes(draft, 4)[0] + kv_bytes(draft, slots, 4)
    extra = draft_bytes + 8 * k * layout.config.vocab_size
    n, choice = kept(high, spec)
    assert 0 < n == 4 - -(-extra // layer) < 4
    assert f"the draft model {draft} ({fmt_bytes(draft_bytes)}" in choice.reasons["gpu_resident_layers"]
    assert any(line.startswith(f"draft model {draft}: {fmt_bytes(draft_bytes)} ({draft_bytes} bytes)")
               for line in choice.extra)


# --- 3. --spec-tokens auto -----------------------------------------------------------------------

def linear_params(model_dir: Path, first_layer: int) -> int:
    """Elements of the decoder layers' Linear weights from `first_layer` on, from the safetensors files."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if (name.startswith("model.layers.") and int(name.split(".")[2]) >= first_layer
                        and name.endswith("_proj.weight")):
                    total += math.prod(f.get_slice(name).get_shape())
    return total


def test_pass_cost_counts_the_streamed_bytes_and_flops_of_the_checkpoint(pair):
    from tests.conftest import layer_tensor_bytes

    target, draft = pair
    layout, cfg = load_layout(target), load_layout(target).config
    context, resident = 40, 1
    cost = pass_cost(layout, resident, "cuda", "bfloat16", context, h2d_gbps=10.0, draft=load_layout(draft))
    streamed = layer_tensor_bytes(target, first_layer=resident)
    assert cost.streamed_bytes == streamed and cost.copy_s == pytest.approx(streamed / 10e9)
    attention = 4 * cfg.num_heads * cfg.head_dim * context          # scores + weighted sum, per layer
    assert cost.streamed_flops == 2 * linear_params(target, resident) + 3 * attention
    head = 2 * cfg.hidden_size * cfg.vocab_size
    assert cost.resident_flops == 2 * (linear_params(target, 0) - linear_params(target, resident)) + attention + head


def test_auto_rule_big_tree_when_a_pass_costs_the_same_for_1_and_256_tokens(pair):
    target, draft = pair
    layout, d_layout = load_layout(target), load_layout(draft)
    room = dict(max_new_tokens=1000, context_room=1000, text_tokens=2000)
    # a streamed pass of seconds (a slow link), the tiny layers' compute is nothing beside it
    slow = pass_cost(layout, 0, "cuda", "bfloat16", 64, h2d_gbps=1e-4, draft=d_layout)
    assert slow.copy_s > 1 and slow.seconds(256) == pytest.approx(slow.seconds(1), rel=1e-3)    # the premise
    assert choose_spec_tokens(slow, True, spec_cap(True, **room))[0] == DRAFT_MODEL_CAP == 256
    ngram = pass_cost(layout, 0, "cuda", "bfloat16", 64, h2d_gbps=1e-4)
    assert choose_spec_tokens(ngram, False, spec_cap(False, **room))[0] == NGRAM_CAP
    # cpu: a pass is compute, W tokens cost W times one: the smallest tree
    cpu = pass_cost(layout, 0, "cpu", "float32", 64, cpu_cores=2, draft=d_layout)
    assert cpu.seconds(2) == pytest.approx(2 * cpu.seconds(1))
    for draft_model in (True, False):
        k, why = choose_spec_tokens(cpu, draft_model, spec_cap(draft_model, **room))
        assert k == MIN_SPEC_TOKENS == 4 and "on cpu" in why


def test_auto_rule_widest_pass_within_its_slack_and_the_caps():
    """copy 1 s, 10 ms of compute a token, nothing resident: W tokens cost max(1, 0.01 W) s, so
    the widest power of two within 1.25 s is 64 (125 would be the limit): K = 63."""
    cost = PassCost("cuda", copy_s=1.0, streamed_flops=1e10, resident_read_s=0.0, resident_flops=0.0,
                    flops_rate=1e12, h2d_gbps=25.0, streamed_bytes=25 * 10**9)
    assert choose_spec_tokens(cost, False, (1000, "test"))[0] == 63
    # the caps: new tokens, context, what prompt lookup can copy
    assert spec_cap(True, max_new_tokens=10, context_room=1000, text_tokens=20)[0] == 9
    assert spec_cap(True, max_new_tokens=1000, context_room=17, text_tokens=20)[0] == 17
    assert spec_cap(False, max_new_tokens=1000, context_room=1000, text_tokens=20)[0] == 19
    assert spec_cap(True, max_new_tokens=1, context_room=0, text_tokens=2)[0] == 1
    assert choose_spec_tokens(cost, False, (9, "test"))[0] == 9


def pass_widths(metrics: Path) -> list[int]:
    return [row["tokens"] for row in json.loads(metrics.read_text())["speculation"]["verify_by_width"]]


def test_cli_spec_tokens_auto_is_the_default_and_a_number_wins(pair, tmp_path):
    """On cpu auto chooses 4 and says why; the passes verify at most 1 + 4 tokens (prompt lookup
    has 6 to offer on this prompt); --spec-tokens 6 verifies 7."""
    target, _ = pair
    common = ("generate", "--model", str(target), "--device", "cpu", "--no-chat", "--prompt", PROMPT,
              "--max-new-tokens", "12", "--draft", "ngram")
    metrics = tmp_path / "m.json"
    for engine in ((), ("--resident",)):
        r = ringllm(*common, "--metrics-json", str(metrics), *engine)
        assert r.returncode == 0, r.stderr
        assert re.search(r"--spec-tokens auto: 4 \(on cpu a pass is compute.*at least 4, at most 11 "
                         r"\(--max-new-tokens - 1", r.stderr), r.stderr
        assert max(pass_widths(metrics)) == 5, pass_widths(metrics)
        r = ringllm(*common, "--metrics-json", str(metrics), "--spec-tokens", "6", *engine)
        assert r.returncode == 0, r.stderr
        assert "--spec-tokens auto" not in r.stderr and max(pass_widths(metrics)) == 7, pass_widths(metrics)
    r = ringllm(*common, "--spec-tokens", "many")
    assert r.returncode == 2 and "--spec-tokens: expected 'auto' or a whole number, got 'many'" in r.stderr


# --- 4. the end-of-run summary -------------------------------------------------------------------

def test_summary_line_shows_passes_tokens_per_pass_times_per_pass_and_acceptance(pair, tmp_path):
    target, draft = pair
    common = ("generate", "--model", str(target), "--device", "cpu", "--no-chat", "--prompt", PROMPT,
              "--max-new-tokens", "12", "--spec-tokens", "4")
    metrics = tmp_path / "m.json"
    for flags in (("--draft", "ngram"), ("--draft-model", str(draft)), ("--draft", "ngram", "--resident")):
        r = ringllm(*common, *flags, "--metrics-json", str(metrics))
        assert r.returncode == 0, r.stderr
        spec = json.loads(metrics.read_text())["speculation"]
        rows = spec["verify_by_width"]
        passes_by_width = sum(row["passes"] for row in rows)
        m = re.search(r"(\d+) tokens in (\d+) decode passes \(([\d.]+) tokens per pass\), (\d+)/(\d+) drafts "
                      r"accepted \((\d+)%\); per pass: draft ([\d.]+) ms, verify ([\d.]+) ms", r.stderr)
        assert m, r.stderr
        tokens, passes, per_pass, accepted, drafted, pct, draft_ms, verify_ms = m.groups()
        # against the run's own records: the passes of each width, and the counts
        assert int(passes) == passes_by_width == spec["passes"] and int(tokens) == spec["tokens"] == 11
        assert float(per_pass) == pytest.approx(11 / passes_by_width, abs=0.005)
        assert (int(accepted), int(drafted)) == (spec["accepted"], spec["drafted"])
        assert int(pct) == round(100 * spec["accepted"] / spec["drafted"])
        assert float(verify_ms) == pytest.approx(1e3 * sum(row["seconds"] for row in rows) / passes_by_width,
                                                 abs=0.05)
        assert float(draft_ms) == pytest.approx(1e3 * spec["draft_seconds"] / passes_by_width, abs=0.05)
