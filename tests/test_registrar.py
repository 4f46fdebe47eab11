"""workers.registrar on the CPU, with a stand-in for the CUDA runtime: which slots get pinned,
when, and what a failure does. (On a GPU, tests/test_gpu.py checks the real thing: the ring reads
as pinned and every pinned byte comes back.)"""
from __future__ import annotations

import os
import threading
import time

import posix_ipc
import pytest
import torch

from ringllm.shm.ring import LOADING, READY, Ring
from ringllm.workers.registrar import RegisterError, SlotRegistrar

SLOT = 4 * 4096


class FakeRuntime:
    def __init__(self, fail_at: int | None = None):
        self.registered, self.unregistered, self.fail_at = [], [], fail_at
        self.lock = threading.Lock()

    def cudaHostRegister(self, ptr, size, flags):
        with self.lock:
            if self.fail_at is not None and len(self.registered) == self.fail_at:
                return 2
            self.registered.append((ptr, size))
            return 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def ring():
    name = f"/ringllm-test-registrar-{os.getpid()}"
    r = Ring.create(name, 4, SLOT, loaders=1)
    yield r
    r.close()
    posix_ipc.unlink_shared_memory(name)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_slots_are_pinned_once_each_when_they_become_ready(ring):
    tensor = torch.frombuffer(ring.map, dtype=torch.uint8)
    cuda = FakeRuntime()
    reg = SlotRegistrar(ring, tensor, cuda=True, cudart=cuda)
    ring.write_slot(2, READY, 5, 1)
    ring.write_slot(0, LOADING, 3, 1)            # still being written: not yet
    reg.begin(streamed_layers=3)
    wait_for(lambda: reg.registered[2])
    assert not reg.ready(0) and reg.ready(2)
    ring.write_slot(0, READY, 3, 1)
    wait_for(lambda: reg.registered[0])
    ring.write_slot(2, READY, 6, 2)              # refilled: stays registered, not registered again
    time.sleep(0.05)
    base = tensor.data_ptr()
    assert cuda.registered == [(base + ring.slot_base(2), SLOT), (base + ring.slot_base(0), SLOT)]
    reg.stop.set()
    reg.join(5)
    reg.unregister_all()
    assert sorted(cuda.unregistered) == sorted(p for p, _ in cuda.registered)
    assert reg.registered_bytes == 2 * SLOT and reg.first_at <= reg.last_at


def test_a_failed_registration_is_raised_to_the_copier(ring):
    tensor = torch.frombuffer(ring.map, dtype=torch.uint8)
    reg = SlotRegistrar(ring, tensor, cuda=True, cudart=FakeRuntime(fail_at=0))
    ring.write_slot(1, READY, 0, 1)
    reg.begin(streamed_layers=4)
    reg.join(5)
    with pytest.raises(RegisterError, match=r"cudaHostRegister of ring slot 1 .* failed \(error 2\)"):
        reg.ready(1)


def test_an_exception_in_the_thread_is_raised_to_the_copier_too(ring):
    class Broken(FakeRuntime):
        def cudaHostRegister(self, ptr, size, flags):
            raise OSError("driver gone")
    tensor = torch.frombuffer(ring.map, dtype=torch.uint8)
    reg = SlotRegistrar(ring, tensor, cuda=True, cudart=Broken())
    ring.write_slot(0, READY, 0, 1)
    reg.begin(streamed_layers=4)
    reg.join(5)
    with pytest.raises(RegisterError, match="OSError: driver gone"):
        reg.ready(0)


def test_on_the_cpu_every_slot_counts_as_registered(ring):
    reg = SlotRegistrar(ring, torch.frombuffer(ring.map, dtype=torch.uint8), cuda=False)
    assert all(reg.ready(s) for s in range(4))
