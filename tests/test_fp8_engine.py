"""FP8 checkpoints through ringllm's engine, against transformers + compressed-tensors reading the
same directory (decompressed to float32: `CompressedTensorsConfig(dequantize=True)`), and the
streaming engine against the resident one on them. The FP8 directories come from `ringllm
convert`, and (for the other published variants: per-tensor scales with static input scales,
fbgemm_fp8) from a rewrite done here with the safetensors library."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from ringllm.cli import main
from tests.conftest import make_model_dir
from tests.test_model_vs_transformers import full_logits, rel_err, ringllm_model

E4M3_MAX = 448.0


def convert(src, dst, *extra):
    assert main(["convert", "--to", "fp8", str(src), str(dst), *extra]) == 0
    return dst


def transformers_fp8(model_dir):
    """The reference: transformers with compressed-tensors, weights decompressed to float32."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(bf16 source dir, its `ringllm convert` FP8 dir): sharded so that layers straddle shards."""
    root = tmp_path_factory.mktemp("fp8")
    src = make_model_dir(root / "bf16", dtype=torch.bfloat16, max_shard_size="40KB", num_hidden_layers=4)
    return src, convert(src, root / "fp8")


TOKENS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))


def test_converted_fp8_logits_match_transformers_compressed_tensors(fp8_pair):
    src, fp8 = fp8_pair
    layout = load_layout(fp8)
    assert layout.quantized and layout.dtype == "BF16"   # --dtype auto computes in the config's bf16
    with torch.no_grad():
        ref = transformers_fp8(fp8)(TOKENS).logits
    got = full_logits(ringllm_model(fp8, torch.float32), TOKENS)
    assert rel_err(got, ref) < 1e-5
    # and FP8 is not bf16: the reference did quantize (a scale ignored would not be within 10%)
    dense = full_logits(ringllm_model(src, torch.float32), TOKENS)
    assert 1e-4 < rel_err(ref, dense) < 0.1


@pytest.mark.parametrize("extra", [{"tie_word_embeddings": True}, {"quantize_lm_head": True}], ids=["tied", "fp8_lm_head"])
def test_tied_and_quantized_lm_head(tmp_path, extra):
    quantize_lm_head = extra.pop("quantize_lm_head", False)
    src = make_model_dir(tmp_path / "src", dtype=torch.bfloat16, num_hidden_layers=2, **extra)
    fp8 = convert(src, tmp_path / "fp8", *(["--quantize-lm-head"] if quantize_lm_head else []))
    assert (load_layout(fp8).lm_head_scale is not None) == quantize_lm_head
    with torch.no_grad():
        ref = transformers_fp8(fp8)(TOKENS).logits
    assert rel_err(full_logits(ringllm_model(fp8, torch.float32), TOKENS), ref) < 1e-5


def relayout(fp8_dir, out, variant: str):
    """Rewrite a per-channel FP8 checkpoint as another published variant, with safetensors:
    "per_tensor_static": one scale per tensor (shape [1]) and static input scales (the
    compressed-tensors FP8 preset); "fbgemm": the same tensors under quant_method fbgemm_fp8."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(fp8_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        if variant == "per_tensor_static":
            for name in [n for n in tensors if n.endswith(".weight_scale")]:
                base = name[:-len("_scale")]
                w = tensors[base].float() * tensors[name].float()
                scale = w.abs().max().reshape(1) / E4M3_MAX
                tensors[base] = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
                tensors[name] = scale
                tensors[base[:-len(".weight")] + ".input_scale"] = torch.tensor([0.02])
        save_file(tensors, shard, metadata={"format": "pt"})
    if variant == "per_tensor_static":
        group = cfg["quantization_config"]["config_groups"]["group_0"]
        group["weights"]["strategy"] = "tensor"
        group["input_activations"] = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                      "dynamic": False}
    else:
        cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                      "modules_to_not_convert": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    index = out / "model.safetensors.index.json"
    if index.exists() and variant == "per_tensor_static":
        idx = json.loads(index.read_text())
        for name, file in list(idx["weight_map"].items()):
            if name.endswith(".weight_scale"):
                idx["weight_map"][name[:-len(".weight_scale")] + ".input_scale"] = file
        index.write_text(json.dumps(idx))
    return out


def test_per_tensor_scales_with_static_input_scales_run_weight_only(fp8_pair, tmp_path, caplog):
    d = relayout(fp8_pair[1], tmp_path / "pt", "per_tensor_static")
    with caplog.at_level("INFO", logger="ringllm"):
        ours = ringllm_model(d, torch.float32)
    notes = [r.getMessage() for r in caplog.records if "weight-only" in r.getMessage()]
    assert len(notes) == 1 and "static FP8 activation scales" in notes[0], caplog.text
    assert ours.weights.attn(0).q.scale.shape == (1, 1)
    with torch.no_grad():
        ref = transformers_fp8(d)(TOKENS).logits
    assert rel_err(full_logits(ours, TOKENS), ref) < 1e-5


def test_fbgemm_fp8_reads_as_the_same_weights(fp8_pair, tmp_path):
    """transformers reads fbgemm_fp8 only with fbgemm-gpu (CUDA): the reference is its reading of
    the same tensors under the compressed-tensors config."""
    d = relayout(fp8_pair[1], tmp_path / "fb", "fbgemm")
    assert load_layout(d).quantization.method == "fbgemm_fp8"
    with torch.no_grad():
        ref = transformers_fp8(fp8_pair[1])(TOKENS).logits
    assert rel_err(full_logits(ringllm_model(d, torch.float32), TOKENS), ref) < 1e-5


def test_resident_fp8_layers_stay_fp8_and_the_plan_counts_their_bytes(fp8_pair):
    """GPU-resident layers keep the FP8 bytes (dequantized at use), and the memory plan counts a
    layer as its bytes in the files (read here with safetensors), not as bf16."""
    import math

    from safetensors import safe_open

    from ringllm.config import EngineConfig
    from ringllm.workers.memory_plan import plan_gpu_memory
    from ringllm.workers.resident import load_groups

    src, fp8 = fp8_pair
    layout = load_layout(fp8)
    layer0 = load_groups(layout, [0], torch.bfloat16, torch.device("cpu"))[0]
    assert layer0["ffn"].down.data.dtype == torch.float8_e4m3fn
    size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    on_disk = {}
    for d in (src, fp8):
        on_disk[d] = 0
        for shard in d.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                for k in f.keys():
                    if k.startswith("model.layers.0."):
                        sl = f.get_slice(k)
                        on_disk[d] += math.prod(sl.get_shape()) * size[sl.get_dtype()]
    engine = EngineConfig()
    plan = plan_gpu_memory(layout, engine, 1, 64, "bfloat16", embed_on_host=True)
    plan16 = plan_gpu_memory(load_layout(src), engine, 1, 64, "bfloat16", embed_on_host=True)
    assert plan.layer_bytes == on_disk[fp8] and plan16.layer_bytes == on_disk[src]
    assert plan.layer_bytes < 0.6 * plan16.layer_bytes
    # dequantizing costs one weight of workspace, in the compute dtype
    assert plan.conversion == max(math.prod(e.extent.shape) for g in layout.groups[0] for e in g.entries) * 2


def ringllm_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_streaming_matches_resident_on_fp8(fp8_pair):
    """The streaming engine (supervisor, loaders, coordinator, compute process; FP8 bytes and
    scales through the ring) gives the tokens of the in-process engine on the same FP8 dir."""
    fp8 = fp8_pair[1]
    common = ["generate", "--model", str(fp8), "--device", "cpu", "--prompt", "w9 w10 w11", "--max-new-tokens", "10"]
    streamed = ringllm_cli(*common, "--loaders", "2", "--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=1")
    resident = ringllm_cli(*common, "--resident")
    assert streamed.returncode == 0, streamed.stderr
    assert resident.returncode == 0, resident.stderr
    assert streamed.stdout == resident.stdout and streamed.stdout.strip()
    assert "[WSM] CPU ring window: advancing to layer" in streamed.stderr


def test_the_plan_counts_an_fp8_lm_heads_dequantized_copy(tmp_path):
    """An FP8 lm_head is dequantized whole at every step: the workspace is its [vocab, hidden] in
    the compute dtype, when that is larger than any layer weight (a review found it uncounted)."""
    from ringllm.config import EngineConfig
    from ringllm.workers.memory_plan import plan_gpu_memory

    src = make_model_dir(tmp_path / "src", dtype=torch.bfloat16, vocab_size=4096, num_hidden_layers=1)
    fp8 = convert(src, tmp_path / "fp8", "--quantize-lm-head")
    layout = load_layout(fp8)
    cfg = layout.config
    plan = plan_gpu_memory(layout, EngineConfig(), 1, 64, "bfloat16", embed_on_host=True)
    assert plan.conversion == cfg.vocab_size * cfg.hidden_size * 2


def test_a_presets_layer_counts_double_for_fp8_weights(fp8_pair, tmp_path):
    """The guide's presets count 16-bit layers: on the FP8 dir, --preset conservative runs with
    twice its look-ahead and group buffers (the same bytes); on the bf16 dir, as the guide says.
    A count you set is yours either way. The tokens stay the bf16-placement engine's."""
    engines = {}
    for name, model in (("bf16", fp8_pair[0]), ("fp8", fp8_pair[1])):
        out = tmp_path / f"{name}.json"
        r = ringllm_cli("generate", "--model", str(model), "--device", "cpu", "--prompt", "w9 w10", "--max-new-tokens",
                        "2", "--loaders", "2", "--preset", "conservative", "--set", "CPU_RING_OFFSET=1",
                        "--metrics-json", str(out))
        assert r.returncode == 0, r.stderr
        engines[name] = json.loads(out.read_text())["engine"]
        assert ("doubled for FP8 weights" in r.stderr) == (name == "fp8")
    b, f = engines["bf16"], engines["fp8"]
    assert (b["gpu_ahead_layers"], b["gpu_max_groups"]) == (2, 7)
    assert (f["gpu_ahead_layers"], f["gpu_max_groups"]) == (4, 14) and f["max_cached_layers"] >= 7
    assert b["cpu_ring_offset"] == f["cpu_ring_offset"] == 1
