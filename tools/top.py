"""`ringllm top`: watch a running ringllm from another terminal.

Finds the run through its manifest in /dev/shm (the newest live one, or --run ID), reads the
run's stats page and the ring's slot table (both shared memory, read-only here), and shows a
refreshing table: where compute is and the ring window mod N, ring slots by state, each loader's
GB/s, the copy queue depth and GPU groups, time compute waited for weights, tokens/s. It exits
when the run ends. Without a terminal it prints one line per refresh.
"""
from __future__ import annotations

import json
import mmap
import sys
import time

import posix_ipc

from ringllm.checkpoint.errors import RingllmError
from ringllm.shm.resources import PREFIX, SHM_DIR, _pid_alive, system_pinned_bytes
from ringllm.shm.ring import LOADING, READY, SlotTable, header_bytes
from ringllm.shm.seqlock import TornRecord
from ringllm.shm.stats import DONE, StatsPage


def find_run(run_id: str | None) -> dict:
    manifests = sorted(SHM_DIR.glob(f"{PREFIX}*.manifest"), key=lambda p: p.stat().st_mtime, reverse=True)
    for m in manifests:
        rid = m.name[len(PREFIX):-len(".manifest")]
        try:
            info = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if (run_id is None or rid == run_id) and _pid_alive(int(info.get("pid", 0))):
            return {"run_id": rid, **info}
    raise RingllmError(f"no running ringllm{' run ' + run_id if run_id else ''} found (looked in {SHM_DIR})")


class RingHeader:
    """The slot table of a ring, mapped read-only without the slots themselves."""

    def __init__(self, name: str, slots: int, loaders: int):
        shm = posix_ipc.SharedMemory(name, 0)
        self.map = mmap.mmap(shm.fd, header_bytes(slots, loaders), prot=mmap.PROT_READ)
        shm.close_fd()
        self.table = SlotTable(self.map)

    def states(self) -> list[tuple[int, int, int]]:
        return [self.table.read_slot(i) for i in range(self.table.slot_count)]

    def close(self) -> None:
        self.table.release()
        self.map.close()


def snapshot_lines(s: dict, prev: dict | None, dt: float, states, pinned: int | None = None) -> list[str]:
    c, g, n = s["coord"], s["gpu"], max(1, s["layers"])
    step = max(c["step"], g["step"])
    lines = [f"ringllm run (supervisor pid {s['pid']}), {n} layers, {s['slots']} ring slots, "
             f"{g['resident']} layers resident on the GPU",
             f"compute at layer {step % n} (pass {step // n}); CPU ring window {c['first']}..{c['last']} "
             f"(offset {c['offset']}, cap {c['cap']}, wraps at {n})"]
    ready = sum(1 for st, _, _ in states if st == READY)
    loading = sum(1 for st, _, _ in states if st == LOADING)
    held = " ".join(f"{l}" for st, l, _ in states if st != 0)
    lines.append(f"ring slots: {ready} ready, {loading} loading, {len(states) - ready - loading} free "
                 f"(layers: {held or '-'}); hits {c['hits']}, misses {c['misses']}")
    rates = []
    for k, ld in enumerate(s["loader"]):
        before = prev["loader"][k]["bytes"] if prev else ld["bytes"]
        rates.append(f"load{k} {(ld['bytes'] - before) / dt / 1e9 if dt else 0:.2f}")
    lines.append("loaders GB/s: " + (", ".join(rates) or "-") + f"; disk total {c['disk_bytes'] / 1e9:.2f} GB")
    h2d = (g["h2d_bytes"] - (prev["gpu"]["h2d_bytes"] if prev else g["h2d_bytes"])) / dt / 1e9 if dt else 0.0
    lines.append(f"copy queue {g['in_flight']}, GPU groups {g['used']}/{g['total']}, to GPU {h2d:.2f} GB/s, "
                 f"compute waited {g['wait_s']:.2f} s")
    tps = (g["tokens"] - (prev["gpu"]["tokens"] if prev else g["tokens"])) / dt if dt else 0.0
    lines.append(f"tokens {g['tokens']}, {tps:.2f} tokens/s"
                 + (f"; host memory pinned (machine-wide) {pinned / 2**30:.2f} GiB" if pinned is not None else ""))
    return lines


def run_top(run_id: str | None = None, interval: float = 0.5, once: bool = False) -> int:
    run = find_run(run_id)
    rid = run["run_id"]
    page = StatsPage(f"/{PREFIX}{rid}-stats")
    first = page.read()
    ring = RingHeader(f"/{PREFIX}{rid}-ring", first["slots"], first["loaders"])
    live = None
    if sys.stdout.isatty() and not once:
        from rich.live import Live
        from rich.text import Text
        live = Live(Text(""), refresh_per_second=4, transient=False)
        live.start()
    prev, prev_t = None, time.monotonic()
    try:
        while True:
            try:
                s = page.read()
                states = ring.states()
            except (ValueError, OSError, TornRecord):   # the run is gone, or died mid-write
                break
            now = time.monotonic()
            lines = snapshot_lines(s, prev, now - prev_t if prev else 0.0, states, system_pinned_bytes())
            if live is not None:
                from rich.text import Text
                live.update(Text("\n".join(lines)))
            else:
                print(" | ".join(lines), flush=True)
            if once or s["status"] == DONE or not _pid_alive(s["pid"] or run["pid"]):
                break
            prev, prev_t = s, now
            time.sleep(interval)
    finally:
        if live is not None:
            live.stop()
        ring.close()
        page.close()
    print(f"ringllm top: run {rid} ended" if not once else "", file=sys.stderr)
    return 0
