"""`ringllm convert --to fp8 SRC DST`: a bf16/fp16/fp32 Llama checkpoint -> FP8 (e4m3) weights in the
compressed-tensors "float-quantized" layout (checkpoint.quantization), which ringllm, transformers
(with the compressed-tensors package) and vLLM read.

    Linear weights of the decoder layers (q, k, v, o, gate, up, down):
        scale[i]  = max |w[i, :]| / 448                       (float32 [out, 1]; 448 = e4m3's max)
        weight    = clamp(w / scale, -448, 448) -> float8_e4m3fn (round to nearest even)
    everything else (norms, embed_tokens, lm_head unless --quantize-lm-head): copied unchanged,
    in the source dtype (a float32 source keeps its float32 norms and embeddings: no silent rounding)

Streaming: each output shard is written as it is produced (its header first: every output size is
known from the source header), and a tensor is read in blocks of whole rows (per-row scales make
rows independent) through the engine's own O_DIRECT reader. Memory stays at one block of source
rows (BLOCK_BYTES) and its few float32 working copies (under 0.5 GB in all), plus one tensor's
scales, whatever the model's size: a 141 GB model converts on a 64 GB machine. Tensors that are
not quantized are copied byte for byte, whatever their dtype. The output keeps the source's shard file names and which tensor
lives where (a weight's scale follows it in its shard), with the index, config.json (plus
quantization_config), tokenizer, chat template and generation config.

Nothing half-written is ever a checkpoint: the output is built in DST.partial-<pid> next to DST
and renamed to DST only after it loads (load_layout + one layer read back); on any failure the
partial directory is removed. An existing non-empty DST is refused.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.quantization import E4M3_MAX, FP8_TAG, scale_name

BLOCK_BYTES = 64 << 20          # source bytes read, converted and written at a time
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight")
COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".md")
OWN_FILES = ("config.json", "model.safetensors.index.json")


def quantization_config(quantize_lm_head: bool) -> dict:
    """config.json's quantization_config, as llm-compressor publishes a weight-only FP8 model
    (compressed-tensors QuantizationConfig.model_dump(): FP8 per channel, no activation scheme)."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "float-quantized"}},
            "ignore": [] if quantize_lm_head else ["lm_head"], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: object          # the source TensorExtent it comes from
    role: str               # "copy" | "weight" (FP8 data) | "scale" (its weight_scale)

    @property
    def nbytes(self) -> int:
        if self.role == "copy":             # as in the source, whatever its dtype (I64, F64, ...)
            return self.source.nbytes
        return math.prod(self.shape) * (4 if self.role == "scale" else 1)


def plan_shard(extents, quantize) -> list[OutTensor]:
    """The output tensors of one source shard, in its file order."""
    out = []
    for ext in sorted(extents, key=lambda e: e.offset):
        if quantize(ext.name):
            out.append(OutTensor(ext.name, FP8_TAG, ext.shape, ext, "weight"))
            out.append(OutTensor(scale_name(ext.name), "F32", (ext.shape[0], 1), ext, "scale"))
        else:
            out.append(OutTensor(ext.name, ext.dtype, ext.shape, ext, "copy"))
    return out


def _header(tensors: list[OutTensor]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt", "quantized_by": "ringllm convert"}}, 0
    for t in tensors:
        itemsize = t.nbytes // max(1, math.prod(t.shape))
        if offset % max(1, itemsize):   # safetensors data has no gaps: a typed view needs its alignment
            raise RingllmError(f"{t.source.path}: tensor {t.name} would start at byte {offset}, not a multiple "
                               f"of its {itemsize}-byte elements (the FP8 tensors before it have an odd size)")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write(f, t) -> None:
    """A contiguous CPU tensor's bytes, without a copy and without numpy."""
    t = t.contiguous()
    n = t.numel() * t.element_size()
    if n:
        f.write(memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B"))


def read_rows(ext, first: int, count: int):
    """Rows first..first+count-1 of a 2-D (or 1-D: elements) source tensor, read with O_DIRECT."""
    from ringllm.checkpoint.safetensors_index import TensorExtent
    from ringllm.workers.weights import load_tensor

    row = ext.nbytes // ext.shape[0]
    return load_tensor(TensorExtent(ext.name, ext.path, ext.offset + first * row, count * row, ext.dtype,
                                    (count, *ext.shape[1:])))


def _row_blocks(ext):
    rows = ext.shape[0] if ext.shape else 1
    per = max(1, BLOCK_BYTES // max(1, ext.nbytes // max(1, rows)))
    for first in range(0, rows, per):
        yield first, min(per, rows - first)


def quantize_rows(w):
    """A block of rows -> (float8_e4m3fn rows, float32 scales [rows, 1]); per row absmax / 448."""
    import torch

    wf = w.float()
    absmax = wf.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))   # an all-zero row: any scale
    return (wf / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _convert_shard(src_shard: Path, out_path: Path, tensors: list[OutTensor], advance) -> None:
    import torch

    from ringllm.workers.weights import load_bytes

    with open(out_path, "wb") as f:
        f.write(_header(tensors))
        for t in tensors:
            ext = t.source
            if t.role == "scale":
                continue                    # written right after its weight (below)
            if (t.role == "copy" and ext.dtype in ("F32", "BF16", "F16") and ext.shape and len(ext.shape) <= 2
                    and ext.nbytes > BLOCK_BYTES):
                for first, count in _row_blocks(ext):
                    _write(f, read_rows(ext, first, count))
                    advance(count * (ext.nbytes // ext.shape[0]), t.name)
                continue
            if t.role == "copy":            # its bytes as they are: any dtype
                _write(f, load_bytes(ext))
                advance(ext.nbytes, t.name)
                continue
            scales = []
            for first, count in _row_blocks(ext):
                rows = read_rows(ext, first, count)
                if not bool(rows.isfinite().all()):
                    raise RingllmError(f"{src_shard}: tensor {ext.name} has a non-finite value (inf or NaN) in "
                                       f"rows {first}..{first + count - 1}; it cannot be scaled to FP8")
                data, scale = quantize_rows(rows)
                del rows                    # before the next block is read: one block alive at a time
                _write(f, data)
                del data
                scales.append(scale)
                advance(count * (ext.nbytes // ext.shape[0]), t.name)
            _write(f, torch.cat(scales))    # [out, 1] float32: the next tensor in the header
        f.flush()
        os.fsync(f.fileno())


def check_new_checkpoint_dir(src: Path | None, dst: Path, writer: str = "ringllm convert") -> None:
    """DST of a command that writes a checkpoint (from SRC, when there is one): new or empty,
    outside SRC, in a writable directory. One line naming what is wrong otherwise."""
    if dst.exists() and not dst.is_dir():
        raise RingllmError(f"{dst}: exists and is a file; DST must be a new (or empty) directory")
    if dst.is_dir() and any(dst.iterdir()):
        raise RingllmError(f"{dst}: exists and is not empty; {writer} writes a new directory "
                           "(remove it or choose another DST)")
    d = dst.resolve()
    if src is not None and (d == src.resolve() or src.resolve() in d.parents):
        raise RingllmError(f"{dst}: is inside the source checkpoint {src}; choose a DST outside it")
    if not d.parent.is_dir():
        raise RingllmError(f"{dst}: its parent directory {d.parent} does not exist")
    if not os.access(d.parent, os.W_OK | os.X_OK):
        raise RingllmError(f"{dst}: its parent directory {d.parent} is not writable")


def convert_to_fp8(src: Path | str, dst: Path | str, quantize_lm_head: bool = False, progress: bool = True,
                   log=None) -> Path:
    """Write the FP8 checkpoint of `src` at `dst` (see the module docstring); returns dst."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.checkpoint.safetensors_index import read_safetensors_header, shard_files

    src, dst = Path(src), Path(dst)
    layout = load_layout(src)          # a readable Llama checkpoint, names and shapes checked
    if layout.quantization is not None:
        q = layout.quantization
        raise RingllmError(f"{src}/config.json: the checkpoint is already quantized ({q.method}, format "
                           f"'{q.fmt}'); convert reads a bf16, fp16 or fp32 checkpoint")
    check_new_checkpoint_dir(src, dst)

    def quantize(name: str) -> bool:
        return bool(LINEAR.fullmatch(name)) or (quantize_lm_head and name == "lm_head.weight")

    shards = shard_files(src)
    plans = {shard: plan_shard(read_safetensors_header(shard).values(), quantize) for shard in shards}
    total_in = sum(t.source.nbytes for p in plans.values() for t in p if t.role != "scale")
    total_out = sum(t.nbytes for p in plans.values() for t in p)
    free = shutil.disk_usage(dst.resolve().parent).free
    if total_out > free:
        raise RingllmError(f"{dst}: the FP8 checkpoint needs {total_out / 1e9:.2f} GB, the file system has "
                           f"{free / 1e9:.2f} GB free")
    with writing_checkpoint(dst) as partial:
        bar = _progress(total_in, f"converting {src.name} to FP8", progress)
        try:
            for shard, tensors in plans.items():
                _convert_shard(shard, partial / shard.name, tensors, bar)
        finally:
            bar(None, "")
        _write_metadata(src, partial, plans, total_out, quantize_lm_head)
        _check_output(partial)
    if log:
        from ringllm.workers.memory_plan import fmt_bytes
        log(f"wrote {dst}: {fmt_bytes(total_out)} with FP8 weights (from {fmt_bytes(total_in)})")
    return dst


@contextmanager
def writing_checkpoint(dst: Path):
    """Yields DST.partial-<pid>, the directory a checkpoint for DST is written in (convert and
    tools.make_draft). It becomes DST (an empty DST is replaced) only when the block ends without
    an exception, so the block checks that what it wrote loads; on any exception, SIGTERM's
    included (it raises SystemExit meanwhile), it is removed. Partials of killed writers go first."""
    _remove_stale_partials(dst)
    partial = dst.resolve().parent / f"{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    previous = _sigterm_exits()
    try:
        try:
            partial.mkdir()
        except OSError as err:      # a directory access() let through: /proc, a read-only mount
            raise RingllmError(f"{dst}: cannot create {partial} ({err.strerror})") from None
        yield partial
        if dst.is_dir():
            dst.rmdir()                # empty (check_new_checkpoint_dir)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def copy_side_files(src: Path, out: Path) -> None:
    """The files beside the weights (tokenizer, chat template, generation config, README) that a
    written checkpoint keeps as they are; config.json and the index are the writer's own."""
    for f in src.iterdir():
        if f.is_file() and f.suffix in COPIED_SUFFIXES and f.name not in OWN_FILES:
            shutil.copy2(f, out / f.name)


def _sigterm_exits():
    """SIGTERM raises SystemExit while converting, so the partial output is removed (the handler
    it replaces is returned; None off the main thread, where signals cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def exit_143(signum, frame):
        raise SystemExit(143)
    return signal.signal(signal.SIGTERM, exit_143)


def _remove_stale_partials(dst: Path) -> None:
    """`DST.partial-<pid>` left by a convert that was killed (SIGKILL, OOM): its process is gone."""
    for old in dst.resolve().parent.glob(f"{dst.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass                     # someone else's live process


def _write_metadata(src: Path, out: Path, plans: dict, total_out: int, quantize_lm_head: bool) -> None:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(quantize_lm_head)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        meta = json.loads(index.read_text()).get("metadata") or {}
        weight_map = {t.name: shard.name for shard, tensors in plans.items() for t in tensors}
        (out / index.name).write_text(json.dumps({"metadata": {**meta, "total_size": total_out},
                                                  "weight_map": weight_map}, indent=2))
    copy_side_files(src, out)


def _check_output(out: Path) -> None:
    """The output loads: its layout validates (names, shapes, FP8 scales) and layer 0 reads back finite."""
    import torch

    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.resident import load_groups
    from ringllm.workers.quantized import dense

    layout = load_layout(out)
    layer = load_groups(layout, [0], torch.float32, torch.device("cpu"))[0]
    for kind in ("attn", "ffn"):
        for w in layer[kind]:
            if not bool(dense(w, torch.float32).isfinite().all()):
                raise RingllmError(f"{out}: layer 0 {kind} reads back with non-finite values (a bug in convert)")


def _progress(total: int, label: str, enabled: bool):
    """A rich progress bar on stderr (when it is a terminal): bytes of the source done, the tensor."""
    if not (enabled and sys.stderr.isatty()):
        return lambda n, name: None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    prog = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[tensor]}"),
                    console=Console(stderr=True), transient=True)
    task = prog.add_task(label, total=total, tensor="")
    prog.start()

    def advance(n, name):
        if n is None:
            prog.stop()
        else:
            prog.update(task, advance=n, tensor=name)
    return advance
