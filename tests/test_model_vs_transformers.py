"""The plain-torch Llama against transformers' LlamaForCausalLM (CPU, same weights): float32 to
1e-5, and bit-exact when both compute in the checkpoint's bf16/fp16."""
from __future__ import annotations

import json

import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from tests.conftest import LLAMA3_ROPE, hf_greedy_cached, make_hf_checkpoint
from ringllm.workers.generation import Sampler, SamplingParams, generate
from ringllm.workers.model import ALL, KVCache, Llama, Segment
from ringllm.workers.resident import ResidentSource, load_resident_weights

CPU = torch.device("cpu")


def ringllm_model(model_dir, dtype=torch.float32):
    layout = load_layout(model_dir)
    return Llama(layout.config, load_resident_weights(layout, dtype, CPU),
                 ResidentSource(layout, dtype, CPU), dtype, CPU)


def full_logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """Every position's logits [B, T, V], each sequence in its own KV row, all in one pass."""
    B, T = tokens.shape
    cache = KVCache(model.cfg, B, T, model.dtype, model.device)
    segments = [Segment(b, tokens[b].tolist(), 0, logits=ALL) for b in range(B)]
    return model.forward(cache, segments).view(B, T, -1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


CONFIGS = {
    "gqa_untied": {},
    "tied": {"tie_word_embeddings": True},
    "mha_odd_layers": {"num_key_value_heads": 4, "num_hidden_layers": 5},
    "llama3_rope": {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "num_hidden_layers": 1},
    "mqa_wide_head": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 48,
                      "num_hidden_layers": 7},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf = make_hf_checkpoint(tmp_path / name, seed=len(name), **CONFIGS[name])
    ours = ringllm_model(tmp_path / name)
    tokens = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    got = full_logits(ours, tokens)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5, name


def test_llama3_rope_scaling_matters(tmp_path):
    """A sanity check on the test above: without the scaling the logits at long range differ."""
    d = tmp_path / "r"
    hf = make_hf_checkpoint(d, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    cfg = json.loads((d / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) and cfg[key].get("rope_type") == "llama3":
            cfg[key] = {"rope_type": "default", "rope_theta": 500000.0} if key == "rope_parameters" else None
    (d / "config.json").write_text(json.dumps(cfg))
    tokens = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert rel_err(full_logits(ringllm_model(d), tokens), ref) > 1e-3


def test_layer_straddling_shards(tmp_path):
    d = tmp_path / "sharded"
    hf = make_hf_checkpoint(d, max_shard_size="40KB", num_hidden_layers=4)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    files_per_layer = [{f for n, f in index.items() if n.startswith(f"model.layers.{i}.")} for i in range(4)]
    assert any(len(files) > 1 for files in files_per_layer), "no layer straddles two shards"
    tokens = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert rel_err(full_logits(ringllm_model(d), tokens), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, dtype):
    """bf16/fp16 files: computing in float32 from them matches transformers upcast to float32."""
    d = tmp_path / str(dtype)
    hf = make_hf_checkpoint(d, dtype=dtype)   # returned upcast: the same rounded weights in fp32
    assert load_layout(d).dtype == {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert rel_err(full_logits(ringllm_model(d, torch.float32), tokens), ref) < 1e-5
    native = full_logits(ringllm_model(d, dtype), tokens)   # computing in the file's dtype: close
    assert rel_err(native, ref) < 5e-2


HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(64,), (5, 64), (2, 9, 64), (3, 4, 576)])
@pytest.mark.parametrize("weight_dtype", ["same", "float32"])
def test_rms_norm_bit_exact_with_transformers(dtype, shape, weight_dtype):
    """In half precision the order of the casts decides the last bit: normalize in float32, cast
    to the activation dtype, then multiply by the weight in that dtype (LlamaRMSNorm's order). A
    float32 weight (a float32 checkpoint computed in bf16) is rounded to the compute dtype first,
    as transformers does when it loads that checkpoint with dtype=bf16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from ringllm.workers.model import rms_norm

    hidden, eps = shape[-1], 1e-5
    gen = torch.Generator().manual_seed(hidden + len(shape))
    weight = torch.empty(hidden).uniform_(0.3, 3.0, generator=gen)
    weight = weight if weight_dtype == "float32" else weight.to(dtype)
    # activations of mixed scale, as after a few residual adds
    x = (torch.randn(shape, generator=gen) * torch.empty(shape).uniform_(0.1, 20, generator=gen)).to(dtype)
    ref_norm = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        ref_norm.weight.copy_(weight.to(dtype))
        ref = ref_norm(x)
    got = rms_norm(x, weight, eps)
    assert got.dtype == ref.dtype == dtype
    differ = (got != ref).sum().item()
    assert differ == 0, f"{differ} of {ref.numel()} elements differ, max {(got.float() - ref.float()).abs().max()}"


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["gqa_untied", "tied", "llama3_rope"])
def test_half_precision_logits_bit_exact_with_transformers(tmp_path, dtype, name):
    """Computing in the checkpoint's bf16/fp16: the whole model (prefill logits of every
    position) is bit-identical to transformers loaded with that dtype on CPU. Both run the same
    torch kernels on the same rounded values, so any difference is an operation done in another
    order or precision (a norm, a cast, rotary in the wrong dtype). from_pretrained, not
    model.to(dtype): the latter would also round transformers' float32 rotary frequencies."""
    from transformers import LlamaForCausalLM

    d = tmp_path / name
    make_hf_checkpoint(d, seed=len(name), dtype=dtype, **CONFIGS[name])
    hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype).eval()
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    got = full_logits(ringllm_model(d, dtype), tokens)
    differ = (got != ref).sum().item()
    assert differ == 0, f"{differ} of {ref.numel()} logits differ, max {(got - ref).abs().max()}"


def test_batch_decode_matches_single_prompts(tmp_path):
    """Prompts of different lengths in one engine (one KV row each) == each alone through transformers."""
    d = tmp_path / "b"
    hf = make_hf_checkpoint(d, num_hidden_layers=2)
    ours = ringllm_model(d)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (9, 3, 6)]
    new = generate(ours, prompts, 12, Sampler(SamplingParams(), CPU), eos_ids=[])
    for prompt, got in zip(prompts, new):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        assert got == seq[len(prompt):]


def test_smollm2_greedy_32_tokens_match_transformers(demo_model_dir):
    from transformers import AutoModelForCausalLM

    from ringllm.checkpoint.text import TextCodec

    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    ours = ringllm_model(demo_model_dir, torch.float32)
    codec = TextCodec(demo_model_dir, ours.cfg)
    prompt = codec.encode("Write a short poem about the sea.", chat=True)
    got = generate(ours, [prompt], 32, Sampler(SamplingParams(), CPU), eos_ids=[])[0]
    assert got == hf_greedy_cached(hf, prompt, 32)
    assert "Paris" in codec.decode(generate(ours, [codec.encode("What is the capital of France?", True)], 16,
                                            Sampler(SamplingParams(), CPU), codec.eos_ids)[0])
