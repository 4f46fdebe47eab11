"""This machine's ceilings, measured: pinned host-to-device GB/s (one big copy, and back-to-back
copies of a checkpoint's real streamed groups), O_DIRECT disk GB/s with K reader threads, and one
layer's compute. `--preset auto --measure` and `ringllm bench` both use them; the disk ceiling
they judge by is the loaders' own (ringllm.disk_probe), the threaded read here is kept for
comparison (it underestimates the disk)."""
from __future__ import annotations

import mmap
import os
import statistics
import threading
import time
from dataclasses import replace

import torch

from ringllm.checkpoint.layout import ModelLayout

GIB = 2 ** 30


def measure_h2d(device: torch.device, total: int = 8 * GIB) -> float:
    """GB/s of back-to-back copies from pinned host memory (plain memcpy on the CPU)."""
    chunk = min(GIB, total)
    if device.type == "cuda":
        host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
        host.fill_(1)
        dst = torch.empty(chunk, dtype=torch.uint8, device=device)
        dst.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(total // chunk):
            dst.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        del host, dst
        torch.cuda.empty_cache()
    else:
        host, dst = torch.ones(chunk, dtype=torch.uint8), torch.empty(chunk, dtype=torch.uint8)
        dst.copy_(host)
        t0 = time.perf_counter()
        for _ in range(total // chunk):
            dst.copy_(host)
        seconds = time.perf_counter() - t0
    return (total // chunk) * chunk / seconds / 1e9


def measure_group_copies(layout: ModelLayout, layers: list[int], device: torch.device, group_budget: tuple[int, int],
                         min_bytes: int = 8 * GIB, max_host_bytes: int = 8 * GIB) -> dict:
    """The ceiling a perfect engine would reach: back-to-back copies of the real groups of the
    streamed layers, in pass order, on one stream, from pinned host memory laid out as ring slots
    into GPU group buffers sized by kind (as many as the engine has), nothing else running.
    Passes repeat until `min_bytes` have moved. Returns GB/s and what was copied."""
    from ringllm.shm.slot_plan import GroupViews, plan_layer, slot_size

    plans = {layer: plan_layer(layout, layer) for layer in layers}
    slot = slot_size(list(plans.values()))
    slots = max(1, min(len(layers), max_host_bytes // slot))
    cuda = device.type == "cuda"
    host = torch.empty(slots * slot, dtype=torch.uint8, pin_memory=cuda)
    host.fill_(1)
    views = {(layer, kind): GroupViews.plan(layout.group(layer, kind), plans[layer])
             for layer in layers for kind in ("attn", "ffn")}
    sizes = {kind: max(layout.max_group_bytes[kind], *(v.nbytes for (_, k), v in views.items() if k == kind))
             for kind in ("attn", "ffn")}     # as workers.streaming sizes its buffers
    n_attn, n_ffn = group_budget
    buffers = {"attn": [torch.empty(sizes["attn"], dtype=torch.uint8, device=device) for _ in range(max(1, n_attn))],
               "ffn": [torch.empty(sizes["ffn"], dtype=torch.uint8, device=device) for _ in range(max(1, n_ffn))]}
    work = []          # (src offset, dst kind, dst index, dst offset, bytes) per run, one pass
    used = {"attn": 0, "ffn": 0}
    for i, layer in enumerate(layers):
        base = (i % slots) * slot
        for kind in ("attn", "ffn"):
            dst = used[kind] % len(buffers[kind])
            used[kind] += 1
            for src, at, nbytes in views[layer, kind].runs:
                work.append((base + src, kind, dst, at, nbytes))
    pass_bytes = sum(w[4] for w in work)
    passes = max(1, -(-min_bytes // pass_bytes))

    def one_pass():
        for src, kind, dst, at, nbytes in work:
            buffers[kind][dst][at:at + nbytes].copy_(host[src:src + nbytes], non_blocking=cuda)

    if cuda:
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            one_pass()                                   # warm: first-touch costs out of the timing
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(passes):
                one_pass()
            end.record(stream)
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        one_pass()
        t0 = time.perf_counter()
        for _ in range(passes):
            one_pass()
        seconds = time.perf_counter() - t0
    del host, buffers
    if cuda:
        torch.cuda.empty_cache()
    return {"gbps": passes * pass_bytes / seconds / 1e9, "copies_per_pass": len(work), "pass_bytes": pass_bytes,
            "passes": passes, "host_slots": slots}


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def measure_disk(files: list[str], threads: int, max_bytes: int, max_seconds: float = 10.0,
                 chunk: int = 16 << 20) -> tuple[float, bool, int]:
    """GB/s reading the shards with O_DIRECT in `chunk` pieces from `threads` threads (buffered
    only where O_DIRECT is refused). Returns (GB/s, direct, bytes). Slower than the loaders on
    the H200 host (they read 1.14-1.18x this): for comparison; disk_probe measures the ceiling."""
    jobs = [(f, off) for f in files for off in range(0, os.path.getsize(f), chunk)]
    jobs = jobs[: max(1, max_bytes // chunk)]
    lock, done, direct_used = threading.Lock(), [0], [True]
    deadline = time.perf_counter() + max_seconds

    def worker():
        buf = mmap.mmap(-1, chunk)
        view = memoryview(buf)
        fds = {}
        while time.perf_counter() < deadline:
            with lock:
                if not jobs:
                    break
                path, off = jobs.pop(0)
            if path not in fds:
                try:
                    fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    fds[path] = os.open(path, os.O_RDONLY)
                    direct_used[0] = False
            n = os.preadv(fds[path], [view], off)
            with lock:
                done[0] += n
        for fd in fds.values():
            os.close(fd)
        view.release()
        buf.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return done[0] / (time.perf_counter() - t0) / 1e9, direct_used[0], done[0]


def measure_layer_compute(layout: ModelLayout, device: torch.device, dtype: torch.dtype,
                          prompt_tokens: int, prefill_tokens: int) -> tuple[float, float]:
    """Median ms of one layer (attn + ffn) at batch 1: a decode step after `prompt_tokens`, and a
    `prefill_tokens` prefill."""
    from ringllm.workers.model import KVCache, Llama, OneLayer, ResidentWeights, Segment, _AttentionPlan
    from ringllm.workers.resident import load_groups

    cfg = replace(layout.config, num_layers=1)
    groups = load_groups(layout, [0], dtype, device)[0]

    model = Llama(cfg, ResidentWeights(None, None, None), OneLayer(groups["attn"], groups["ffn"]), dtype, device)
    results = []
    for tokens, start in ((1, prompt_tokens), (prefill_tokens, 0)):
        cache = KVCache(cfg, 1, start + tokens, dtype, device)
        x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)
        cos, sin = model._rope(torch.arange(start, start + tokens, device=device)[None])
        plan = _AttentionPlan([Segment(0, [0] * tokens, start)], device)
        times = []
        for _ in range(7):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                y = model._attention(x, groups["attn"], 0, cache, cos, sin, plan)
                model._ffn(y, groups["ffn"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results.append(statistics.median(times[2:]) * 1e3)
    del groups
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results[0], results[1]
