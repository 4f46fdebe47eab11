"""`ringllm convert --to fp8`: what it writes (checked with the safetensors library against the
source), that it streams (a spy on its reads), and its refusals (one line, nothing left behind)."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors import safe_open

from ringllm.cli import main
from tests.conftest import make_model_dir

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def src(tmp_path):
    d = make_model_dir(tmp_path / "src", dtype=torch.bfloat16, max_shard_size="40KB", num_hidden_layers=3)
    (d / "chat_template.jinja").write_text("{{ messages }}")
    return d


def tensors_by_file(d):
    out = {}
    for shard in sorted(d.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out[shard.name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_output_is_sharded_like_the_source_and_quantized_per_channel(src, tmp_path):
    dst = tmp_path / "fp8"
    assert main(["convert", "--to", "fp8", str(src), str(dst)]) == 0
    before, after = tensors_by_file(src), tensors_by_file(dst)
    assert sorted(before) == sorted(after) and len(before) > 1          # same shard names
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    for shard, tensors in before.items():
        for name, w in tensors.items():
            out = after[shard]
            if name.split(".")[-2] in LINEARS:
                q, scale = out[name], out[name + "_scale"]
                assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
                assert scale.shape == (w.shape[0], 1) and index[name + "_scale"] == shard
                wf = w.float()
                assert torch.allclose(scale, wf.abs().amax(1, keepdim=True) / 448, rtol=1e-6)
                # round to nearest e4m3: half an ulp (2^-4 relative), or half the smallest subnormal
                err = (q.float() * scale - wf).abs()
                assert bool((err <= wf.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()), name
            else:     # norms, embed_tokens, lm_head: the source's bytes
                assert out[name].dtype == w.dtype and torch.equal(out[name], w), name
            assert index[name] == shard
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (dst / f).read_bytes() == (src / f).read_bytes(), f
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["format"], q["ignore"]) == ("compressed-tensors", "float-quantized", ["lm_head"])
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(q)       # the published schema accepts it
    assert not list(tmp_path.glob("*.partial-*"))


def test_convert_holds_one_block_at_a_time(src, tmp_path, monkeypatch):
    """A spy on every read the converter makes (workers.weights.load_bytes) keeps count of the
    source bytes alive at once. With a 4 KiB block on tensors up to 16 KiB, a converter that held
    a whole tensor, a shard or the model would go over."""
    import ringllm.convert as convert
    import ringllm.workers.weights as weights

    block = 4096
    monkeypatch.setattr(convert, "BLOCK_BYTES", block)
    real, live, peak, reads = weights.load_bytes, [0], [0], []

    def spy(extent, threads=1, direct=True):
        t = real(extent, threads, direct)
        n = extent.nbytes
        live[0] += n
        peak[0] = max(peak[0], live[0])
        reads.append(n)
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - n))
        return t

    monkeypatch.setattr(weights, "load_bytes", spy)
    assert main(["convert", "--to", "fp8", str(src), str(tmp_path / "fp8")]) == 0
    total = sum(t.numel() * t.element_size() for f in tensors_by_file(src).values() for t in f.values())
    assert sum(reads) >= total                      # it did read the whole model through the spy
    assert peak[0] <= block, f"{peak[0]} source bytes alive at once (block {block})"


def one_error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("ringllm: error:")]
    assert code == 1 and len(lines) == 1, err
    return lines[0]


def test_refuses_a_non_empty_destination(src, tmp_path, capsys):
    dst = tmp_path / "busy"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    line = one_error_line(capsys, ["convert", "--to", "fp8", str(src), str(dst)])
    assert line == f"ringllm: error: {dst}: exists and is not empty; ringllm convert writes a new directory " \
                   "(remove it or choose another DST)"
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_refuses_an_fp8_source_and_a_destination_inside_the_source(src, tmp_path, capsys):
    fp8 = tmp_path / "fp8"
    assert main(["convert", "--to", "fp8", str(src), str(fp8)]) == 0
    line = one_error_line(capsys, ["convert", "--to", "fp8", str(fp8), str(tmp_path / "again")])
    assert "already quantized (compressed-tensors, format 'float-quantized')" in line
    line = one_error_line(capsys, ["convert", "--to", "fp8", str(src), str(src / "sub")])
    assert f"{src / 'sub'}: is inside the source checkpoint" in line
    assert not (tmp_path / "again").exists() and not (src / "sub").exists()


def test_failure_midway_leaves_nothing(tmp_path, capsys):
    """A weight that cannot be scaled (inf) in the last layer: one line naming it, and neither DST
    nor the partial directory remains."""
    from safetensors.torch import load_file, save_file

    src = make_model_dir(tmp_path / "src", dtype=torch.bfloat16, num_hidden_layers=2)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    line = one_error_line(capsys, ["convert", "--to", "fp8", str(src), str(tmp_path / "out")])
    assert "tensor model.layers.1.mlp.down_proj.weight has a non-finite value (inf or NaN) in rows" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unknown_target_is_a_usage_error(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--to", "int4", str(src), str(tmp_path / "x")])
    assert exit_.value.code == 2


def test_tensors_of_other_dtypes_are_copied_byte_for_byte(src, tmp_path):
    """A checkpoint may carry non-float tensors (an I64 buffer, an odd-sized one): convert copies
    them as they are, at the right offsets (a review found convert crashing on them)."""
    from safetensors.torch import load_file, save_file

    shard = next(src.glob("*.safetensors"))
    tensors = load_file(str(shard))
    extra = {"model.extra_ids": torch.arange(5, dtype=torch.int64), "model.extra_f64": torch.rand(3, dtype=torch.float64)}
    save_file({**tensors, **extra}, str(shard), metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: shard.name for k in extra})
        index.write_text(json.dumps(data))
    out = tmp_path / "fp8"
    assert main(["convert", "--to", "fp8", str(src), str(out)]) == 0
    written = load_file(str(out / shard.name))
    for name, value in extra.items():
        assert written[name].dtype == value.dtype and torch.equal(written[name], value), name


def test_a_killed_converts_partial_output_is_removed_by_the_next(src, tmp_path):
    """SIGKILL leaves DST.partial-<pid> behind; the next convert to DST removes it once that
    process is gone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"fp8.partial-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(["convert", "--to", "fp8", str(src), str(tmp_path / "fp8")]) == 0
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fp8", src.name])


def test_an_all_zero_row_gets_a_finite_scale_and_dequantizes_to_zeros(tmp_path):
    """A pruned neuron (an all-zero output row) has absmax 0: its scale must still be finite and
    non-zero (0 would make w / scale NaN, and compressed-tensors readers divide by it too), and its
    row must come back as zeros. Every other row keeps max |w| / 448."""
    from safetensors.torch import load_file, save_file

    src = make_model_dir(tmp_path / "src", dtype=torch.bfloat16, num_hidden_layers=2)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    pruned = {"model.layers.0.self_attn.q_proj.weight": 0, "model.layers.1.mlp.down_proj.weight": 5}
    for name, row in pruned.items():
        tensors[name][row] = 0
    save_file(tensors, shard, metadata={"format": "pt"})
    dst = tmp_path / "fp8"
    assert main(["convert", "--to", "fp8", str(src), str(dst)]) == 0
    out = {k: v for shard_tensors in tensors_by_file(dst).values() for k, v in shard_tensors.items()}
    for name, w in tensors.items():
        if name.split(".")[-2] not in LINEARS:
            continue
        q, scale = out[name].float(), out[name + "_scale"]
        assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all()), (name, scale.flatten())
        assert not bool(q.isnan().any()), name
        live = w.float().abs().amax(1) > 0
        assert torch.allclose(scale[live], w.float()[live].abs().amax(1, keepdim=True) / 448, rtol=1e-6), name
        if name in pruned:
            assert torch.equal(q[pruned[name]] * scale[pruned[name]], torch.zeros(w.shape[1])), name
