"""Bad checkpoints and arguments: one clear line on stderr, a non-zero exit, nothing left behind."""
from __future__ import annotations

import json
import struct

import pytest

from ringllm.cli import main
from tests.conftest import make_model_dir


def run_cli(capsys, *args):
    code = main(["generate", "--device", "cpu", "--max-new-tokens", "4", *args])
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.startswith("ringllm: error:")]
    return code, lines, captured


def expect_error(capsys, model_dir, *needles, extra=()):
    code, lines, captured = run_cli(capsys, "--model", str(model_dir), *extra)
    assert code != 0, captured
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert captured.out == ""


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=2)
    return d


def rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_good_checkpoint_runs(capsys, ckpt):
    code, lines, captured = run_cli(capsys, "--model", str(ckpt), "--prompt", "w9 w10")
    assert code == 0 and not lines, captured.err
    assert captured.out.strip() != "" or "generated" in captured.err


def test_model_dir_missing(capsys, tmp_path):
    expect_error(capsys, tmp_path / "nope", "nope", "not found")


def test_config_not_llama(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ckpt, "config.json", "mistral", "not a Llama")


def test_missing_tensor(capsys, ckpt):
    rewrite_header(ckpt / "model.safetensors",
                   lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(capsys, ckpt, "model.layers.1.mlp.up_proj.weight", "missing")


def test_shape_contradicts_config(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ckpt, "model.layers.0.mlp.gate_proj.weight", "shape", "[100, 64]")


def test_dtype_contradicts_config(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        cfg.pop(key, None)
    cfg["torch_dtype"] = "bfloat16"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ckpt, "dtype F32", "BF16")


def test_truncated_shard(capsys, ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    expect_error(capsys, ckpt, "model.safetensors", "truncated")


def test_corrupt_header(capsys, ckpt):
    f = ckpt / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"!garbage!!!!"
    f.write_bytes(bytes(raw))
    expect_error(capsys, ckpt, "model.safetensors", "corrupt safetensors header")


def test_header_length_beyond_file(capsys, ckpt):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    expect_error(capsys, ckpt, "corrupt safetensors header")


def test_duplicated_tensor(capsys, tmp_path):
    d = tmp_path / "s"
    make_model_dir(d, max_shard_size="40KB", num_hidden_layers=2)
    shards = sorted(d.glob("*.safetensors"))
    first = json.loads(shards[0].read_bytes()[8:8 + struct.unpack("<Q", shards[0].read_bytes()[:8])[0]])
    name = next(n for n in first if n != "__metadata__")
    rewrite_header(shards[1], lambda h: h.__setitem__(name, first[name]))
    expect_error(capsys, d, name, "duplicated")


def test_prompt_longer_than_context(capsys, ckpt):
    long_prompt = " ".join(["w9"] * 300)   # max_position_embeddings is 256
    expect_error(capsys, ckpt, "exceeds", "context of 256", extra=("--prompt", long_prompt, "--no-chat"))


@pytest.mark.parametrize("flag,value,needle", [("--top-p", "0", "--top-p"), ("--temperature", "-1", "--temperature"),
                                               ("--max-new-tokens", "0", "--max-new-tokens")])
def test_bad_sampling_arguments(capsys, ckpt, flag, value, needle):
    expect_error(capsys, ckpt, needle, extra=(flag, value))
