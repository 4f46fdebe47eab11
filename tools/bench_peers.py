"""What users would run instead of ringllm, measured on the same checkpoint, prompt and GPU cap.

Each peer runs in its own process (`python -m ringllm.tools.bench_peers NAME ...`), so its memory is
gone when it ends, and prints one JSON line:
  accelerate  transformers + accelerate, device_map="auto" with max_memory: layers past the GPU
              cap are offloaded to CPU memory and moved in by hooks at every forward
  naive       a synchronous layer-by-layer loader: read a layer's tensors (safetensors), copy
              them to the device, compute, drop them; ringllm's own model code, so it is exact
  airllm      AirLLM (where installed): splits the checkpoint into per-layer files once, then
              loads layer by layer
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


class TokenClock:
    """A transformers streamer that notes when each new token arrives."""

    def __init__(self):
        self.times, self.tokens, self.first = [], [], True

    def put(self, value):
        if self.first:              # the prompt comes through put() once first
            self.first = False
            return
        self.times.append(time.perf_counter())
        self.tokens += [int(t) for t in value.reshape(-1).tolist()]

    def end(self):
        pass


def per_token(times) -> float | None:
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def run_accelerate(args, prompt):
    from transformers import AutoModelForCausalLM

    import psutil
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, device_map="auto",
        max_memory={0: args.gpu_mem, "cpu": int(psutil.virtual_memory().available * 0.8)})
    load = time.perf_counter() - t0
    on_gpu = sum(1 for v in model.hf_device_map.values() if v in (0, "cuda", "cuda:0"))
    clock = TokenClock()
    ids = torch.tensor([prompt], device="cuda")
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                   min_new_tokens=args.new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
    return {"load_seconds": load, "seconds_per_token": per_token(clock.times), "tokens": clock.tokens,
            "modules_on_gpu": on_gpu, "modules": len(model.hf_device_map),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def run_naive(args, prompt):
    from safetensors import safe_open

    from ringllm.checkpoint.layout import load_layout
    from ringllm.workers.generation import Sampler, SamplingParams, generate
    from ringllm.workers.model import AttnWeights, FfnWeights, Llama
    from ringllm.workers.resident import load_resident_weights

    device = torch.device(args.device)
    layout = load_layout(args.model)
    files = {}

    class NaiveSource:
        def _load(self, layer, kind):
            group = layout.group(layer, kind)
            out = []
            for e in group.entries:
                f = files.get(e.extent.path) or files.setdefault(
                    e.extent.path, safe_open(e.extent.path, framework="pt", device="cpu"))
                out.append(f.get_tensor(e.extent.name).to(device))      # pageable, synchronous
            return (AttnWeights if kind == "attn" else FfnWeights)(*out)

        def attn(self, layer):
            return self._load(layer, "attn")

        def ffn(self, layer):
            return self._load(layer, "ffn")

        def release(self, layer, kind):
            pass

    dtype = torch.bfloat16 if layout.dtype == "BF16" else torch.float32
    t0 = time.perf_counter()
    model = Llama(layout.config, load_resident_weights(layout, dtype, device, embed_on_host=device.type == "cuda"),
                  NaiveSource(), dtype, device)
    load = time.perf_counter() - t0
    times = []
    out = generate(model, [prompt], args.new_tokens, Sampler(SamplingParams(), device), (),
                   on_token=lambda i, t: times.append(time.perf_counter()))
    return {"load_seconds": load, "seconds_per_token": per_token(times), "tokens": out[0],
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def run_airllm(args, prompt):
    try:
        from airllm import AutoModel
    except ImportError as err:
        return {"skipped": f"AirLLM is not installed ({err})"}
    size = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    # AirLLM writes a per-layer copy of the checkpoint: beside it if the disk has room, else in
    # /dev/shm (RAM; that only makes AirLLM's reads faster)
    places = [p for p in (args.scratch, "/dev/shm") if shutil.disk_usage(p).free > size * 1.05]
    if not places:
        return {"skipped": f"AirLLM needs a per-layer copy of the checkpoint ({size / 1e9:.1f} GB); neither "
                           f"{args.scratch} nor /dev/shm has that much free"}
    split_dir = Path(tempfile.mkdtemp(prefix="airllm-", dir=places[0]))
    try:
        t0 = time.perf_counter()
        model = AutoModel.from_pretrained(str(args.model), layer_shards_saving_path=str(split_dir))
        load = time.perf_counter() - t0
        ids = torch.tensor([prompt], device="cuda")
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, use_cache=True, return_dict_in_generate=True)
        elapsed = time.perf_counter() - t1
        seq = out.sequences if hasattr(out, "sequences") else out
        tokens = [int(t) for t in seq[0, len(prompt):].tolist()]
        # each new token is one full pass over the layers, prefill included
        return {"load_seconds": load, "seconds_per_token": elapsed / max(1, len(tokens)), "tokens": tokens,
                "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
                "note": "seconds per token = whole generate / new tokens (each is one pass over all layers)",
                "split_dir": str(split_dir.parent)}
    finally:
        shutil.rmtree(split_dir, ignore_errors=True)


PEERS = {"accelerate": run_accelerate, "naive": run_naive, "airllm": run_airllm}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=sorted(PEERS))
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--prompt", required=True, help="comma-separated token ids")
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--gpu-mem", type=int, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scratch", default=tempfile.gettempdir())
    args = ap.parse_args()
    prompt = [int(x) for x in args.prompt.split(",")]
    if args.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem / torch.cuda.get_device_properties(0).total_memory))
    try:
        result = PEERS[args.peer](args, prompt)
    except Exception as err:   # a peer failing is a result, not a crash of the bench
        result = {"error": f"{type(err).__name__}: {err}"[:2000]}
    print("PEER-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
