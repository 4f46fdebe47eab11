"""The coordinator's decisions as pure objects: which layer goes into which ring slot, when a slot
may be evicted, which loader reads which chunk. No processes, no I/O: tests drive them directly.

Steps. The GPU process walks layers 0..N-1 once per forward pass, pass after pass; a *step* is
`pass * N + layer`, so steps only grow while layers wrap mod N.

Window. With compute at step c (layer i = c mod N), the user's window is the CPU_CAP_VALUE layers
starting CPU_RING_OFFSET after i: {(i + offset + k) mod N : k < cap}. The layers between compute
and the window's start are usually on the GPU or being copied already; if they are not (start-up,
a slow disk) they come first. So the ring's targets are the layers of steps c .. c+offset+cap-1
that the GPU has not yet been handed, nearest first, plus any step the GPU explicitly wants.
WSM_CPU_RING_MODE=0 stops the window at the end of the current pass instead of wrapping.

Tiers. With CPU_PINNED_LAYERS = P, the first P streamed layers (R..R+P-1, R = the GPU-resident
count) take P slots for the whole run: targets until loaded, then never evicted nor taken over
[P17]. Everything above applies to the other layers (R+P..N-1, the disk part) with cap - P slots:
the window counts offset + cap - P disk steps, and the water marks count disk-part layers only.
P = 0 is the plain sliding window.

Slots. The ring has CPU_CAP_VALUE slots. A slot the GPU was handed ("held") is never evicted or
reused until the GPU releases it. Eviction frees READY, unheld slots whose layer is not a
target: layers in the back margin (the WSM_CPU_BACK_MARGIN layers just behind compute) go last,
otherwise the layer whose next use is farthest goes first. It starts when resident layers exceed
WSM_CPU_CACHE_HWM_LAYERS, or when a target needs a slot and none is free (with the default
HWM = cap + 3 the ring's size is the effective high-water mark), and goes down to
WSM_CPU_CACHE_LWM_LAYERS. Should the slots still be short, a nearer target takes the slot of the
farthest target the GPU does not hold yet. Wanted steps are handed out strictly in step order, so
slots are always held by the steps compute needs first (no deadlock: see the randomized test).

Consumers. With tensor parallel, N GPU processes (ranks) copy their share of every layer out of
the same slots, in lock-step. An offer goes to every rank and is held once by each [P19]; the slot
is evictable only once every rank released it. Each rank reports its own compute step: the window
and the targets follow the most advanced rank, but the steps already offered are forgotten only
behind the least advanced one, so a slow rank's Want for a step offered already is not a new offer
(a second offer would add holds no rank ever releases, and the slot would never free again).
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from ringllm.shm.protocol import streamed_steps
from ringllm.shm.ring import FREE, LOADING, READY


@dataclass
class SlotInfo:
    state: int = FREE
    layer: int = -1
    generation: int = 0
    holds: Counter = field(default_factory=Counter)    # rank -> steps offered to it, not yet released

    @property
    def held(self) -> int:
        """Holds of every rank together: the slot may be evicted only at 0 [P4][P19]."""
        return sum(self.holds.values())


@dataclass(frozen=True)
class Load:
    slot: int
    generation: int
    layer: int


@dataclass(frozen=True)
class Offer:
    step: int
    layer: int
    slot: int
    generation: int


class ProtocolError(RuntimeError):
    """A peer broke the protocol (released a slot it did not hold, with a stale generation...)."""


@dataclass
class PolicyStats:
    hits: int = 0          # wanted steps whose layer was already in the ring
    misses: int = 0        # wanted steps that had to wait for a load
    loads: int = 0
    evictions: int = 0


class RingPolicy:
    def __init__(self, num_layers: int, slots: int, offset: int, cap: int, ring_mode: int = 1,
                 hwm: int | None = None, lwm: int | None = None, back_margin: int = 0, pinned: int = 0,
                 min_disk_slots: int = 1, consumers: int = 1):
        self.n, self.offset, self.cap, self.ring_mode = num_layers, offset, cap, ring_mode
        if consumers < 1:
            raise ValueError(f"the ring needs at least one consumer, not {consumers}")
        self.consumers = consumers                # GPU processes (ranks) every offer goes to
        self.pinned = pinned                      # CPU_PINNED_LAYERS (which layers: see pinned_layers)
        self.min_disk_slots = max(1, min_disk_slots)   # the GPU look-ahead: slots the disk part keeps
        self.slots = [SlotInfo() for _ in range(slots)]
        self.hwm = hwm if hwm is not None else slots
        self.lwm = lwm if lwm is not None else max(0, slots - 1)
        self.back_margin = back_margin
        self.layer_slot: dict[int, int] = {}     # layer -> slot (LOADING or READY)
        self.rank_compute = [0] * consumers       # each rank's compute step, as it last reported it
        self.compute_step = 0                     # the most advanced rank's: window and targets follow it
        self.wants: dict[int, bool] = {}          # step -> was it a hit when asked (not yet offered)
        self.resident_layers = 0                  # layers below this stay on the GPU: never targets
        self.handed: set[int] = set()             # steps offered (pruned behind the slowest rank)
        self.stats = PolicyStats()

    # --- events --------------------------------------------------------------------------------
    def want(self, step: int, compute_step: int, rank: int = 0) -> None:
        self._advance(compute_step, rank)
        if step in self.handed or step in self.wants:
            return     # [P19] one offer a step, to every rank, whichever rank asked first
        slot = self.layer_slot.get(step % self.n)
        self.wants[step] = slot is not None and self.slots[slot].state == READY

    def release(self, step: int, slot: int, generation: int, compute_step: int, rank: int = 0) -> None:
        self._check_rank(rank)
        info = self.slots[slot]
        # [P19] a rank drops only a hold of its own: the slot frees once every rank released it
        if info.holds[rank] <= 0 or info.generation != generation:
            raise ProtocolError(f"rank {rank} released slot {slot} gen {generation} (step {step}) that it does "
                                f"not hold (its holds={info.holds[rank]}, all={info.held}, gen={info.generation})")
        info.holds[rank] -= 1
        self._advance(compute_step, rank)

    def loaded(self, slot: int, generation: int) -> None:
        info = self.slots[slot]
        if info.state != LOADING or info.generation != generation:    # [P5] only a LOADING slot becomes READY
            raise ProtocolError(f"slot {slot} gen {generation} finished loading but is "
                                f"{info.state}/gen {info.generation}")
        info.state = READY

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.consumers:
            raise ProtocolError(f"a message from rank {rank}, but the ring has {self.consumers} consumer(s)")

    def _advance(self, compute_step: int, rank: int) -> None:
        self._check_rank(rank)
        if compute_step > self.rank_compute[rank]:
            self.rank_compute[rank] = compute_step
            self.compute_step = max(self.rank_compute)
            # [P19] forget offered steps only behind the slowest rank: any rank may still Want a
            # step from its own compute on, and that must not make a second offer
            slowest = min(self.rank_compute)
            self.handed = {s for s in self.handed if s >= slowest}

    # --- decisions -----------------------------------------------------------------------------
    def set_resident(self, count: int) -> None:
        """Layers 0..count-1 live on the GPU; free their slots and never load them again."""
        self.resident_layers = count
        for s, info in enumerate(self.slots):
            if info.state == READY and info.layer < count and info.held == 0:
                self._evict(s)

    @property
    def pinned_layers(self) -> range:
        """The layers that stay in the ring once loaded: the first `pinned` streamed layers. While
        layers remain on disk they keep at least min_disk_slots slots: the configuration checks
        that against the resident count it knew, but the count can change under us (the
        supervisor's estimate, then the GPU process's ResidentLayers), and a disk part without a
        slot would never load again."""
        streamed = self.n - self.resident_layers
        count = min(self.pinned, max(0, streamed))
        if count < streamed:
            count = min(count, max(0, self.cap - self.min_disk_slots))
        return range(self.resident_layers, self.resident_layers + count)

    def _disk_part(self) -> tuple[int, int]:
        """(first disk-fed layer, slots of the disk part): the window's share of the ring."""
        pinned = self.pinned_layers
        return pinned.stop if pinned else self.resident_layers, max(0, self.cap - len(pinned))

    def _pass_end(self) -> int:
        # ring mode 0 stops at the end of the pass; two passes are as far as a window can matter
        c = self.compute_step
        return (c // self.n + 1) * self.n if not self.ring_mode else c + 2 * self.n

    def window(self) -> list[int]:
        """The user's window at the current compute layer (for logs and monitors); with pinned
        layers, the disk part's window (its cap - P layers, offset disk steps after compute)."""
        i = self.compute_step % self.n
        if self.pinned_layers:
            first_disk, disk_slots = self._disk_part()
            steps = streamed_steps(self.compute_step, self.offset + disk_slots, self.n, first_disk, self._pass_end())
            return [s % self.n for s in steps[self.offset:]]
        layers = [i + self.offset + k for k in range(self.cap)]
        if not self.ring_mode:
            layers = [l for l in layers if l < self.n]
        return [l % self.n for l in layers]

    def target_layers(self) -> list[int]:
        """Layers to hold, nearest first: the streamed steps from compute on, up to
        offset + cap of them (GPU-resident layers need no slot and do not count), plus wants.
        With pinned layers: the disk part's offset + cap - P steps, plus the pinned layers not in
        the ring yet (at their next use), plus wants."""
        c = self.compute_step
        # the same count of streamed steps as the GPU process's look-ahead (shm.protocol)
        first_disk, disk_slots = self._disk_part()
        steps = streamed_steps(c, self.offset + disk_slots, self.n, first_disk, self._pass_end())
        unloaded = {c + (layer - c) % self.n for layer in self.pinned_layers if layer not in self.layer_slot}
        out, seen = [], set()
        for s in sorted(set(steps) | unloaded | set(self.wants)):
            layer = s % self.n
            if s in self.handed or layer in seen or layer < self.resident_layers:
                continue
            seen.add(layer)
            out.append(layer)
        return out

    def _next_use(self, layer: int) -> int:
        return (layer - self.compute_step) % self.n

    def _eviction_order(self, targets: set[int]) -> list[int]:
        i = self.compute_step % self.n
        margin = {(i - k) % self.n for k in range(1, self.back_margin + 1)}
        # [P4][P5] only READY slots the GPU does not hold: never a held one, never one still LOADING;
        # [P17] never a pinned layer's
        candidates = [s for s, info in enumerate(self.slots)
                      if info.state == READY and info.held == 0 and info.layer not in targets
                      and info.layer not in self.pinned_layers]
        # back-margin layers last; otherwise the farthest next use first
        return sorted(candidates, key=lambda s: (self.slots[s].layer in margin,
                                                 -self._next_use(self.slots[s].layer)))

    def _evict(self, slot: int) -> None:
        info = self.slots[slot]
        del self.layer_slot[info.layer]
        info.state, info.layer = FREE, -1
        self.stats.evictions += 1

    def _free_slot(self) -> int | None:
        return next((s for s, info in enumerate(self.slots) if info.state == FREE), None)

    def _resident(self) -> int:
        """Disk-part layers in the ring (LOADING or READY): what the water marks count."""
        pinned = self.pinned_layers
        return sum(1 for info in self.slots if info.state != FREE and info.layer not in pinned)

    def _evict_down_to_lwm(self, targets: set[int], at_least_one: bool) -> None:
        order = self._eviction_order(targets)
        for n, slot in enumerate(order):
            if self._resident() <= self.lwm and not (at_least_one and n == 0):
                break
            self._evict(slot)

    def schedule(self) -> tuple[list[Load], list[Offer]]:
        """Loads to start (nearest target first) and wanted steps to hand to the GPU."""
        targets = self.target_layers()
        target_set = set(targets)
        loads: list[Load] = []
        if self._resident() > self.hwm:
            self._evict_down_to_lwm(target_set, at_least_one=False)
        for k, layer in enumerate(targets):
            if layer in self.layer_slot:
                continue
            free = self._free_slot()
            if free is None:
                self._evict_down_to_lwm(target_set, at_least_one=True)
                free = self._free_slot()
            if free is None:
                # Take the slot of a farther target that the GPU does not hold yet: the nearer
                # layer is needed first (the farther one is read again later).
                farther = [self.layer_slot[l] for l in reversed(targets[k + 1:])
                           if l in self.layer_slot and l not in self.pinned_layers]      # [P17]
                free = next((s for s in farther if self.slots[s].state == READY and self.slots[s].held == 0), None)  # [P4]
                if free is None:
                    break   # every slot is held or loading a nearer layer: wait for a release
                self._evict(free)
            info = self.slots[free]
            info.state, info.layer, info.generation = LOADING, layer, info.generation + 1
            self.layer_slot[layer] = free
            self.stats.loads += 1
            loads.append(Load(free, info.generation, layer))
        offers: list[Offer] = []
        for step in sorted(self.wants):
            slot = self.layer_slot.get(step % self.n)
            if slot is None or self.slots[slot].state != READY:
                break   # [P2][P3] READY only, in step order: a later step must never hold a slot an earlier one needs
            info = self.slots[slot]
            for rank in range(self.consumers):     # [P19] the offer is held by every rank
                info.holds[rank] += 1
            if self.wants.pop(step):
                self.stats.hits += 1
            else:
                self.stats.misses += 1
            self.handed.add(step)
            offers.append(Offer(step, info.layer, slot, info.generation))
        return loads, offers


@dataclass
class ChunkJob:
    job: int
    slot: int
    generation: int
    chunk: object          # shm.slot_plan.Chunk


class JobDispatcher:
    """Chunks waiting to be read, and which loader holds which; at most `depth` per loader."""

    def __init__(self, num_loaders: int, depth: int = 2):
        self.depth = depth
        self.queue: deque[ChunkJob] = deque()
        self.in_flight: list[dict[int, ChunkJob]] = [dict() for _ in range(num_loaders)]
        self.remaining: dict[tuple[int, int], int] = {}   # (slot, gen) -> chunks not yet done
        self._next_job = 0
        # reports of a chunk its loader no longer holds: one chunk read twice, and the second read
        # could land after the slot went to another layer. Loader epochs keep this at 0.
        self.stale_reports = 0

    def add_load(self, slot: int, generation: int, chunks: list) -> None:
        self.remaining[(slot, generation)] = len(chunks)
        for chunk in chunks:
            self.queue.append(ChunkJob(self._next_job, slot, generation, chunk))
            self._next_job += 1

    def assign(self) -> list[tuple[int, ChunkJob]]:
        """(loader, job) pairs to send now: fill the least busy loaders first."""
        out = []
        while self.queue:
            loader = min(range(len(self.in_flight)), key=lambda k: len(self.in_flight[k]))
            if len(self.in_flight[loader]) >= self.depth:
                break
            job = self.queue.popleft()
            self.in_flight[loader][job.job] = job
            out.append((loader, job))
        return out

    def done(self, loader: int, job_id: int) -> tuple[int, int] | None:
        """Mark a chunk read; return (slot, gen) when that was the slot's last chunk."""
        job = self.in_flight[loader].pop(job_id, None)
        if job is None:
            self.stale_reports += 1
            return None
        key = (job.slot, job.generation)
        self.remaining[key] -= 1
        if self.remaining[key] == 0:
            del self.remaining[key]
            return key
        return None

    def requeue_loader(self, loader: int) -> int:
        """The loader died: its chunks go back to the front of the queue. Returns how many."""
        jobs = sorted(self.in_flight[loader].values(), key=lambda j: j.job)
        self.in_flight[loader] = {}
        self.queue.extendleft(reversed(jobs))
        return len(jobs)
