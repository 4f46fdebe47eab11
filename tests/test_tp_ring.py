"""One ring, several consumers (issue #16, the coordinator's side of tensor parallel): N GPU
processes ("ranks") copy their share of every layer out of the same ring slots, in lock-step.

The GPU process's scheduler as 2 and 3 ranks, driven with the real coordinator over the simulated
transports and loaders of tests/test_scheduler.py: each sender's messages in its own order, but
which sender's next message is delivered, and which rank acts first, at random. A rank computes a
group only once every other rank has computed the group before it (they exchange activations
after every group). Every run must finish every pass on every rank and keep:

  T1  every step is offered exactly once to each rank (a slow rank's Want for a step offered
      already makes no second offer) [P19]
  T2  a SlotReady waiting in any rank's queue names a slot the header holds READY with that layer
      and generation: no slot is evicted or reassigned until every rank released it [P19]
  T3  each rank's copies read the offered layer's bytes, start to end; each rank computes every
      group in order from a verified copy of its own layer (or a resident one)
  T4  a LOADING slot changes only once its bytes have all landed
  T5  at the end, once every message is delivered, no slot is held
"""
from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter, deque

import msgpack
import posix_ipc
import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from ringllm.config import EngineConfig
from ringllm.coordinator.policy import ProtocolError, RingPolicy
from ringllm.shm import resources
from ringllm.shm.channel import PROTOCOL_VERSION, ChunkDone, Release, ResidentLayers, Want, decode, encode
from ringllm.shm.resources import RunNames
from ringllm.shm.ring import LOADING, READY
from ringllm.shm.slot_plan import plan_model, slot_size
from ringllm.tools.make_checkpoint import make_checkpoint
from ringllm.workers.scheduler import Lookahead, SlotOffer, StreamScheduler
from ringllm.workers.streaming import StreamingSource
from tests.test_scheduler import Mailbox, Stalled, coordinator_for, random_setup
from tests.test_warm_up import InProcessCoordinator, PolicyRing


class RankInbox(Mailbox):
    """A rank's queue from the coordinator; counts the offers of each step as they are sent (T1)."""

    def __init__(self, rank: int, seed: int):
        super().__init__()
        self.rank, self.seed, self.offers = rank, seed, Counter()

    def put(self, msg) -> None:
        self.offers[msg.step] += 1
        assert self.offers[msg.step] == 1, \
            f"seed {self.seed}: T1 step {msg.step} offered {self.offers[msg.step]} times to rank {self.rank}"
        super().put(msg)

    send = put


class Rank:
    """One GPU process: its scheduler, its messages to the coordinator, its copies."""

    def __init__(self, rank: int, s: dict, inbox: RankInbox):
        self.rank, self.inbox = rank, inbox
        self.sched = StreamScheduler(s["n"], s["resident"], s["look"], s["buffers"], passes=s["passes"])
        self.out: deque = deque()                   # Want and Release, in this rank's send order
        self.copies_running: dict[int, object] = {}  # g -> the slot's bytes when its copy started
        self.copies_done: set[int] = set()
        self.warm = set(self.sched.warm_up_groups(s["warmup"]))
        self.g_next = 0                             # the next group this rank computes
        self.delivery = 1.0                         # how often its next message may be delivered

    def pump(self) -> None:
        """What the GPU process's _pump sends: Wants, then Releases, each naming the rank."""
        sched = self.sched
        for step in sched.wants():
            self.out.append(Want(step, sched.compute, self.rank))
        for offer in sched.releases():
            self.out.append(Release(offer.step, offer.slot, offer.generation, sched.compute, self.rank))


def simulate_ranks(seed: int, ranks: int, max_events: int = 400_000, **setup) -> dict:
    rng = random.Random(seed)
    s = {**random_setup(rng), **setup}
    n, resident, passes = s["n"], s["resident"], s["passes"]
    coord, header, loader_boxes, _ = coordinator_for(s, ranks)
    inboxes = [RankInbox(r, seed) for r in range(ranks)]
    coord.gpus = inboxes                    # the counting queues in place of plain mailboxes
    group = [Rank(r, s, inboxes[r]) for r in range(ranks)]
    # a rank whose messages lag far behind the others' (a busy host): its Want for a step can
    # arrive after another rank computed past that step
    for r in group:
        r.delivery = rng.choice([1.0, 1.0, 0.2, 0.03])
    contents = {slot: None for slot in range(s["cap"] + s["pinned"])}
    writes_left: dict[tuple, int] = {}
    from_loaders: deque = deque()           # ChunkDone, in the loaders' send order
    late_wants = []                         # Wants for a step another rank had computed past

    def coordinator_handle(msg):
        if isinstance(msg, Want) and msg.step < coord.policy.compute_step:
            late_wants.append(msg)
        before = dict(header.records)
        coord.handle(msg)
        coord.step()
        for slot, (state, layer, gen) in before.items():                                       # T4
            if state == LOADING and header.records[slot] != (LOADING, layer, gen):
                assert contents[slot] == (layer, gen), \
                    f"seed {seed}: T4 LOADING slot {slot} became {header.records[slot]} before its bytes landed"
        for r in group:                                                                          # T2
            for m in r.inbox.pending:
                assert header.records[m.slot] == (READY, m.layer, m.generation), \
                    f"seed {seed}: T2 SlotReady {m} waits for rank {r.rank}; the header says {header.records[m.slot]}"

    def loader_step(k):
        job = loader_boxes[k].pending.popleft()
        key = (job.slot, job.generation)
        writes_left[key] = writes_left.get(key, s["chunks"]) - 1
        contents[job.slot] = (job.layer, job.generation) if writes_left[key] == 0 else ("partial", job.layer)
        from_loaders.append(ChunkDone(job.job, k, job.length, 0.0, True))

    def complete_copy(r: Rank, g: int):                                                          # T3
        start, copy = r.copies_running.pop(g), r.sched.copies[g]
        expect = (copy.offer.layer, copy.offer.generation)
        assert start == contents[copy.offer.slot] == expect, \
            f"seed {seed}: T3 rank {r.rank} copy of group {g} read {start} -> {contents[copy.offer.slot]}, offered {expect}"
        assert header.records[copy.offer.slot] == (READY, *expect), f"seed {seed}: T3 slot check failed"
        r.sched.verified(g)
        r.copies_done.add(g)

    def compute(r: Rank):
        g = r.g_next
        layer, kind = (g // 2) % n, g % 2
        r.sched.next_group(layer, kind)
        if layer >= resident:                                                                   # T3
            copy = r.sched.copies[g]
            assert copy.verified and copy.offer.layer == layer and copy.offer.step == g // 2, \
                f"seed {seed}: T3 rank {r.rank} computed group {g} from {copy}"
        r.sched.take(g)
        if r.sched.done() is not None:
            r.copies_done.discard(g)
        r.g_next += 1

    def may_compute(r: Rank) -> bool:
        g = r.g_next
        if g >= total_groups or any(o.g_next < g for o in group if o is not r):    # lock-step
            return False
        if g == 0 and not r.warm <= r.copies_done:
            return False
        return (g // 2) % n < resident or (g in r.sched.copies and r.sched.copies[g].verified)

    def choices(every_sender: bool = False) -> list:
        out = ["loaders"] * bool(from_loaders) + [f"load{k}" for k, box in enumerate(loader_boxes) if box.pending]
        for r in group:
            deliver = bool(r.out) and (every_sender or rng.random() < r.delivery)
            out += ([("coord", r)] * deliver + [("offer", r)] * bool(r.inbox.pending)
                    + [("copy", r)] * bool(r.copies_running) + [("compute", r)] * may_compute(r))
        return out

    def act(what) -> None:
        if what == "loaders":
            coordinator_handle(from_loaders.popleft())
        elif isinstance(what, str):
            loader_step(int(what[4:]))
        elif what[0] == "coord":
            coordinator_handle(what[1].out.popleft())
        elif what[0] == "offer":
            m = what[1].inbox.pending.popleft()
            what[1].sched.offer(SlotOffer(m.step, m.layer, m.slot, m.generation))
        elif what[0] == "copy":
            complete_copy(what[1], rng.choice(sorted(what[1].copies_running)))
        else:
            compute(what[1])
        for r in rng.sample(group, len(group)):       # every rank pumps, in a random order
            r.pump()
            for copy in r.sched.start_copies(len(r.copies_running)):
                r.copies_running[copy.g] = contents[copy.offer.slot]
            assert len(r.copies_running) <= s["look"].backlog

    # rank 0's first message; the coordinator may be loading on the estimate already
    if s.get("estimate") is None:
        coordinator_handle(ResidentLayers(resident))
    else:
        coord.step()
        group[0].out.appendleft(ResidentLayers(resident))
    for r in group:
        r.pump()
    total_groups, events = 2 * n * passes, 0
    while any(r.g_next < total_groups for r in group):
        events += 1
        if events > max_events:
            raise Stalled(f"seed {seed}: no progress after {max_events} events at groups "
                          f"{[r.g_next for r in group]}; setup {s}")
        options = choices() or choices(every_sender=True)
        if not options:
            raise Stalled(f"seed {seed}: deadlock at groups {[r.g_next for r in group]}; "
                          f"holds {[dict(i.holds) for i in coord.policy.slots]}; setup {s}")
        act(rng.choice(options))
    # every rank is done: deliver what is still on its way (the last Releases, loads ahead)
    for _ in range(max_events):
        options = choices(every_sender=True)
        if not options:
            break
        act(rng.choice(options))
    streamed = [step for step in range(n * passes) if step % n >= resident]
    for r in group:                                                                              # T1
        assert sorted(r.inbox.offers) == streamed and set(r.inbox.offers.values()) <= {1}, \
            f"seed {seed}: rank {r.rank} was offered {dict(r.inbox.offers)}"
    held = {slot: dict(info.holds) for slot, info in enumerate(coord.policy.slots) if info.held}      # T5
    assert not held, f"seed {seed}: T5 slots still held at the end: {held}; setup {s}"
    return {"setup": s, "events": events, "late_wants": len(late_wants)}


# --- the ranks in lock-step over the real coordinator -------------------------------------------------
@pytest.mark.parametrize("ranks", [2, 3])
def test_random_ranks_in_lock_step_share_the_ring(ranks):
    """Random setups (every look-ahead knob, ring sizes from the minimum, pinned tiers, resident
    layers, estimates), random delivery and rank order."""
    late = sum(simulate_ranks(seed, ranks)["late_wants"] for seed in range(150 if ranks == 2 else 100))
    assert late > 0, "no run had a Want arrive after another rank computed past its step"


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("pinned", [0, 2])
def test_disk_fed_ring_smaller_than_the_streamed_layers(ranks, pinned):
    """8 layers, one resident, through a ring of the look-ahead's minimum (plus the pinned tier):
    every pass reads the disk part again, and every slot is taken over and over."""
    late = 0
    for seed in range(60):
        want = 1 + seed % 2
        late += simulate_ranks(seed, ranks, n=8, resident=1, estimate=None, cap=want, pinned=pinned, passes=3,
                               offset=seed % 2, hwm=want + 3, lwm=0, warmup=seed % 3,
                               look=Lookahead(want=want, copy=want, pair=1, backlog=2))["late_wants"]
    assert late > 0, "no run had a Want arrive after another rank computed past its step"


# --- the policy with two consumers ------------------------------------------------------------------
def offer_layer_zero(p: RingPolicy):
    p.want(0, 0, rank=0)
    loads, _ = p.schedule()
    p.loaded(loads[0].slot, loads[0].generation)
    _, offers = p.schedule()
    return offers


def test_an_offer_to_two_ranks_frees_its_slot_only_after_both_released():
    p = RingPolicy(num_layers=4, slots=1, offset=0, cap=1, consumers=2)
    (o,) = offer_layer_zero(p)
    assert p.slots[o.slot].held == 2
    p.release(0, o.slot, o.generation, compute_step=1, rank=0)
    p.want(1, 1, rank=0)                    # rank 0 moved on: layer 0 is no target, the ring is full
    loads, offers = p.schedule()
    assert (loads, offers) == ([], []), "the slot went to layer 1 while rank 1 still held layer 0"
    p.release(0, o.slot, o.generation, compute_step=1, rank=1)
    loads, _ = p.schedule()
    assert [(l.slot, l.layer, l.generation) for l in loads] == [(o.slot, 1, o.generation + 1)]


def test_releases_each_rank_may_not_make():
    p = RingPolicy(num_layers=4, slots=2, offset=0, cap=2, consumers=2)
    (o,) = offer_layer_zero(p)
    for rank in (0, 1):                     # a stale generation, from either rank
        with pytest.raises(ProtocolError):
            p.release(0, o.slot, o.generation + 1, 0, rank=rank)
    p.release(0, o.slot, o.generation, 0, rank=0)
    with pytest.raises(ProtocolError):      # rank 0 again: its hold is gone, rank 1's is not its own
        p.release(0, o.slot, o.generation, 0, rank=0)
    with pytest.raises(ProtocolError):      # no rank 2 on a ring of two consumers
        p.release(0, o.slot, o.generation, 0, rank=2)
    p.release(0, o.slot, o.generation, 0, rank=1)
    assert p.slots[o.slot].held == 0


def test_a_late_want_for_a_step_offered_already_makes_no_second_offer():
    """Rank 1's Want for step 1 arrives after rank 0 reported compute past step 1."""
    p = RingPolicy(num_layers=4, slots=3, offset=0, cap=3, consumers=2)
    for step in (0, 1, 2):
        p.want(step, 0, rank=0)
    loads, _ = p.schedule()
    for load in loads:
        p.loaded(load.slot, load.generation)
    _, offers = p.schedule()
    assert [o.step for o in offers] == [0, 1, 2]
    p.want(3, 2, rank=0)                    # rank 0 computes step 2 now
    p.want(1, 0, rank=1)                    # rank 1's Want, sent while it was at step 0
    _, again = p.schedule()
    assert again == [], f"second offer {again}"
    assert p.compute_step == 2              # the window follows the most advanced rank


# --- messages and queue names ---------------------------------------------------------------------
def test_want_and_release_carry_a_rank_and_old_senders_are_rank_0():
    assert decode(encode(Want(7, 5, 2))) == Want(7, 5, rank=2)
    assert decode(encode(Release(7, 3, 9, 6, 1))).rank == 1
    # a sender of the two-field Want / four-field Release (one GPU process) is rank 0
    assert decode(msgpack.packb([PROTOCOL_VERSION, Want.KIND, 7, 5])) == Want(7, 5, 0)
    assert decode(msgpack.packb([PROTOCOL_VERSION, Release.KIND, 7, 3, 9, 6])) == Release(7, 3, 9, 6, 0)


MAKE_RUN = """
import sys
from ringllm.shm.channel import Channel
from ringllm.shm.resources import RunNames
names = RunNames(sys.argv[1], 1, gpus=3)
names.write_manifest()
for q in names.queues:
    Channel(q, create=True).close()
"""


def test_three_gpu_queues_are_listed_and_swept():
    names = RunNames(f"{999_999_999}-tp{random.randrange(16**6):06x}", 1, gpus=3)
    assert names.gpu_queue == names.gpu_queues[0] == f"/ringllm-{names.run_id}-gpu"
    assert len(set(names.gpu_queues)) == 3 and set(names.gpu_queues) <= set(names.queues)
    # a run whose supervisor died: its process wrote the manifest, created every queue and exited
    subprocess.run([sys.executable, "-c", MAKE_RUN, names.run_id], check=True, timeout=60)
    try:
        for q in names.gpu_queues:
            posix_ipc.MessageQueue(q).close()          # they exist
        removed = resources.sweep()
        assert set(names.gpu_queues) <= set(removed)
        for q in names.gpu_queues:
            with pytest.raises(posix_ipc.ExistentialError):
                posix_ipc.MessageQueue(q)
    finally:
        resources.unlink_all([], names.queues)
        names.manifest_path.unlink(missing_ok=True)


# --- StreamingSource names its rank -----------------------------------------------------------------
def test_two_streaming_sources_name_their_ranks_in_want_and_release(tmp_path):
    """Two StreamingSources (ranks 0 and 1) walk two passes group by group in lock-step through a
    ring of 2 slots for 4 layers: each names its rank, so each rank's Release drops its own hold."""
    layout = load_layout(make_checkpoint(tmp_path / "m", "tiny", 4, progress=False))
    plans = plan_model(layout)
    scratch = torch.zeros(slot_size(plans), dtype=torch.uint8)
    engine = EngineConfig(gpu_ahead_layers=1, cpu_cap=2, cpu_hwm=5, cpu_lwm=1, cpu_ring_offset=1, wait_timeout_s=5)
    policy = RingPolicy(4, engine.ring_slots, engine.cpu_ring_offset, engine.cpu_cap, consumers=2)
    policy.set_resident(0)
    coord = InProcessCoordinator(policy, ranks=2)
    sources = [StreamingSource(layout, plans, engine, PolicyRing(policy), scratch, torch.device("cpu"), coord,
                               coord.inboxes[rank], passes=2, rank=rank) for rank in (0, 1)]
    for step in range(2 * 4):
        for kind in ("attn", "ffn"):
            for source in sources:        # lock-step: both ranks compute a group before the next
                getattr(source, kind)(step % 4)
                source.release(step % 4, kind)
    for source in sources:
        source._pump()                    # the last Releases
    assert coord.seen == {("Want", 0): 8, ("Want", 1): 8, ("Release", 0): 8, ("Release", 1): 8}
    assert [info.held for info in policy.slots] == [0] * len(policy.slots)
