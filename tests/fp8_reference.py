"""An independent writer of the compressed-tensors "float-quantized" FP8 layout, the one of the
published FP8-Dynamic Llama checkpoints (RedHatAI/neuralmagic ...-FP8-dynamic, made by
llm-compressor). The tests use it as a second source of FP8 checkpoints next to `ringllm convert
--to fp8`; it shares no code with ringllm on purpose (plain torch + safetensors + json).

The layout, per quantized Linear `<name>`:
    <name>.weight        float8_e4m3fn [out, in]   round-to-nearest of weight / scale, clamped to +-448
    <name>.weight_scale  source dtype  [out, 1]    per output channel (strategy "channel"), or
                                       [1]         one per tensor (strategy "tensor")
    dequantized weight = weight.float() * weight_scale
Quantized: every Linear inside the decoder layers (q, k, v, o, gate, up, down). Kept as they are:
embeddings, norms and lm_head (config `ignore: ["lm_head"]`; embeddings and norms are not Linear).
The scale is stored in the source's dtype, as llm-compressor stores it, and the weight is divided
by the stored (rounded) scale, so that weight * scale reconstructs what the file says.

    python -m tests.fp8_reference SRC DST [--per-tensor]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max          # 448.0
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
WEIGHT_FILES = ("config.json", "model.safetensors.index.json")


def quantization_config(strategy: str, compression_ratio: float) -> dict:
    """config.json's quantization_config, field for field as the published FP8-Dynamic Llama
    checkpoints have it (weights FP8 static per channel, activations FP8 dynamic per token);
    `strategy` "tensor" is the per-tensor-scale variant of the same scheme."""
    return {
        "config_groups": {
            "group_0": {
                "input_activations": {
                    "block_structure": None, "dynamic": True, "group_size": None, "num_bits": 8,
                    "observer": "memoryless", "observer_kwargs": {}, "strategy": "token",
                    "symmetric": True, "type": "float",
                },
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": strategy,
                    "symmetric": True, "type": "float",
                },
            }
        },
        "format": "float-quantized",
        "global_compression_ratio": compression_ratio,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def quantize_weight(weight: torch.Tensor, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale in the weight's dtype): absmax over each output row (or the whole
    tensor) maps to the e4m3 maximum."""
    w = weight.float()
    absmax = w.abs().amax().reshape(1) if per_tensor else w.abs().amax(dim=1, keepdim=True)
    # an all-zero row would give scale 0 and 0/0 below; any scale reproduces zeros
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax)).to(weight.dtype)
    q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scale.contiguous()


def write_fp8_checkpoint(src: Path | str, dst: Path | str, per_tensor: bool = False) -> Path:
    """Write the FP8 checkpoint of the 16/32-bit HF Llama checkpoint `src` into `dst`, shard for
    shard with the same file names (one source shard in memory at a time)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{src}: no *.safetensors files")
    weight_map, bytes_in, bytes_out = {}, 0, 0
    for shard in shards:
        out = {}
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                bytes_in += t.numel() * t.element_size()
                if QUANTIZED.match(name):
                    q, scale = quantize_weight(t, per_tensor)
                    out[name], out[name + "_scale"] = q, scale
                else:
                    out[name] = t
        for name, t in out.items():
            weight_map[name] = shard.name
            bytes_out += t.numel() * t.element_size()
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})

    if (src / "model.safetensors.index.json").exists():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = bytes_out
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config("tensor" if per_tensor else "channel",
                                                        bytes_in / bytes_out)
    (dst / "config.json").write_text(json.dumps(config, indent=2))

    # tokenizer, chat template, generation config: everything that is not weights or config
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in WEIGHT_FILES:
            shutil.copy2(p, dst / p.name)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--per-tensor", action="store_true", help="one scale per tensor, not per output channel")
    args = parser.parse_args(argv)
    write_fp8_checkpoint(args.src, args.dst, args.per_tensor)


if __name__ == "__main__":
    main()
