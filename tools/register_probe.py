"""How cudaHostRegister behaves on pieces of one shared-memory segment (issue #12's start-up).

    python -m ringllm.tools.register_probe --out DIR [--gib 16] [--piece-gib 1]

Measures, on the machine it runs on, and writes DIR/register_probe.json:
  - first touch of fresh shared memory (a VM may grow its memory on first use),
  - cudaHostRegister of pieces whose pages another process already wrote (what a loader's
    O_DIRECT read leaves behind) against pieces nobody touched (cold),
  - that a tensor view of a registered piece reports pinned and copies from it run async,
  - H2D copy GB/s from registered pieces while another thread registers more pieces (does the
    driver serialize the two?), against the same copies alone,
  - unregistering piece by piece.
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import threading
import time
from pathlib import Path

import posix_ipc
import torch

GIB = 2 ** 30
MADV_POPULATE_WRITE = 23


def _write_pieces(name: str, size: int, start: int, end: int) -> float:
    shm = posix_ipc.SharedMemory(name)
    m = mmap.mmap(shm.fd, size)
    shm.close_fd()
    t0 = time.perf_counter()
    block = b"\x01" * (64 << 20)
    for off in range(start, end, len(block)):
        m[off:off + len(block)] = block
    m.close()
    return time.perf_counter() - t0


def _writer(name, size, start, end, q):
    q.put(_write_pieces(name, size, start, end))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gib", type=int, default=16)
    ap.add_argument("--piece-gib", type=float, default=1.0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    size, piece = a.gib * GIB, int(a.piece_gib * GIB)
    half = size // 2
    name = f"/ringllm-probe-{os.getpid()}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    res: dict = {"card": torch.cuda.get_device_name(0), "gib": a.gib, "piece_gib": a.piece_gib}
    try:
        m = mmap.mmap(shm.fd, size)
        shm.close_fd()
        t = torch.frombuffer(m, dtype=torch.uint8)
        torch.cuda.init()
        torch.empty(1, device="cuda")
        cudart = torch.cuda.cudart()
        # another process writes the first half (as loaders do), timed: first touch of fresh memory
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_writer, args=(name, size, 0, half, q))
        p.start()
        w = q.get(timeout=600)
        p.join()
        res["other_process_first_write_gbps"] = half / w / 1e9
        # register the written half piece by piece (our mapping has no page-table entries yet)
        warm = []
        for off in range(0, half, piece):
            t0 = time.perf_counter()
            err = int(cudart.cudaHostRegister(t[off:].data_ptr(), piece, 0))
            warm.append(time.perf_counter() - t0)
            assert err == 0, err
        res["register_written_s_per_gib"] = sum(warm) / (half / GIB)
        res["register_written_piece_s"] = warm
        view = t[GIB // 2: GIB // 2 + (64 << 20)]
        res["view_is_pinned"] = bool(view.is_pinned())
        dst = torch.empty(GIB, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(t[:GIB], non_blocking=True)
        res["async_copy_host_call_ms"] = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        res["async_copy_total_ms"] = (time.perf_counter() - t0) * 1e3
        # copies alone: 8 x 1 GiB from the registered half
        def copy_rate(reps=8):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for k in range(reps):
                off = (k % max(1, half // GIB - 1)) * GIB
                dst.copy_(t[off:off + GIB], non_blocking=True)
            e.record()
            e.synchronize()
            return reps * GIB / (s.elapsed_time(e) / 1e3) / 1e9
        copy_rate(2)
        res["copy_alone_gbps"] = copy_rate()
        # cold pieces of the second half registered on a thread while copies run
        cold: list[float] = []

        def register_cold():
            for off in range(half, size, piece):
                t0 = time.perf_counter()
                err = int(cudart.cudaHostRegister(t[off:].data_ptr(), piece, 0))
                cold.append(time.perf_counter() - t0)
                assert err == 0, err
        th = threading.Thread(target=register_cold)
        t0 = time.perf_counter()
        th.start()
        rates, launch_ms = [], []
        while th.is_alive():
            rates.append(copy_rate(4))
            # a tiny kernel's launch-to-done while registration runs
            s = time.perf_counter()
            dst[:16].add_(1)
            torch.cuda.synchronize()
            launch_ms.append((time.perf_counter() - s) * 1e3)
        th.join()
        res["register_cold_s_per_gib_with_copies"] = sum(cold) / ((size - half) / GIB)
        res["register_cold_piece_s"] = cold
        res["copy_gbps_while_registering"] = rates
        res["tiny_kernel_ms_while_registering"] = launch_ms
        # unregister piece by piece
        t0 = time.perf_counter()
        for off in range(0, size, piece):
            assert int(cudart.cudaHostUnregister(t[off:].data_ptr())) == 0
        res["unregister_s_per_gib"] = (time.perf_counter() - t0) / (size / GIB)
        # a second register of already-faulted memory (our mapping now has its PTEs)
        t0 = time.perf_counter()
        for off in range(0, half, piece):
            assert int(cudart.cudaHostRegister(t[off:].data_ptr(), piece, 0)) == 0
        res["register_again_s_per_gib"] = (time.perf_counter() - t0) / (half / GIB)
        for off in range(0, half, piece):
            cudart.cudaHostUnregister(t[off:].data_ptr())
        del t, view
    finally:
        posix_ipc.unlink_shared_memory(name)
    (a.out / "register_probe.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1))
    print("copy_gbps_while_registering", [round(r, 1) for r in res["copy_gbps_while_registering"]])
    print("tiny_kernel_ms", [round(r, 2) for r in res["tiny_kernel_ms_while_registering"]][:20])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
