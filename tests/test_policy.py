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


def spec_targets(p: RingPolicy, compute: int, handed: set[int], wants: set[int]) -> list[int]:
    """The ring's targets as policy.py's docstring defines them, written from that text: the
    layers of the first offset + cap streamed steps from compute on (not past the pass end
    without ring mode) and of every wanted step, leaving out steps already handed to the GPU;
    nearest first, each layer once."""
    n, resident = p.n, p.resident_layers
    streamed, step = [], compute
    if resident < n:
        while len(streamed) < p.offset + p.cap:
            if not p.ring_mode and step >= (compute // n + 1) * n:
                break
            if step % n >= resident:
                streamed.append(step)
            step += 1
    out = []
    for s in sorted((set(streamed) - handed) | wants):
        if s % n not in out:
            out.append(s % n)
    return out


def eviction_key(p: RingPolicy, compute: int, layer: int) -> tuple[bool, int]:
    """Smaller goes first: back-margin layers last, otherwise the farthest next use first."""
    i = compute % p.n
    in_margin = any((i - k) % p.n == layer for k in range(1, p.back_margin + 1))
    return in_margin, -((layer - compute) % p.n)


def simulate(seed: int) -> None:
    """A simulated GPU walks six passes (wanting `ahead` streamed steps past compute, releasing
    in order) while loads finish in random order. After every schedule() the spec's invariants
    are checked against the slot table:
      offers: strictly in step order, each of a wanted step, from a READY slot holding its layer;
      held slots keep their layer and generation until released;
      loads: only of target layers not already in the ring, and a target is left out only when
      no slot could take it (check_work_conserving);
      evictions: only above the HWM or for a load; non-targets in eviction_key order; a target
      only for a nearer target, the farthest first (check_evictions);
      no stall.
    The targets come from spec_targets, not from the policy itself."""
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    cap = rng.randint(1, 10)
    slots = cap + rng.choice([0, 0, 0, 1, 2])        # the engine's ring has cap slots; the policy allows more
    ahead = rng.randint(1, cap)
    p = RingPolicy(n, slots, offset=rng.randint(0, 4), cap=cap, ring_mode=rng.randint(0, 1),
                   hwm=rng.randint(2, slots + 3), lwm=None, back_margin=rng.randint(0, 4))
    p.lwm = rng.randint(0, p.hwm - 1)
    resident = rng.choice([0, 0, rng.randint(0, n)])     # layers 0..resident-1 stay on the GPU
    p.set_resident(resident)
    streamed = [s for s in range((7 + ahead) * n) if s % n >= resident]   # all steps the GPU may want
    where = f"seed={seed} (n={n} slots={slots} cap={cap} ahead={ahead} offset={p.offset} ring_mode={p.ring_mode} " \
            f"hwm={p.hwm} lwm={p.lwm} back_margin={p.back_margin} resident={resident})"
    loading, held, wants = [], {}, set()
    compute, next_want, last_offered = 0, 0, -1
    for _ in range(4000):
        if compute >= 6 * n:
            break
        # the GPU asks for the streamed steps up to `ahead` streamed steps past compute
        horizon = ([s for s in streamed if s > compute][:ahead] or [compute])[-1]
        while next_want < len(streamed) and streamed[next_want] <= horizon:
            p.want(streamed[next_want], compute)
            wants.add(streamed[next_want])
            next_want += 1
        before = [(info.state, info.layer, info.held, info.generation) for info in p.slots]
        targets = spec_targets(p, compute, set(held), wants)
        loads, offers = p.schedule()
        for o in offers:
            assert o.step > last_offered, f"step {o.step} offered after step {last_offered}; {where}"
            assert o.step in wants and o.layer == o.step % n, f"offer {o} was not wanted; {where}"
            assert p.slots[o.slot].layer == o.layer and p.slots[o.slot].state == READY, where
            wants.discard(o.step)
            held[o.step], last_offered = o, o.step
        for o in held.values():
            assert p.slots[o.slot].generation == o.generation and p.slots[o.slot].layer == o.layer, \
                f"held slot {o.slot} (step {o.step}, layer {o.layer}) was reused; {where}"
        was_in_ring = {layer for state, layer, *_ in before if state != FREE}
        for load in loads:
            assert load.layer in targets, f"loaded layer {load.layer}, targets are {targets}; {where}"
            assert load.layer not in was_in_ring, f"layer {load.layer} was in the ring and is read again; {where}"
        check_work_conserving(p, targets, where)
        check_evictions(p, compute, before, targets, loads, where)
        loading += loads
        if loading and rng.random() < 0.7:
            load = loading.pop(rng.randrange(len(loading)))
            p.loaded(load.slot, load.generation)
        if compute % n < resident:
            compute += 1                                   # a GPU-resident layer needs no slot
        elif compute in held and rng.random() < 0.8:
            o = held.pop(compute)
            compute += 1
            p.release(o.step, o.slot, o.generation, compute)
    assert compute >= 6 * n, f"stalled at step {compute}; {where}"


def check_work_conserving(p, targets, where):
    """A target missing from the ring means no slot could take it: none FREE, none READY and
    unheld with a non-target, none READY and unheld with a farther target."""
    in_ring = {info.layer for info in p.slots if info.state != FREE}
    missing = [t for t in targets if t not in in_ring]
    if not missing:
        return
    nearest = targets.index(missing[0])
    for slot, info in enumerate(p.slots):
        usable = info.state == FREE or (info.state == READY and info.held == 0 and (
            info.layer not in targets or targets.index(info.layer) > nearest))
        assert not usable, (f"target {missing[0]} is not in the ring, but slot {slot} (state {info.state}, "
                            f"layer {info.layer}) could take it; targets {targets}; {where}")


def check_evictions(p, compute, before, targets, loads, where):
    """Compare the slot table before schedule() (`before`) with the one after it."""
    evicted_free, kept, taken, untaken = [], [], [], []
    for slot, (state, layer, held, generation) in enumerate(before):
        if state != READY or held:
            continue
        now = p.slots[slot]
        gone = now.generation != generation or now.state == FREE
        if layer in targets:
            (taken if gone else untaken).append(layer)
            if gone:     # only the farther-target takeover may do this, for a nearer target
                assert now.state == LOADING and targets.index(now.layer) < targets.index(layer), \
                    f"target layer {layer} (slot {slot}) evicted for {now.layer}, targets {targets}; {where}"
        else:
            (evicted_free if gone else kept).append(layer)
    if taken and untaken:   # the takeover takes the farthest targets first
        assert max(targets.index(l) for l in untaken) < min(targets.index(l) for l in taken), \
            f"took target {taken} while farther target {untaken} stayed, targets {targets}; {where}"
    if evicted_free:        # above the high-water mark, or a load found no free slot
        resident = sum(1 for state, *_ in before if state != FREE)
        free = len(before) - resident
        assert resident > p.hwm or len(loads) > free, \
            f"evicted {evicted_free} with {resident} resident (HWM {p.hwm}) and {free} free slots; {where}"
    if evicted_free and kept:
        worst = max(evicted_free, key=lambda l: eviction_key(p, compute, l))
        best = min(kept, key=lambda l: eviction_key(p, compute, l))
        assert eviction_key(p, compute, worst) < eviction_key(p, compute, best), (
            f"evicted layer {worst} but kept layer {best} (compute {compute}, back margin {p.back_margin}); {where}")


# Each of these seeds makes the simulation fail with some realistic bug planted in RingPolicy,
# and between them every such bug fails at least 3 of them (a held slot evicted or taken over,
# wants handed out of order, the horizon one off either way, back margin ignored or one off,
# nearest next use evicted first, ring mode ignored, HWM as >=, takeover of the nearest
# farther target); 88 catches a short horizon with as many slots as the window (the engine's
# ring), where a long one cannot show. The sweep and the fresh seeds widen the search.
FIXED_SEEDS = [17, 24, 41, 48, 88, 103, 115, 701, 731, 1763]


@pytest.mark.parametrize("seed", FIXED_SEEDS)
def test_randomized_protocol_simulation(seed):
    """A simulated GPU walks many passes while loads finish in random order; invariants hold.
    Reproduce any failure with simulate(seed); the message names the seed."""
    simulate(seed)


def test_randomized_protocol_sweep():
    for seed in range(1000):
        simulate(seed)


@pytest.mark.parametrize("run", range(4))
def test_randomized_protocol_fresh_seed(run):
    seed = random.randrange(2**32)
    print(f"seed={seed}")           # shown with the failure; simulate(seed) reproduces it
    simulate(seed)


def test_resident_layers_do_not_count_in_the_window():
    """With layers 0..8 on the GPU, a 13-slot ring fills with all 13 streamed layers at start."""
    p = RingPolicy(num_layers=22, slots=13, offset=4, cap=13)
    p.set_resident(9)
    assert p.target_layers()[:13] == list(range(9, 22))
    assert load_all(p) == list(range(9, 22))
    p2 = RingPolicy(num_layers=22, slots=13, offset=0, cap=13, ring_mode=0)
    p2.set_resident(20)
    assert p2.target_layers() == [20, 21]


def walk_passes(p: RingPolicy, passes: int, ahead: int = 1) -> list[list[int]]:
    """A GPU in step order: want each streamed step and `ahead` more, take offers, release each
    step when compute moves past it; loads finish at once. Returns the layers loaded, per pass
    of the compute step at the time."""
    n, loaded = p.n, [[] for _ in range(passes)]
    streamed = [s for s in range(passes * n) if s % n >= p.resident_layers]
    held = {}
    for k, step in enumerate(streamed):
        for s in streamed[k:k + ahead + 1]:
            p.want(s, step)
        while step not in held:
            loads, offers = p.schedule()
            assert loads or offers, f"stalled at step {step}"
            for load in loads:
                loaded[step // n].append(load.layer)
                p.loaded(load.slot, load.generation)
            held.update({o.step: o for o in offers})
        o = held.pop(step)
        p.release(o.step, o.slot, o.generation, step + 1)
    return loaded


def test_pinned_layers_are_read_once_the_rest_every_pass():
    """CPU_PINNED_LAYERS=5 on 16 layers, 3 of them GPU-resident, a 7-slot ring: layers 3..7 are
    loaded in the first pass and never again, each of 8..15 again for every pass through the
    other 2 slots [P17]."""
    p = RingPolicy(num_layers=16, slots=7, offset=1, cap=7, pinned=5, back_margin=2)
    p.set_resident(3)
    loaded = walk_passes(p, passes=4)
    pinned, disk = range(3, 8), range(8, 16)
    later = [layer for layers in loaded[1:] for layer in layers]      # loads once compute was past pass 0
    for layer in pinned:
        assert loaded[0].count(layer) == 1, f"pinned layer {layer} loaded {loaded[0].count(layer)}x in pass 0"
        assert layer not in later, f"pinned layer {layer} was read again after the first pass: {loaded}"
    every = [layer for layers in loaded for layer in layers]
    for layer in disk:       # the 2-slot window cannot keep them: each is read again for every pass
        assert every.count(layer) >= 4, f"disk layer {layer} loaded {every.count(layer)}x in 4 passes: {loaded}"
    assert sorted(info.layer for info in p.slots if info.state == READY and info.layer in pinned) == list(pinned)


def test_pinned_slot_is_not_taken_for_a_nearer_target():
    """Compute at step 5 wants 5, 6 (layer 0) and 7 (layer 1); the GPU still holds layers 3 and 4
    (their Releases are in flight). Layer 5 waits for one of them; it must not take the slot of
    pinned layer 1, although 1 is a farther target, READY and unheld [P17]."""
    p = RingPolicy(num_layers=6, slots=4, offset=2, cap=4, pinned=2, back_margin=0)
    p.set_resident(0)
    held = {}
    for step in range(5):
        p.want(step, step)
        while step not in held:
            loads, offers = p.schedule()
            for load in loads:
                p.loaded(load.slot, load.generation)
            held.update({o.step: o for o in offers})
        if step < 3:
            o = held.pop(step)
            p.release(o.step, o.slot, o.generation, step + 1)
    homes = {layer: (slot, p.slots[slot].generation) for layer, slot in p.layer_slot.items() if layer < 2}
    assert sorted(p.layer_slot) == [0, 1, 3, 4] and len(homes) == 2
    for step in (5, 6, 7):
        p.want(step, 5)
    loads, offers = p.schedule()
    assert loads == [] and offers == [], (loads, offers)
    assert {layer: (slot, p.slots[slot].generation) for layer, slot in p.layer_slot.items() if layer < 2} == homes
    o = held.pop(3)
    p.release(o.step, o.slot, o.generation, 5)
    loads, _ = p.schedule()
    assert [(l.layer, l.slot) for l in loads] == [(5, o.slot)]
