"""The in-process reference engine: every weight loaded once, no processes, no ring.

It is what `ringllm generate --resident` runs, and what the streaming engine is tested against.
Each group is read into one flat host buffer and the model gets views into it, exactly like the
streaming engine's group buffers.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from ringllm.checkpoint.layout import GROUP_KINDS, ModelLayout
from ringllm.workers.model import AttnWeights, FfnWeights, ResidentWeights
from ringllm.workers.direct_read import ParallelReader
from ringllm.workers.quantized import Fp8Weight, place
from ringllm.workers.weights import group_weights, load_tensor


def load_resident_model(layout: ModelLayout, device_type: str, dtype_name: str):
    """The in-process engine's model (`generate --resident`, `serve --resident`): every weight on
    the device, in the compute dtype. Logs how long loading took."""
    import logging
    import time

    from ringllm.checkpoint.errors import RingllmError
    from ringllm.workers.model import Llama
    from ringllm.workers.weights import torch_dtype

    if device_type == "cuda" and not torch.cuda.is_available():
        raise RingllmError("--device cuda: no CUDA device is available to torch")
    device, dtype, cfg = torch.device(device_type), torch_dtype(dtype_name), layout.config
    t0 = time.perf_counter()
    model = Llama(cfg, load_resident_weights(layout, dtype, device), ResidentSource(layout, dtype, device), dtype, device)
    logging.getLogger("ringllm").info("loaded %s (%d layers, %s) on %s in %.1f s", layout.model_dir, cfg.num_layers,
                                      layout.dtype, device, time.perf_counter() - t0)
    return model


def load_resident_weights(layout: ModelLayout, dtype: torch.dtype, device: torch.device,
                          embed_on_host: bool = False, threads: int = 1, direct: bool = True) -> ResidentWeights:
    """embed_tokens, final norm and lm_head, converted to the compute dtype; read by `threads`
    threads (workers.direct_read; direct=False: through the page cache, which the supervisor warmed).

    With embed_on_host the embedding table stays in DRAM (rows are gathered there), and a tied
    lm_head gets its own copy on the device.
    """
    embed_host = load_tensor(layout.embed, threads, direct).to(dtype)
    embed = embed_host if embed_on_host else embed_host.to(device)
    norm = load_tensor(layout.final_norm, 1, direct).to(device=device, dtype=dtype)
    if layout.lm_head is None:
        lm_head = embed if embed.device == torch.device(device) else embed_host.to(device)
    elif layout.lm_head_scale is not None:     # an FP8 lm_head stays FP8 (dequantized at use)
        lm_head = Fp8Weight(load_tensor(layout.lm_head, threads, direct),
                            load_tensor(layout.lm_head_scale, 1, direct)).to_device(device)
    else:
        lm_head = load_tensor(layout.lm_head, threads, direct).to(device=device, dtype=dtype)
    return ResidentWeights(embed, norm, lm_head)


def load_groups(layout: ModelLayout, layers, dtype: torch.dtype, device: torch.device, threads: int = 1,
                warmed: int = 0) -> dict:
    """{layer: {"attn": AttnWeights, "ffn": FfnWeights}} on the device, in the compute dtype (a
    quantized weight as stored: FP8 stays FP8); each layer read by `threads` threads
    (workers.direct_read). Layers below `warmed` are in the page cache (supervisor.prefetch):
    read buffered; the rest O_DIRECT."""
    layers = list(layers)
    # On a GPU the host buffers are staging only: two sets, reused layer after layer, so that
    # fresh memory is touched once (first touch ran at 1.4 GB/s in an H200 VM, below its disk)
    # rather than for every layer. On cpu the weights are views into them and must stay.
    staging = [{kind: torch.empty(layout.max_group_bytes[kind], dtype=torch.uint8) for kind in GROUP_KINDS}
               for _ in range(2)] if device.type != "cpu" else None

    def read_layer(i: int) -> dict:
        layer = layers[i]
        bufs = {kind: (staging[i % 2][kind] if staging else torch.empty(layout.group(layer, kind).nbytes,
                                                                         dtype=torch.uint8))
                for kind in GROUP_KINDS}
        (cached if layer < warmed else direct).read([(e.extent, bufs[kind][e.buf_offset:e.buf_offset + e.extent.nbytes])
                                                      for kind in GROUP_KINDS for e in layout.group(layer, kind).entries])
        return bufs

    groups = {}
    # the next layer is read (into the other staging set) while this one goes to the device;
    # a copy from pageable memory has read its source when it returns, so the set is free again
    with ParallelReader(threads) as direct, ParallelReader(threads, direct=False) as cached, \
            ThreadPoolExecutor(1, thread_name_prefix="ringllm-read-ahead") as ahead:
        pending = ahead.submit(read_layer, 0) if layers else None
        for i, layer in enumerate(layers):
            bufs = pending.result()
            pending = ahead.submit(read_layer, i + 1) if i + 1 < len(layers) else None
            per_kind = {}
            for kind in GROUP_KINDS:
                weights = group_weights(bufs[kind], layout.group(layer, kind))
                # Convert once here rather than on every use when compute dtype differs; a
                # quantized weight keeps its bytes (the point of FP8: twice the layers fit)
                per_kind[kind] = type(weights)(*(place(w, device, dtype, copy=staging is not None)
                                                 for w in weights))
            groups[layer] = per_kind
    return groups


class ResidentSource:
    """WeightSource holding every group on the device."""

    def __init__(self, layout: ModelLayout, dtype: torch.dtype, device: torch.device):
        self.groups = load_groups(layout, range(layout.config.num_layers), dtype, device)

    def attn(self, layer: int) -> AttnWeights:
        return self.groups[layer]["attn"]

    def ffn(self, layer: int) -> FfnWeights:
        return self.groups[layer]["ffn"]

    def release(self, layer: int, kind: str) -> None:
        pass
