"""The GPU process's streaming decisions, without torch or queues: what to Want from the
coordinator, which group to copy into which buffer and when, when a ring slot may be Released.
`workers.streaming` carries them out (CUDA copies, events, the slot check); tests drive this
class directly against the coordinator's policy (tests/test_scheduler.py).

Groups are numbered g = 2 * step + kind (kind 0 = attn, 1 = ffn); the model consumes them in
order g = 0, 1, 2, ... Layers below `resident` stay on the GPU and are never wanted or copied.
The life of one streamed group here (docs/PROTOCOL.md has the whole protocol):

    wanted (Want sent) --SlotReady--> offered --start_copies: a free buffer of its kind-->
    copying --copier: copy complete, slot generation checked--> verified --take--> in compute
    --done--> its buffer is free again (the copier makes the next copy into it wait for compute)

A step's slot is Released once both its groups are verified or already consumed, never before
(the coordinator may then evict or reassign the slot).
"""
from __future__ import annotations

from dataclasses import dataclass

from ringllm.shm.protocol import step_ahead, streams

KINDS = ("attn", "ffn")


@dataclass(frozen=True)
class Lookahead:
    """The engine's look-ahead knobs, derived once (ringllm.config.EngineConfig)."""
    want: int        # streamed steps past compute asked of the ring (GPU_AHEAD_LAYERS / prefetch_distance)
    copy: int        # streamed steps past compute whose groups may be copied (<= want)
    pair: int        # a group is copied at most this many steps past the earliest one not yet copied
    backlog: int     # group copies in flight at once (WSM_H2D_GROUP_BACKLOG_MAX)

    @classmethod
    def of(cls, engine) -> "Lookahead":
        return cls(engine.lookahead_layers, engine.copy_ahead, engine.pair_ahead, engine.h2d_backlog_max)


@dataclass(frozen=True)
class SlotOffer:
    """The coordinator's SlotReady: step `step` (layer `layer`) is in ring slot `slot`, generation
    `generation`."""
    step: int
    layer: int
    slot: int
    generation: int


@dataclass
class GroupCopy:
    g: int
    offer: SlotOffer
    buffer: int                 # index into the buffers of its kind
    verified: bool = False      # copy complete and the slot still held this generation

    @property
    def kind(self) -> str:
        return KINDS[self.g % 2]


class ScheduleError(RuntimeError):
    """The model asked for groups out of order (a bug in the caller)."""


class StreamScheduler:
    def __init__(self, num_layers: int, resident: int, lookahead: Lookahead, buffers: tuple[int, int],
                 passes: int | None = None):
        self.n, self.resident, self.look = num_layers, resident, lookahead
        self.streamed = num_layers - resident
        # the generation's last step: nothing past it is wanted or copied
        self.last_step = passes * num_layers - 1 if passes else None
        self.free = {"attn": list(range(buffers[0])), "ffn": list(range(buffers[1]))}
        self.buffer_count = buffers
        self.step = -1               # compute step of the group being served
        self.consumed = -1           # last group handed to the model
        self.wanted_upto = -1
        self.offered: dict[int, SlotOffer] = {}    # step -> its slot (until Released)
        self.copies: dict[int, GroupCopy] = {}     # group -> copy (until the model is done with it)
        self.released: set[int] = set()            # steps Released, pruned behind compute

    # --- where compute is ------------------------------------------------------------------------
    @property
    def compute(self) -> int:
        return max(self.step, 0)

    def streams(self, step: int) -> bool:
        return streams(step, self.n, self.resident)

    def horizon(self, ahead: int) -> int:
        # [P13] never past the generation's last step
        return step_ahead(self.compute, ahead, self.n, self.resident, self.last_step)

    # --- events in -------------------------------------------------------------------------------
    def offer(self, offer: SlotOffer) -> None:
        self.offered[offer.step] = offer

    def verified(self, g: int) -> None:
        """The copier saw group g's copy complete and its slot unchanged."""
        self.copies[g].verified = True

    # --- decisions out ---------------------------------------------------------------------------
    def wants(self) -> list[int]:
        """Steps to ask the coordinator for now, in step order (each exactly once)."""
        out = []
        horizon = self.horizon(self.look.want)
        while self.wanted_upto < horizon:
            self.wanted_upto += 1
            if self.streams(self.wanted_upto):
                out.append(self.wanted_upto)
        return out

    def in_flight(self, complete) -> int:
        """Copies issued and not yet complete (`complete(g)` asks the copier)."""
        return sum(1 for c in self.copies.values() if not c.verified and not complete(c.g))

    def start_copies(self, in_flight: int) -> list[GroupCopy]:
        """Copies to issue now, in group order, given `in_flight` copies not yet complete: offered
        groups within the copy horizon, no more than `pair` steps past the earliest group not yet
        copied, while the backlog and the free buffers of each kind allow."""
        out: list[GroupCopy] = []
        if self.streamed == 0:
            return out
        last_g = 2 * self.horizon(self.look.copy) + 1
        first_pending = None
        for g in range(self.consumed + 1, last_g + 1):
            step = g // 2
            if g in self.copies or not self.streams(step):
                continue
            if first_pending is None:
                first_pending = step
            if step - first_pending > self.look.pair or in_flight >= self.look.backlog:
                break
            offer, kind = self.offered.get(step), KINDS[g % 2]
            if offer is None or not self.free[kind]:
                continue
            copy = GroupCopy(g, offer, self.free[kind].pop(0))
            self.copies[g] = copy
            out.append(copy)
            in_flight += 1
        return out

    def releases(self) -> list[SlotOffer]:
        """Slots to Release now: steps whose two groups are verified (or already consumed)."""
        out = []
        for step in sorted({c.g // 2 for c in self.copies.values()}):
            if step in self.released:
                continue
            # [P6] both groups verified, or already handed to compute
            done = all((2 * step + k) <= self.consumed if (2 * step + k) not in self.copies
                       else self.copies[2 * step + k].verified for k in (0, 1))
            if done:
                self.released.add(step)
                out.append(self.offered.pop(step))
        self.released = {s for s in self.released if s >= self.step - 1}
        return out

    # --- the model -------------------------------------------------------------------------------
    def next_group(self, layer: int, kind_index: int) -> int:
        """The model asks for its next group: check the order, move compute there."""
        g = self.consumed + 1
        step = g // 2
        if step % self.n != layer or g % 2 != kind_index:
            raise ScheduleError(f"model asked for layer {layer} {KINDS[kind_index]}, "
                                f"expected group {g} (layer {step % self.n})")
        self.step = step
        return g

    def take(self, g: int) -> None:
        """Group g goes to compute (resident, or its copy verified)."""
        self.consumed = g

    def done(self) -> GroupCopy | None:
        """Compute has been issued on the last group taken: its buffer is free for a later copy
        (which the copier orders after that compute). None for a resident group."""
        copy = self.copies.pop(self.consumed, None)
        if copy is not None:     # [P8] free only once compute on it is issued (the copier orders reuse after it)
            self.free[copy.kind].append(copy.buffer)
        return copy

    # --- warm-up ---------------------------------------------------------------------------------
    def warm_up_groups(self, layers: int) -> list[int]:
        """The groups to have on the GPU before the first token for `layers` layers of warm-up:
        those `start_copies` issues for the first `layers` streamed steps when compute is at the
        start, every wanted step has been offered (the coordinator offers in step order) and no
        copy is consumed, so the buffers of each kind bound them. Waiting for exactly these
        always finishes, whatever the knobs (the backlog only delays them)."""
        # [P14] exactly what start_copies would issue: simulate it on a copy of the state
        probe = StreamScheduler(self.n, self.resident, self.look, self.buffer_count,
                                None if self.last_step is None else (self.last_step + 1) // self.n)
        for step in range(probe.horizon(self.look.copy) + 1):
            if probe.streams(step):
                probe.offer(SlotOffer(step, step % self.n, -1, -1))
        issued: list[int] = []
        while True:
            new = probe.start_copies(0)
            if not new:
                break
            issued += [c.g for c in new]
        first = [s for s in range(probe.horizon(self.look.copy) + 1) if probe.streams(s)][:max(0, layers)]
        return sorted(g for g in issued if g // 2 in first)
