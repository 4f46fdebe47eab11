"""RingPolicy and JobDispatcher driven directly: window wrap, water marks, back margin, held
slots, nearest-first order; plus a randomized simulation of the whole protocol."""
from __future__ import annotations

import random

import pytest

from ringllm.coordinator.policy import JobDispatcher, ProtocolError, RingPolicy
from ringllm.shm.ring import FREE, LOADING, READY


def load_all(policy):
    """Schedule, then complete every load; return the layers loaded, in order."""
    loads, _ = policy.schedule()
    for load in loads:
        policy.loaded(load.slot, load.generation)
    return [l.layer for l in loads]


def resident(policy):
    return sorted(s.layer for s in policy.slots if s.state != FREE)


def test_window_wraps_mod_n():
    p = RingPolicy(num_layers=10, slots=4, offset=2, cap=4)
    p.want(8, compute_step=8)
    assert p.window() == [0, 1, 2, 3]
    p2 = RingPolicy(num_layers=10, slots=4, offset=2, cap=4, ring_mode=0)
    p2.want(6, compute_step=6)
    assert p2.window() == [8, 9]          # no wrap: the window stops at the end of the pass
    assert p2.target_layers() == [6, 7, 8, 9]


def test_targets_nearest_first_from_compute_then_window():
    p = RingPolicy(num_layers=80, slots=12, offset=4, cap=12)
    p.want(44, compute_step=44)
    assert p.window() == list(range(48, 60))
    assert p.target_layers() == list(range(44, 60))
    assert load_all(p) == list(range(44, 56))   # 12 slots, nearest first


def test_target_wraps_into_next_pass():
    p = RingPolicy(num_layers=6, slots=6, offset=1, cap=3)
    p.want(10, compute_step=10)          # layer 4 of pass 1
    assert p.target_layers() == [4, 5, 0, 1]


def test_held_slot_is_never_reused():
    p = RingPolicy(num_layers=10, slots=3, offset=0, cap=3)
    for s in range(3):
        p.want(s, 0)
    assert load_all(p) == [0, 1, 2]
    _, offers = p.schedule()
    assert [o.layer for o in offers] == [0, 1, 2]
    gens = [s.generation for s in p.slots]
    p.want(5, compute_step=5)            # compute jumped ahead; every slot is still held
    loads, _ = p.schedule()
    assert loads == [] and [s.generation for s in p.slots] == gens
    o = offers[0]
    p.release(o.step, o.slot, o.generation, compute_step=5)
    loads, _ = p.schedule()
    assert [l.layer for l in loads] == [5] and loads[0].slot == o.slot
    assert loads[0].generation == o.generation + 1


def test_release_errors():
    p = RingPolicy(num_layers=4, slots=2, offset=0, cap=2)
    p.want(0, 0)
    load_all(p)
    _, offers = p.schedule()
    with pytest.raises(ProtocolError):
        p.release(0, offers[0].slot, offers[0].generation + 1, 0)    # stale generation
    p.release(0, offers[0].slot, offers[0].generation, 0)
    with pytest.raises(ProtocolError):
        p.release(0, offers[0].slot, offers[0].generation, 0)        # released twice


def test_high_and_low_water_marks():
    p = RingPolicy(num_layers=20, slots=8, offset=0, cap=8, hwm=6, lwm=3)
    assert load_all(p) == list(range(8))  # all targets: above HWM, but nothing may be evicted
    assert resident(p) == list(range(8))
    p.want(10, compute_step=10)           # targets 10..17; resident 8 > HWM 6 -> down to LWM 3
    loads = load_all(p)
    assert p.stats.evictions == 8 - 3 + (len(loads) - 5) * 1 or p.stats.evictions >= 5
    assert loads[:5] == [10, 11, 12, 13, 14]
    assert resident(p)[:3] == [5, 6, 7] or len(resident(p)) == 8


def test_eviction_order_back_margin_last_then_farthest_first():
    p = RingPolicy(num_layers=10, slots=4, offset=0, cap=2, back_margin=2, lwm=2, hwm=4)
    assert load_all(p) == [0, 1]
    p.want(4, compute_step=4)
    assert load_all(p) == [4, 5]          # free slots first: nothing evicted yet
    assert p.stats.evictions == 0
    p.want(6, compute_step=6)             # needs 2 slots; 4 and 5 are the back margin
    assert load_all(p) == [6, 7]
    assert resident(p) == [4, 5, 6, 7]


def test_farthest_next_use_evicted_first():
    p = RingPolicy(num_layers=10, slots=3, offset=0, cap=1, lwm=2, hwm=3)
    for step in (2, 5, 8):
        p.want(step, compute_step=step)
        load_all(p)
        _, offers = p.schedule()
        for o in offers:
            p.release(o.step, o.slot, o.generation, step)
    assert resident(p) == [2, 5, 8]
    p.want(9, compute_step=9)             # next uses from 9: layer 2 in 3, 5 in 6, 8 in 9 steps
    load_all(p)
    assert resident(p) == [2, 5, 9]


def test_dispatcher_depth_balance_and_requeue():
    d = JobDispatcher(num_loaders=2, depth=2)
    d.add_load(slot=0, generation=1, chunks=list("abcde"))
    first = d.assign()
    assert len(first) == 4 and sorted(l for l, _ in first) == [0, 0, 1, 1]
    held_by_0 = [j.job for l, j in first if l == 0]
    assert d.requeue_loader(0) == 2
    again = d.assign()
    assert sorted(j.job for _, j in again) == sorted(held_by_0)
    for loader, job in first:
        if loader == 1:
            assert d.done(1, job.job) is None
    for loader, job in again:
        d.done(loader, job.job)
    rest = d.assign()
    assert [j.chunk for _, j in rest] == ["e"]
    assert d.done(rest[0][0], rest[0][1].job) == (0, 1)


@pytest.mark.parametrize("case", range(12))
def test_randomized_protocol_simulation(case):
    """A simulated GPU walks many passes while loads finish in random order; invariants hold."""
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    slots = rng.randint(1, 10)
    ahead = rng.randint(1, slots)
    p = RingPolicy(n, slots, offset=rng.randint(0, 4), cap=slots, ring_mode=rng.randint(0, 1),
                   hwm=rng.randint(2, slots + 3), lwm=None, back_margin=rng.randint(0, 4))
    p.lwm = rng.randint(0, p.hwm - 1)
    loading, held, compute, wanted = [], {}, 0, -1
    for _ in range(4000):
        if compute >= 6 * n:
            break
        while wanted < compute + ahead:
            wanted += 1
            p.want(wanted, compute)
        loads, offers = p.schedule()
        loading += loads
        for o in offers:
            assert o.layer == o.step % n
            assert p.slots[o.slot].layer == o.layer and p.slots[o.slot].state == READY
            held[o.step] = o
        for o in held.values():   # a held slot keeps its layer and generation
            assert p.slots[o.slot].generation == o.generation and p.slots[o.slot].layer == o.layer
        if loading and rng.random() < 0.7:
            load = loading.pop(rng.randrange(len(loading)))
            p.loaded(load.slot, load.generation)
        if compute in held and rng.random() < 0.8:
            o = held.pop(compute)
            compute += 1
            p.release(o.step, o.slot, o.generation, compute)
    assert compute >= 6 * n, f"stalled at step {compute} (seed={seed})"


def test_resident_layers_do_not_count_in_the_window():
    """With layers 0..8 on the GPU, a 13-slot ring fills with all 13 streamed layers at start."""
    p = RingPolicy(num_layers=22, slots=13, offset=4, cap=13)
    p.set_resident(9)
    assert p.target_layers()[:13] == list(range(9, 22))
    assert load_all(p) == list(range(9, 22))
    p2 = RingPolicy(num_layers=22, slots=13, offset=0, cap=13, ring_mode=0)
    p2.set_resident(20)
    assert p2.target_layers() == [20, 21]
