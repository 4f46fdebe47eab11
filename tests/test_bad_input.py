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


def expect_error(capsys, model_dir, *needles, extra=(), names=None):
    """One `ringllm: error:` line. `names`: the file or directory the message must start with.
    The needles are looked for only after that path: pytest names the temporary directory after
    the test, so a needle such as "truncated" would otherwise match test_truncated_shard0/."""
    code, lines, captured = run_cli(capsys, "--model", str(model_dir), *extra)
    assert code != 0, captured
    assert len(lines) == 1, captured.err
    prefix = "ringllm: error: " + (f"{names}: " if names is not None else "")
    assert lines[0].startswith(prefix), lines[0]
    message = lines[0][len(prefix):]
    assert str(model_dir.parent) not in message, f"needles would also search a path: {message}"
    for needle in needles:
        assert needle in message, lines[0]
    assert captured.out == ""
    return lines[0]


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
    expect_error(capsys, tmp_path / "nope", "not found", names=tmp_path / "nope")


def test_config_not_llama(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ckpt, "mistral", "not a Llama", names=ckpt / "config.json")


def test_missing_tensor(capsys, ckpt):
    rewrite_header(ckpt / "model.safetensors",
                   lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(capsys, ckpt, "tensor model.layers.1.mlp.up_proj.weight is missing", names=ckpt)


def test_shape_contradicts_config(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ckpt, "model.layers.0.mlp.gate_proj.weight has shape [112, 64]", "[100, 64]",
                 names=ckpt / "model.safetensors")


def test_dtype_contradicts_config(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        cfg.pop(key, None)
    cfg["torch_dtype"] = "bfloat16"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ckpt, "dtype F32", "BF16", names=ckpt / "model.safetensors")


def tensor_ends(path):
    """{tensor: absolute byte where its data ends}, read with struct + json (not ringllm's parser)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {name: 8 + n + e["data_offsets"][1] for name, e in header.items() if name != "__metadata__"}


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("cut", ["one_byte", "half_of_last_tensor"])
def test_truncated_shard_found_in_header(ckpt, cut):
    """The header check alone (no weight byte read) names the tensor cut off and both sizes."""
    from ringllm.checkpoint.errors import RingllmError
    from ringllm.checkpoint.safetensors_index import read_safetensors_header

    f = ckpt / "model.safetensors"
    ends = tensor_ends(f)
    size = f.stat().st_size
    last = max(ends, key=ends.get)
    assert ends[last] == size            # the tensor at the end of the file is the only one cut
    second_end = sorted(ends.values())[-2]
    keep = size - 1 if cut == "one_byte" else (second_end + size) // 2
    truncate(f, keep)
    with pytest.raises(RingllmError) as err:
        read_safetensors_header(f)
    assert str(err.value) == f"{f}: truncated shard (tensor {last} ends at byte {size}, file has {keep})"


def test_truncated_shard_many_tensors_cut(ckpt):
    """Cut into the middle of the data: the message names one of the tensors cut off, with its end."""
    import re

    from ringllm.checkpoint.errors import RingllmError
    from ringllm.checkpoint.safetensors_index import read_safetensors_header

    f = ckpt / "model.safetensors"
    ends = tensor_ends(f)
    keep = f.stat().st_size // 2
    truncate(f, keep)
    with pytest.raises(RingllmError) as err:
        read_safetensors_header(f)
    m = re.fullmatch(re.escape(str(f)) + r": truncated shard \(tensor (\S+) ends at byte (\d+), file has (\d+)\)",
                     str(err.value))
    assert m, str(err.value)
    name, end, has = m.group(1), int(m.group(2)), int(m.group(3))
    assert name in ends and end == ends[name] > keep and has == keep


def test_truncated_shard_cli(capsys, ckpt):
    f = ckpt / "model.safetensors"
    ends = tensor_ends(f)
    size = f.stat().st_size
    last = max(ends, key=ends.get)
    keep = (sorted(ends.values())[-2] + size) // 2      # into the last tensor only
    truncate(f, keep)
    line = expect_error(capsys, ckpt, names=f)
    assert line == f"ringllm: error: {f}: truncated shard (tensor {last} ends at byte {size}, file has {keep})"


def test_corrupt_header(capsys, ckpt):
    f = ckpt / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"!garbage!!!!"
    f.write_bytes(bytes(raw))
    expect_error(capsys, ckpt, "corrupt safetensors header", names=f)


def test_header_length_beyond_file(capsys, ckpt):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    expect_error(capsys, ckpt, f"corrupt safetensors header (declares {len(raw) * 4} header bytes, "
                               f"file has {len(raw)})", names=f)


def test_duplicated_tensor(capsys, tmp_path):
    """A tensor of shard 1 appended to shard 2 (its own bytes, overlapping nothing there)."""
    d = tmp_path / "s"
    make_model_dir(d, max_shard_size="40KB", num_hidden_layers=2)
    shards = sorted(d.glob("*.safetensors"))
    raw0 = shards[0].read_bytes()
    (n0,) = struct.unpack("<Q", raw0[:8])
    first = json.loads(raw0[8:8 + n0])
    name = next(n for n in first if n != "__metadata__")
    begin, end = first[name]["data_offsets"]
    raw1 = shards[1].read_bytes()
    (n1,) = struct.unpack("<Q", raw1[:8])
    data_len = len(raw1) - 8 - n1
    shards[1].write_bytes(raw1 + raw0[8 + n0 + begin:8 + n0 + end])
    rewrite_header(shards[1], lambda h: h.__setitem__(
        name, {**first[name], "data_offsets": [data_len, data_len + end - begin]}))
    expect_error(capsys, d, f"tensor {name} is duplicated (also in {shards[0].name})", names=shards[1])


def test_prompt_longer_than_context(capsys, ckpt):
    long_prompt = " ".join(["w9"] * 300)   # max_position_embeddings is 256
    expect_error(capsys, ckpt, "exceeds", "context of 256", extra=("--prompt", long_prompt, "--no-chat"))


@pytest.mark.parametrize("flag,value,needle", [("--top-p", "1.01", "--top-p"), ("--top-p", "nan", "--top-p"),
                                               ("--temperature", "-1", "--temperature"),
                                               ("--temperature", "nan", "--temperature"),
                                               ("--seed", str(2**64), "--seed"),
                                               ("--max-new-tokens", "0", "--max-new-tokens")])
def test_bad_sampling_arguments(capsys, ckpt, flag, value, needle):
    expect_error(capsys, ckpt, needle, extra=(flag, value))
