"""A layer-truncated draft of a Llama checkpoint (a self-speculative, LayerSkip-style draft model).

    python -m ringllm.tools.make_draft SRC DST --layers N

DST gets SRC's first N decoder layers, its final norm, embeddings and lm_head (when not tied),
the same tokenizer files and config.json with num_hidden_layers = N: the model that exits after
layer N through the target's own norm and head. It shares the target's vocabulary, so
`ringllm generate --draft-model DST` takes it for SRC. Without training for early exit it is a
weak draft (weaker than the FP8 copy of `ringllm convert --to fp8`), more like a real small one.

Every kept tensor is copied byte for byte (any dtype; an FP8 source's scales travel with their
weights), in blocks of COPY_BLOCK bytes: memory stays at one block whatever the model's size, so a
141 GB model truncates on a 64 GB machine. Shards keep their file names and which tensor lives
where; a shard left with no tensor is dropped, and the index (if SRC has one) names what remains.
DST is built in DST.partial-<pid> next to it and renamed only once it loads (load_layout); on any
failure the partial directory is removed. An existing non-empty DST is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError
# convert's rules for a written checkpoint: DST new or empty, built in DST.partial-<pid>, the side files
from ringllm.convert import check_new_checkpoint_dir, copy_side_files, writing_checkpoint

COPY_BLOCK = 64 << 20
# per-layer lists some configs carry (length num_hidden_layers): cut with the layers
PER_LAYER_CONFIG_LISTS = ("layer_types",)


def kept(name: str, layers: int) -> bool:
    """Whether tensor `name` belongs in the draft: a decoder layer below `layers`, or not a layer's."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return True
    return parts[2].isdigit() and int(parts[2]) < layers


def _shard_header(extents) -> tuple[bytes, list]:
    """The safetensors header of a shard holding `extents` (in file order, no gaps) and that order."""
    ordered = sorted(extents, key=lambda e: e.offset)
    header, offset = {"__metadata__": {"format": "pt", "written_by": "ringllm make_draft"}}, 0
    for e in ordered:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)       # keeps every tensor's data 8-byte aligned (as the source's)
    return struct.pack("<Q", len(raw)) + raw, ordered


def _copy_shard(extents, out_path: Path) -> int:
    """Write one output shard: the header, then each tensor's bytes block by block. Returns bytes."""
    head, ordered = _shard_header(extents)
    total = 0
    with open(out_path, "wb") as out:
        out.write(head)
        for e in ordered:
            with open(e.path, "rb") as src:
                src.seek(e.offset)
                left = e.nbytes
                while left:
                    block = src.read(min(COPY_BLOCK, left))
                    if not block:
                        raise RingllmError(f"{e.path}: ends inside tensor {e.name} (truncated shard)")
                    out.write(block)
                    left -= len(block)
            total += e.nbytes
        out.flush()
        os.fsync(out.fileno())
    return total


def _write_metadata(src: Path, out: Path, layers: int, shards: dict[str, list], total: int) -> None:
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    for key in PER_LAYER_CONFIG_LISTS:
        if isinstance(config.get(key), list):
            config[key] = config[key][:layers]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        meta = json.loads(index.read_text()).get("metadata") or {}
        weight_map = {e.name: shard for shard, extents in shards.items() for e in extents}
        (out / index.name).write_text(json.dumps({"metadata": {**meta, "total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    copy_side_files(src, out)


def make_draft(src: Path | str, dst: Path | str, layers: int, log=None) -> Path:
    """Write the `layers`-layer truncation of checkpoint `src` at `dst` (module docstring); returns dst."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.checkpoint.safetensors_index import read_safetensors_header, shard_files

    src, dst = Path(src), Path(dst)
    layout = load_layout(src)          # a readable Llama checkpoint, names and shapes checked
    source_layers = layout.config.num_layers
    if not 1 <= layers < source_layers:
        raise RingllmError(f"--layers {layers}: a draft keeps 1 to {source_layers - 1} of {src}'s "
                           f"{source_layers} decoder layers")
    check_new_checkpoint_dir(src, dst, "make_draft")
    shards = {}
    for shard in shard_files(src):
        extents = [e for e in read_safetensors_header(shard).values() if kept(e.name, layers)]
        if extents:                    # a shard of dropped layers only is dropped
            shards[shard.name] = extents
    total = sum(e.nbytes for extents in shards.values() for e in extents)
    free = shutil.disk_usage(dst.resolve().parent).free
    if total > free:
        raise RingllmError(f"{dst}: the draft needs {total / 1e9:.2f} GB, the file system has {free / 1e9:.2f} GB free")
    with writing_checkpoint(dst) as partial:
        for name, extents in shards.items():
            _copy_shard(extents, partial / name)
        _write_metadata(src, partial, layers, shards, total)
        load_layout(partial)           # it loads as a checkpoint before it is one
    if log:
        log(f"wrote {dst}: layers 0..{layers - 1} of {source_layers} from {src} ({total / 1e9:.3f} GB)")
    return dst


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.make_draft", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, metavar="SRC", help="the source Llama model directory")
    ap.add_argument("dst", type=Path, metavar="DST", help="the directory to write (new or empty)")
    ap.add_argument("--layers", type=int, required=True, help="decoder layers the draft keeps (1 .. SRC's - 1)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        make_draft(args.src, args.dst, args.layers, log=lambda m: print(m, file=sys.stderr))
    except RingllmError as err:
        print(f"ringllm: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
