"""tools/fp8_bench end to end on CPU with a tiny checkpoint, so that the GPU session's one command
does not rot: the ratios against the raw numbers in its JSON, the bytes against the checkpoints'
own safetensors files (read here with safetensors), a second run reusing the first, a disk too
small refused before anything is written."""
from __future__ import annotations

import json
import math
from collections import namedtuple
from pathlib import Path

import pytest

from ringllm.tools.make_checkpoint import make_checkpoint

ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}
ARGS = ["--device", "cpu", "--decode-tokens", "4", "--prompt-tokens", "16", "--prefill-tokens", "32", "--loaders", "2",
        "--set", "CPU_CAP_VALUE=3", "--set", "GPU_AHEAD_LAYERS=1", "--set", "CPU_RING_OFFSET=2"]
# CPU_RING_OFFSET set: the preset's doubles for FP8 (config.preset_values_for), and a window reading
# further ahead reads more for passes that never come, which on layers this small moves the
# disk-fed ratio more than the bytes do


def cap_for_bf16_layers(src: Path, layers: float) -> int:
    """A --gpu-mem under which `layers` of src's bf16 layers fit beside the streaming working set
    (as the tool plans it: preset conservative, max_seq = 32 + 1)."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.config import build_config
    from ringllm.workers.memory_plan import plan_gpu_memory

    engine = build_config(preset="conservative", loaders=2, overrides={"CPU_CAP_VALUE": "3", "GPU_AHEAD_LAYERS": "1"})
    plan = plan_gpu_memory(load_layout(src), engine, 1, 33, "bfloat16", embed_on_host=False)
    return int(plan.total + layers * tensor_bytes(src, first_layer=5))     # one layer: the last one's tensors


def tensor_bytes(model_dir: Path, first_layer: int | None = None) -> int:
    """Bytes of the tensors in model_dir's safetensors files: all, or the decoder layers' from first_layer on."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if first_layer is not None and not (k.startswith("model.layers.") and int(k.split(".")[2]) >= first_layer):
                    continue
                t = f.get_slice(k)
                total += math.prod(t.get_shape()) * ITEMSIZE[t.get_dtype()]
    return total


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    from ringllm.tools.fp8_bench import main

    root = tmp_path_factory.mktemp("fp8bench")
    src = make_checkpoint(root / "c", "tiny", 6, shard_bytes=60_000, progress=False)
    out = root / "out"
    args = ["--model", str(src), "--out", str(out), "--gpu-mem", str(cap_for_bf16_layers(src, 2.5)), *ARGS]
    assert main(args) == 0
    return args, out, json.loads((out / "fp8-bench.json").read_text())


def test_fp8_bench_numbers_add_up(bench_run, capsys):
    args, out, r = bench_run
    src, fp8 = Path(args[1]), out / "fp8"
    assert (r["card"], r["layers"], r["bf16_model"], r["fp8_model"]) == ("cpu", 6, str(src), str(fp8))
    assert r["command"].endswith(" ".join(args))
    v = r["variants"]
    b, d = v["bf16"], v["fp8 dequant"]
    # cpu cannot run scaled_mm: skipped with the reason, not measured as the fallback
    assert set(v) == {"bf16", "fp8 dequant", "fp8 scaled_mm"} and "cpu" in v["fp8 scaled_mm"]["skipped"]
    assert d["ran_as"] == "dequant" and b["ran_as"] is None
    # under the cap 2 bf16 layers fit and more FP8 ones (beside the FP8 runs' doubled look-ahead
    # buffers: the preset's counts are 16-bit layers); both runs keep bf16's placement
    assert r["resident_layers_fit"]["bf16"] == 2 and r["resident_layers_fit"]["fp8"] >= 3
    e, f8 = r["engine"], r["fp8_engine"]
    # the preset's counts doubled for FP8, your --set kept: GPU_AHEAD_LAYERS=1 both
    assert (f8["gpu_ahead_layers"], f8["gpu_max_groups"]) == (e["gpu_ahead_layers"], 2 * e["gpu_max_groups"]) == (1, 14)
    assert b["resident_layers"] == d["resident_layers"] == 2 and b["streamed_layers"] == d["streamed_layers"] == 4
    # bytes: the checkpoints' own files (safetensors), layers 2.. stream
    assert b["streamed_bytes_per_pass"] == tensor_bytes(src, first_layer=2)
    assert d["streamed_bytes_per_pass"] == tensor_bytes(fp8, first_layer=2)
    assert d["streamed_bytes_ratio_to_bf16"] == d["streamed_bytes_per_pass"] / b["streamed_bytes_per_pass"]
    assert 0.5 < d["streamed_bytes_ratio_to_bf16"] < 0.56          # FP8 bytes + float32 scales per row
    from ringllm.tools.fp8_bench import fp8_copy_bytes
    assert fp8_copy_bytes(src) == tensor_bytes(fp8)                   # the disk check's size is exact
    # the ratios against the raw numbers, and those against each run's own report
    for name, s in (("bf16", b), ("fp8 dequant", d)):
        full = json.loads(Path(r["reports"][name]).read_text())["report"]
        gpu = full["runs"]["decode DRAM-fed"]["gpu"]
        assert s["dram_s_per_token"] == gpu["decode_seconds"] / gpu["decode_steps"] > 0
        assert s["dram_floor_over_achieved"] == s["dram_floor_s"] / s["dram_s_per_token"]
        disk = full["runs"]["decode disk-fed"]
        assert (s["disk_bytes_timed"], s["disk_passes"]) == (disk["disk_bytes_timed"], disk["passes"])
        assert s["disk_bytes_per_token"] == s["disk_bytes_timed"] / s["disk_passes"] > 0
        assert full["streamed_bytes_per_pass"] == s["streamed_bytes_per_pass"]
    assert d["dram_ratio_to_bf16"] == d["dram_s_per_token"] / b["dram_s_per_token"]
    assert d["disk_bytes_ratio_to_bf16"] == d["disk_bytes_per_token"] / b["disk_bytes_per_token"]
    # the disk-fed runs read roughly the streamed bytes' ratio: on layers this small, reads rounded to
    # 4 KiB pages and how far the window read ahead in the timed passes move it (0.51-0.62 seen)
    assert 0.4 < d["disk_bytes_ratio_to_bf16"] < 0.7, d
    assert r["best_fp8"] == "fp8 dequant"
    table = (out / "fp8-bench.txt").read_text()
    assert "fp8 scaled_mm" in table and "skipped" in table and r["command"] in table


def test_fp8_bench_second_run_reuses_the_first(bench_run, capsys):
    from ringllm.tools.fp8_bench import main

    args, out, first = bench_run
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "reusing the FP8 copy" in captured.err and "bf16: reusing" in captured.err
    assert "fp8 dequant: reusing" in captured.err
    again = json.loads((out / "fp8-bench.json").read_text())
    assert again["variants"] == first["variants"]
    assert captured.out.strip() == (out / "fp8-bench.txt").read_text().strip()


def test_fp8_bench_refuses_a_disk_too_small_before_writing(tmp_path, capsys, monkeypatch):
    from ringllm.tools import fp8_bench

    src = make_checkpoint(tmp_path / "c", "tiny", 3, shard_bytes=60_000, progress=False)
    need = fp8_bench.fp8_copy_bytes(src)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(fp8_bench.shutil, "disk_usage", lambda p: Usage(10 * need, 9 * need, need))
    code = fp8_bench.main(["--model", str(src), "--out", str(tmp_path / "out"), "--gpu-mem", "300MiB", *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("ringllm: error: ") and "the FP8 copy of" in err[-1], err
    assert f"needs {need / 1e9:.2f} GB" in err[-1]
    assert not (tmp_path / "out" / "fp8").exists() and not list((tmp_path / "out").glob("fp8.partial-*"))
