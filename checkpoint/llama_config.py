"""config.json of a Llama-3.x checkpoint -> a frozen, validated LlamaConfig."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ringllm.checkpoint import dtypes
from ringllm.checkpoint.errors import RingllmError



@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1's 'llama3' frequency scaling (None on the config means plain RoPE)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str | None          # as declared in config.json, None when absent
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_cache_bytes(self, batch: int, max_seq: int, elem_bytes: int) -> int:
        """Keys and values of every layer for `batch` rows of `max_seq` tokens."""
        return 2 * self.num_layers * batch * max_seq * self.kv_size * elem_bytes


def _rope_fields(raw: dict, where: str) -> tuple[float, RopeScaling | None]:
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    params = raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise RingllmError(f"{where}: rope scaling type {kind!r} is not supported (only 'llama3' or none)")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise RingllmError(f"{where}: llama3 rope scaling lacks {missing.args[0]!r}") from None


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def load_llama_config(model_dir: Path) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise RingllmError(f"{path}: not found (a Hugging Face model directory has config.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RingllmError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise RingllmError(f"{path}: expected a JSON object")
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise RingllmError(
            f"{path}: model_type {raw.get('model_type')!r} / architectures {archs} is not a Llama "
            "model (LlamaForCausalLM)")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        cfg_fields = dict(
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        )
    except KeyError as missing:
        raise RingllmError(f"{path}: required field {missing.args[0]!r} is missing") from None
    except (TypeError, ValueError) as err:
        raise RingllmError(f"{path}: a size field is not an integer ({err})") from None
    theta, scaling = _rope_fields(raw, str(path))
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    if dtype is not None and dtype not in dtypes.NAMES:
        raise RingllmError(f"{path}: dtype {dtype!r} is not supported (one of {', '.join(dtypes.NAMES)})")
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size"):
        if cfg_fields[name] <= 0:
            raise RingllmError(f"{path}: {name} must be positive, got {cfg_fields[name]}")
    if heads % kv_heads:
        raise RingllmError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise RingllmError(f"{path}: head_dim {head_dim} must be even for rotary embeddings")
    return LlamaConfig(
        **cfg_fields,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        torch_dtype=dtype,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )
