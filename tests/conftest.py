"""Shared fixtures: tiny random Llama checkpoints written by transformers, the demo model."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

TINY_BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def make_hf_checkpoint(path: Path, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides):
    """Write a random-weight Llama checkpoint with transformers; return the transformers model (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**TINY_BASE, **overrides}
    rope_scaling = fields.pop("rope_scaling", None)
    config = LlamaConfig(**fields)
    if rope_scaling is not None:
        # transformers 5 keeps rope settings in rope_parameters; 4 in rope_scaling
        if hasattr(config, "rope_parameters") and config.rope_parameters is not None:
            config.rope_parameters = {**rope_scaling, "rope_theta": fields["rope_theta"]}
        else:
            config.rope_scaling = rope_scaling
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():   # random norms too, so that a norm wired to the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return model.float()


def write_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """A word-level tokenizer.json with a tiny chat template, enough to drive the CLI."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}"
                         "{% if add_generation_prompt %}w7{% endif %}",
    }))


def make_model_dir(path: Path, **kwargs) -> Path:
    """A tiny checkpoint written by transformers, with a tokenizer: a directory `ringllm
    generate --model` takes. kwargs go to make_hf_checkpoint."""
    make_hf_checkpoint(path, **kwargs)
    write_tokenizer(path)
    return path


def layer_tensor_bytes(model_dir: Path, first_layer: int = 0) -> int:
    """Bytes of the decoder layers' tensors from `first_layer` on, read from the safetensors
    files themselves (independent of ringllm's own layout code)."""
    import math

    from safetensors import safe_open

    itemsize = {"F32": 4, "BF16": 2, "F16": 2}
    total = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k.startswith("model.layers.") and int(k.split(".")[2]) >= first_layer:
                    t = f.get_slice(k)
                    total += math.prod(t.get_shape()) * itemsize[t.get_dtype()]
    return total


def hf_greedy_cached(hf, prompt, steps: int) -> list[int]:
    """transformers' own greedy decode with its KV cache (no EOS stop): the reference tokens."""
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        step = hf(ids, use_cache=True)
        for _ in range(steps):
            tok = step.logits[0, -1].argmax()
            out.append(int(tok))
            step = hf(tok.view(1, 1), past_key_values=step.past_key_values, use_cache=True)
    return out


def write_tiny_checkpoint(d: Path):
    """(d, transformers model): the default tiny config written at `d`, with a tokenizer."""
    model = make_hf_checkpoint(d)
    write_tokenizer(d)
    return d, model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """(model_dir, transformers model) for the default tiny config, with a tokenizer."""
    return write_tiny_checkpoint(tmp_path / "tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny_checkpoint written once for a whole test module (test_serve*.py: every server starts
    from it). Modules with another tiny model define their own `tiny`, which takes precedence."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def demo_model_dir():
    from ringllm.cli_input import default_cache_dir
    from ringllm.tools.demo_model import ensure_demo_model

    return ensure_demo_model(default_cache_dir())


@pytest.fixture(scope="session")
def smollm2_fp8_dir(demo_model_dir, tmp_path_factory):
    """The demo model converted by `ringllm convert --to fp8` as a user runs it, once a session
    (the FP8 quality, scaled_mm and draft tests share it: each conversion took ~20 s)."""
    from tests.test_fp8_quality import ringllm_convert_fp8

    return ringllm_convert_fp8(demo_model_dir, tmp_path_factory.mktemp("fp8") / "smollm2-fp8")


def own_leftovers(before: set[str]) -> list[str]:
    """Names in /dev/shm that appeared since `before` and belong to a run this test process
    started: in-process (the supervisor's pid is ours) or as a child command (its manifest names
    us as the parent). Runs of other ringllm commands on the machine are not ours to judge. A
    segment whose manifest is gone can only come from a cleanup bug; it counts as ours unless it
    vanishes at a second look (another run finishing its own cleanup)."""
    import json
    import os

    from ringllm.shm.resources import SHM_DIR, leftover_names, read_manifest, run_id_of

    me, own = os.getpid(), []
    for name in sorted(set(leftover_names()) - before):
        run = run_id_of(name)
        if run is None:
            continue
        info = read_manifest(run)
        if name.endswith(".tmp"):
            # a manifest being written (tmp, then rename), maybe by another command on the
            # machine: its manifest does not exist yet, so judge it by its own content
            try:
                info = json.loads((SHM_DIR / name).read_text())
            except (OSError, ValueError):
                info = {}       # gone or half written: only the pid in its name can make it ours
        if run.split("-")[0] == str(me) or (info is not None and info.get("parent") == me) or info is None:
            own.append(name)
    still_there = set(leftover_names())
    return [n for n in own if n in still_there]


PINNED_NOISE_BYTES = 2**20


@functools.cache
def _cuda_runtime_started() -> None:
    """This process's CUDA context and cuBLAS handle, made once: the driver pins host memory for
    them (9.8 and 8.4 MiB on an H200) and keeps it until the process ends. Made before the first
    snapshot, an in-process test that first touches CUDA is not charged with them."""
    x = torch.ones(16, 16, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        (x.to(dtype) @ x.to(dtype)).sum().item()
    if torch.cuda.get_device_capability() >= (8, 9):        # cuBLASLt's FP8 path (workers.quantized)
        one = torch.ones((), device="cuda")
        f8 = x.to(torch.float8_e4m3fn)
        torch._scaled_mm(f8, f8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16).sum().item()
    x.cpu()


@pytest.fixture(autouse=True)
def no_leftover_resources():
    """After every test: no segment or manifest of its own runs in /dev/shm, no child process
    left, and on a GPU machine no more pinned host memory than before (the ring's registration
    returned). Other ringllm runs alive on the machine are left alone."""
    import psutil

    from ringllm.shm.resources import leftover_names, pinned_above, system_pinned_bytes

    before = set(leftover_names())
    if torch.cuda.is_available():
        _cuda_runtime_started()
    pinned_before = system_pinned_bytes() if torch.cuda.is_available() else None
    yield
    left = own_leftovers(before)
    assert not left, f"left in /dev/shm: {left}"
    kids = [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not kids, f"child processes left: {[(p.pid, p.name()) for p in kids]}"
    if pinned_before is not None:
        # The counter is machine-wide: a few pages come and go with O_DIRECT reads, and this
        # process's CUDA libraries pin a little more as they load kernels on first use (0.24-0.32
        # MiB after the FP8 test on an H200, with the runtime already started). A registration
        # left behind is a whole ring: children's die with them (checked above), and a test that
        # registers in this process checks its own run's figure exactly.
        pinned = pinned_above(pinned_before)
        assert pinned < PINNED_NOISE_BYTES, f"{pinned / 2**20:.2f} MiB of host memory still pinned after the test"
