"""The weight dtypes ringllm reads, under every name they go by: the config.json / `--dtype`
name, the safetensors tag, and the bytes per element. One table; torch's dtype object for a name
is `getattr(torch, name)` (ringllm.workers.weights.torch_dtype)."""
from __future__ import annotations

WEIGHT_DTYPES = (("bfloat16", "BF16", 2), ("float16", "F16", 2), ("float32", "F32", 4))

NAMES = tuple(name for name, _, _ in WEIGHT_DTYPES)
TAG_OF_NAME = {name: tag for name, tag, _ in WEIGHT_DTYPES}
NAME_OF_TAG = {tag: name for name, tag, _ in WEIGHT_DTYPES}
BYTES_OF_NAME = {name: size for name, _, size in WEIGHT_DTYPES}
BYTES_OF_TAG = {tag: size for _, tag, size in WEIGHT_DTYPES}

# quantized weight dtypes (checkpoint.quantization): tag -> torch's name; a weight of this dtype
# comes with a scale and is dequantized to the compute dtype at use
QUANTIZED_TORCH_NAME = {"F8_E4M3": "float8_e4m3fn"}

# the other safetensors dtypes: a header may hold them (checked), a weight may not
OTHER_TAG_BYTES = {"F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                   "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
