"""SlotRegistrar: pins the ring for CUDA slot by slot, as the loaders fill it.

Registering the whole ring before loading starts cost about 1.2 s per GiB (the pages faulted
cold, then pinned) and sat on the critical path of the first token. A slot the loaders filled is
already faulted in the shared segment, and registering it measured 0.11 s/GiB on an H200 host
against 0.39 s/GiB cold (tools/register_probe.py, docs/benchmarks.md). So a thread of the GPU
process registers each slot the first time it is READY, while the loaders fill the others, and
each slot stays registered for the rest of the run.

Invariant [P18]: the copier starts no copy out of a slot that is not registered yet
(StreamingSource holds such offers back). A non_blocking copy from pageable memory would still be
correct, but synchronous: the host would stall in it instead of feeding the copy engine.

The driver serializes cudaHostRegister with copies issued meanwhile (copies stalled while a
thread registered, in the probe); in the first pass the copies wait for the disk anyway, and
once every slot that is used is registered nothing is registered again.
"""
from __future__ import annotations

import logging
import threading
import time

from ringllm.shm.ring import READY, Ring

log = logging.getLogger("ringllm.gpu")
POLL_S = 0.002          # while slots the run needs are still unpinned
IDLE_POLL_S = 0.05      # after: a slot filled only later (a ring larger than what streams) is rare


class RegisterError(RuntimeError):
    pass


class SlotRegistrar(threading.Thread):
    def __init__(self, ring: Ring, ring_tensor, cuda: bool, device=None, cudart=None):
        super().__init__(name="ringllm-gpu-register", daemon=True)
        self.ring, self.ring_tensor, self.cuda, self.device = ring, ring_tensor, cuda, device
        self._cudart = cudart          # tests pass a stand-in; else torch.cuda.cudart()
        self.needed = ring.slot_count
        # one bool per slot, set once by this thread; the main thread only reads it (a list item
        # store is atomic under the GIL). Without CUDA there is nothing to register.
        self.registered = [not cuda] * ring.slot_count
        self.stop = threading.Event()
        self.error: str | None = None
        self.registered_bytes = 0
        self.seconds = 0.0                   # inside cudaHostRegister, summed
        self.first_at: float | None = None   # time.monotonic() of the first and last registration
        self.last_at: float | None = None

    def begin(self, streamed_layers: int) -> None:
        """Start registering; the run fills one slot per streamed layer, at most the ring's (after
        those it polls slowly)."""
        self.needed = min(self.ring.slot_count, streamed_layers)
        self.start()

    def ready(self, slot: int) -> bool:
        if self.error is not None:
            raise RegisterError(self.error)
        return self.registered[slot]

    @property
    def all_registered(self) -> bool:
        return all(self.registered)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:    # the copier raises it (ready) instead of waiting for a slot
            self.error = f"registering the ring with CUDA failed: {type(err).__name__}: {err}"

    def _run(self) -> None:
        import torch

        if self.device is not None:
            torch.cuda.set_device(self.device)   # per host thread: pin in the run's device's context
        cudart = self._cudart or torch.cuda.cudart()
        size = self.ring.slot_size
        while not self.stop.is_set() and not self.all_registered:
            for slot in range(self.ring.slot_count):
                if self.registered[slot] or self.stop.is_set():
                    continue
                # READY: every byte of the slot was written, so its pages are faulted in
                if self.ring.read_slot(slot)[0] != READY:
                    continue
                ptr = self.ring_tensor[self.ring.slot_base(slot):].data_ptr()
                t0 = time.monotonic()
                err = int(cudart.cudaHostRegister(ptr, size, 0))
                t1 = time.monotonic()
                if err != 0:
                    self.error = f"cudaHostRegister of ring slot {slot} ({size / 2**20:.0f} MiB) failed (error {err})"
                    return
                self.seconds += t1 - t0
                self.first_at = self.first_at or t0
                self.last_at = t1
                self.registered_bytes += size
                self.registered[slot] = True
            self.stop.wait(POLL_S if sum(self.registered) < self.needed else IDLE_POLL_S)

    def unregister_all(self) -> None:
        """After the thread has stopped and the device is synchronized: give every page back.
        A thread still inside a registration keeps its pages until the process exits."""
        if not self.cuda or self.is_alive():
            if self.is_alive():
                log.error("the ring registration thread did not stop; its pages unpin at exit")
            return
        import torch

        cudart = self._cudart or torch.cuda.cudart()
        for slot, done in enumerate(self.registered):
            if done:
                err = int(cudart.cudaHostUnregister(self.ring_tensor[self.ring.slot_base(slot):].data_ptr()))
                if err != 0:   # the pages stay pinned until this process exits
                    log.error("cudaHostUnregister of ring slot %d failed (error %d)", slot, err)
        self.registered = [False] * len(self.registered)

    def report(self) -> dict:
        return {"registered_bytes": self.registered_bytes, "register_seconds": self.seconds,
                "register_first_at": self.first_at, "register_last_at": self.last_at}
