"""Make a Hugging Face Llama checkpoint with random weights at real sizes, for benchmarks.

    ringllm make-checkpoint --shape llama-3.1-70b --layers 10 --out /data/llama70b-10L

Sharded like the published checkpoints (about 5 GB shards `model-0000i-of-0000n.safetensors`,
`model.safetensors.index.json`), with config.json, generation_config.json and a tokenizer
(a word-level tokenizer.json over the full vocabulary, loadable by transformers and AirLLM).
Weights are drawn on the GPU when there is one (else vectorized on the CPU) and written tensor
by tensor, so memory stays at one tensor.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import torch

from ringllm.checkpoint.dtypes import TAG_OF_NAME
from ringllm.checkpoint.errors import RingllmError

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

SHAPES = {
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                          max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=500000.0, max_position_embeddings=4096,
                 rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 256}),
}


def tensor_specs(shape: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order the published checkpoints store them."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.o_proj.weight", (h, q)), (p + "self_attn.q_proj.weight", (q, h)),
                  (p + "self_attn.v_proj.weight", (kv, h))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _shards(specs, itemsize: int, shard_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for name, shp in specs:
        n = math.prod(shp) * itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += n
    shards.append(current)
    return shards


def _random(shp, dtype, device, gen) -> torch.Tensor:
    if len(shp) == 1:   # norms around 1, so activations keep a sane scale through the layers
        return (1.0 + 0.1 * torch.randn(shp, device=device, generator=gen)).to(dtype)
    std = 1.0 / math.sqrt(shp[1])
    return (torch.randn(shp, device=device, generator=gen, dtype=torch.float32) * std).to(dtype)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "unk_token": "<unk>", "model_max_length": 131072,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }, indent=1))


def make_checkpoint(out: Path, shape_name: str, layers: int | None = None, dtype_name: str = "bfloat16",
                    shard_bytes: int = 5 * 10**9, seed: int = 0, device: str | None = None,
                    progress: bool = True, sparse: bool = False) -> Path:
    """sparse=True writes the headers and leaves the data as holes (zeros): real sizes, no disk
    space, no time; for tests that plan with real shapes. `out` must be new or empty (as convert's
    DST): it is written in out.partial-<pid> and renamed when done; a failure removes that."""
    from ringllm.convert import check_new_checkpoint_dir, writing_checkpoint

    if shape_name not in SHAPES:
        raise RingllmError(f"--shape {shape_name!r}: one of {', '.join(SHAPES)}")
    shape = dict(SHAPES[shape_name])
    layers = shape["num_hidden_layers"] if layers is None else layers
    if layers < 1:
        raise RingllmError(f"--layers {layers}: must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dst = Path(out)
    check_new_checkpoint_dir(None, dst, "ringllm make-checkpoint")
    with writing_checkpoint(dst) as out:
        _write_checkpoint(out, shape_name, shape, layers, dtype_name, shard_bytes, seed, device, progress, sparse)
    return dst


def _write_checkpoint(out: Path, shape_name: str, shape: dict, layers: int, dtype_name: str, shard_bytes: int,
                      seed: int, device: str, progress: bool, sparse: bool) -> None:
    dtype, tag = getattr(torch, dtype_name), TAG_OF_NAME[dtype_name]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    specs = tensor_specs(shape, layers)
    shards = _shards(specs, itemsize, shard_bytes)
    total = sum(math.prod(s) * itemsize for _, s in specs)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    bar = _progress(total, f"writing {shape_name} x {layers} layers", progress)
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shp in shard:
            n = math.prod(shp) * itemsize
            header[name] = {"dtype": tag, "shape": list(shp), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            if sparse:
                f.truncate(8 + len(raw) + offset)
                continue
            for name, shp in shard:
                t = _random(shp, dtype, device, gen).cpu()
                f.write(memoryview(t.view(torch.uint8).numpy()))
                bar(t.numel() * itemsize)
    bar(None)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape,
              "num_hidden_layers": layers, "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": dtype_name, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_tokenizer(out, shape["vocab_size"])


def _progress(total: int, label: str, enabled: bool):
    """A rich progress bar on stderr when it is a terminal; plain silence otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return lambda n: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
    prog = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), transient=True)
    task = prog.add_task(label, total=total)
    prog.start()

    def advance(n):
        if n is None:
            prog.stop()
        else:
            prog.advance(task, n)
    return advance
