"""StreamingSource: the WeightSource that feeds the model from the shared ring.

Per group (attn or ffn of one layer) the life of a GPU group buffer is

    free --(copy stream waits on the buffer's last compute event)--> copying --copy event-->
    copied --(host: event done, slot generation checked)--> in compute --release()-->
    free (compute stream records the event the next copy into it will wait on)

and the life of a ring slot, seen from here: the coordinator says "step s (layer L) is in slot
k, generation g" (SlotReady); we copy the layer's groups out of it; once both copies are complete
and the slot's generation is still g, we send Release and forget the slot.

The model asks for groups in forward order. Before it gets one, the host waits for that group's
copy event (not a device synchronize: compute of the previous group keeps running) and checks
the slot generation and the loaders' write records and taint word (shm.ring: late writes), so
bytes from a reused slot, or written into it late, can never reach compute.

On device "cpu" copies are plain synchronous tensor copies; everything else is the same.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from ringllm.checkpoint.layout import GROUP_KINDS, ModelLayout
from ringllm.shm.channel import Channel, Release, Shutdown, SlotReady, Want
from ringllm.shm.ring import READY, Ring
from ringllm.shm.slot_plan import LayerPlan
from ringllm.workers.model import AttnWeights, FfnWeights
from ringllm.workers.process_setup import stop_requested
from ringllm.workers.weights import group_weights

log = logging.getLogger("ringllm.gpu")
GROUP_LOG_INTERVAL_S = 1.0


class TornCopy(RuntimeError):
    """A ring slot changed while (or before) we copied from it."""


class StreamStalled(RuntimeError):
    """A layer did not arrive within the wait timeout."""


@dataclass
class GroupBuffer:
    kind: str
    buf: torch.Tensor                       # uint8, on the compute device
    free_event: object = None               # compute finished reading it (cuda.Event or None)


@dataclass
class GroupCopy:
    step: int
    kind: str
    slot: int
    generation: int
    buffer: GroupBuffer
    event: object = None                    # copy finished (cuda.Event or None on cpu)
    checked: bool = False

    def complete(self) -> bool:
        return self.event is None or self.event.query()


@dataclass
class StreamStats:
    h2d_bytes: int = 0
    h2d_copies: int = 0
    wait_seconds: float = 0.0               # host time the model waited for a group
    waits: int = 0
    groups_served: int = 0


class InboxReader(threading.Thread):
    """Moves SlotReady messages from the GPU process's queue into a thread-safe queue."""

    def __init__(self, channel: Channel):
        super().__init__(name="ringllm-gpu-inbox", daemon=True)
        self.channel, self.items = channel, queue.Queue()
        self.stop, self.shutdown = threading.Event(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            msg = self.channel.receive(timeout=0.1)
            if isinstance(msg, SlotReady):
                self.items.put(msg)
            elif isinstance(msg, Shutdown):
                self.shutdown.set()
                self.items.put(None)     # wake a waiter


class StreamingSource:
    def __init__(self, layout: ModelLayout, plans: list[LayerPlan], engine, ring: Ring,
                 ring_tensor: torch.Tensor, device: torch.device, coord: Channel, inbox: InboxReader,
                 resident: dict | None = None, chaos: tuple[int, float] = (0, 0.0), stats_page=None,
                 passes: int | None = None):
        self.layout, self.plans, self.engine = layout, plans, engine
        self.ring, self.ring_tensor, self.device = ring, ring_tensor, device
        self.coord, self.inbox = coord, inbox
        self.n = layout.config.num_layers
        # layers 0..R-1 stay on the GPU (loaded once) and only the others stream. Resident layers
        # come first in the pass so that their compute overlaps the copies of the streamed ones.
        self.resident = resident or {}
        self.resident_count = len(self.resident)
        self.streamed_count = self.n - self.resident_count
        assert sorted(self.resident) == list(range(self.resident_count))
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        n_attn, n_ffn = engine.group_budget
        sizes = layout.max_group_bytes
        self.buffers = {
            "attn": [GroupBuffer("attn", torch.empty(sizes["attn"], dtype=torch.uint8, device=device))
                     for _ in range(n_attn)],
            "ffn": [GroupBuffer("ffn", torch.empty(sizes["ffn"], dtype=torch.uint8, device=device))
                    for _ in range(n_ffn)],
        }
        self.free = {kind: list(bufs) for kind, bufs in self.buffers.items()}
        self.step = -1                       # compute step of the group being served
        # the generation's last step (max_new_tokens passes): nothing past it is asked for or
        # copied; a run that stops early at EOS may still have fetched a little ahead
        self.last_step = passes * self.n - 1 if passes else None
        self.consumed = -1                   # group index (2*step + kind) last handed out
        self.wanted_upto = -1
        self.offered: dict[int, SlotReady] = {}     # step -> where its layer is in the ring
        self.copies: dict[int, GroupCopy] = {}      # group index -> copy
        self.released: set[int] = set()
        self.stats = StreamStats()
        self.logged_at = 0.0
        self.chaos_rng, self.chaos_delay = random.Random(chaos[0]), chaos[1]   # tests only
        self.page, self.published_at, self.tokens = stats_page, 0.0, 0

    @staticmethod
    def buffer_bytes(layout: ModelLayout, engine) -> int:
        n_attn, n_ffn = engine.group_budget
        sizes = layout.max_group_bytes
        return n_attn * sizes["attn"] + n_ffn * sizes["ffn"]

    # --- the WeightSource interface ------------------------------------------------------------
    def attn(self, layer: int) -> AttnWeights:
        return self._acquire(layer, 0)

    def ffn(self, layer: int) -> FfnWeights:
        return self._acquire(layer, 1)

    def release(self, layer: int, kind: str) -> None:
        g = self.consumed
        gc = self.copies.pop(g, None)
        if gc is None:                       # a GPU-resident group: nothing to recycle
            return
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            gc.buffer.free_event = ev
        self.free[gc.kind].append(gc.buffer)
        self._pump()

    # --- internals -----------------------------------------------------------------------------
    def _acquire(self, layer: int, kind_index: int):
        g = self.consumed + 1
        step = g // 2
        if step % self.n != layer or g % 2 != kind_index:
            raise RuntimeError(f"model asked for layer {layer} {GROUP_KINDS[kind_index]}, "
                               f"expected group {g} (layer {step % self.n})")
        self.step = step
        if layer < self.resident_count:
            self.consumed = g
            self.stats.groups_served += 1
            self._pump()
            return self.resident[layer][GROUP_KINDS[kind_index]]
        if self.chaos_delay:
            time.sleep(self.chaos_rng.uniform(0, self.chaos_delay))
        t0 = time.perf_counter()
        deadline = t0 + self.engine.wait_timeout_s
        waited = False
        while True:
            self._pump()
            gc = self.copies.get(g)
            if gc is not None:
                break
            waited = True
            if stop_requested():
                raise SystemExit(143)
            if time.perf_counter() > deadline:
                raise StreamStalled(
                    f"layer {layer} ({GROUP_KINDS[kind_index]}) not in the ring after "
                    f"{self.engine.wait_timeout_s:.0f} s: the coordinator or the loaders are stuck")
            self._receive(timeout=0.005)
        if not gc.checked:
            if gc.event is not None and not gc.event.query():
                waited = True
                gc.event.synchronize()       # this copy only; compute already queued keeps running
            self._verify(gc)
            self._release_slots()
        if waited:
            self.stats.waits += 1
            self.stats.wait_seconds += time.perf_counter() - t0
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(gc.event)
        self.consumed = g
        self.stats.groups_served += 1
        return group_weights(gc.buffer.buf, self.layout.group(layer, GROUP_KINDS[kind_index]))

    def _receive(self, timeout: float) -> None:
        try:
            msg = self.inbox.items.get(timeout=timeout)
            while True:
                if msg is None:
                    if self.inbox.shutdown.is_set():
                        raise SystemExit(143)
                else:
                    self.offered[msg.step] = msg
                msg = self.inbox.items.get_nowait()
        except queue.Empty:
            pass

    def _streamed(self, step: int) -> bool:
        return step % self.n >= self.resident_count

    def _horizon(self, compute: int, ahead: int) -> int:
        """The step `ahead` streamed steps past compute (resident layers do not count), but never
        past the generation's last step."""
        if self.resident_count == 0:
            step = compute + ahead
        elif self.streamed_count == 0:
            return compute                   # nothing streams: nothing to ask for
        else:
            step, seen = compute, 0
            while seen < ahead:
                step += 1
                seen += self._streamed(step)
        return step if self.last_step is None else max(compute, min(step, self.last_step))

    def _pump(self) -> None:
        self._receive(timeout=0)
        compute = max(self.step, 0)
        horizon = self._horizon(compute, self.engine.lookahead_layers)
        while self.wanted_upto < horizon:
            self.wanted_upto += 1
            if self._streamed(self.wanted_upto):
                self.coord.send(Want(self.wanted_upto, compute), timeout=self.engine.wait_timeout_s)
        self._issue_copies(compute)
        self._release_slots()
        self._log_groups()
        self.publish()

    def publish(self, force: bool = False) -> None:
        """Update the stats page for `ringllm top` (at most 20 times a second)."""
        now = time.monotonic()
        if self.page is None or (not force and now - self.published_at < 0.05):
            return
        self.published_at = now
        in_flight = self._in_flight()
        used = sum(len(b) - len(self.free[k]) for k, b in self.buffers.items())
        total = sum(len(b) for b in self.buffers.values())
        self.page.gpu(self.tokens, self.stats.h2d_bytes, in_flight, used, total, self.resident_count,
                      self.stats.wait_seconds, max(self.step, 0))

    def _in_flight(self) -> int:
        """Group copies issued and not yet complete (the copy stream's backlog)."""
        return sum(1 for gc in self.copies.values() if not gc.complete())

    def _issue_copies(self, compute: int) -> None:
        if self.streamed_count == 0:
            return
        backlog = self._in_flight()
        # copy_ahead, not WSM_BALANCE_AHEAD: copies never reach past what the ring was asked for
        last_g = 2 * self._horizon(compute, self.engine.copy_ahead) + 1
        first_pending = None
        for g in range(self.consumed + 1, last_g + 1):
            if g in self.copies or not self._streamed(g // 2):
                continue
            step, kind = g // 2, GROUP_KINDS[g % 2]
            if first_pending is None:
                first_pending = step
            if step - first_pending > self.engine.pair_ahead or backlog >= self.engine.h2d_backlog_max:
                return
            offer = self.offered.get(step)
            if offer is None or not self.free[kind]:
                continue
            self._copy(g, offer, self.free[kind].pop(0))
            backlog += 1

    def _copy(self, g: int, offer: SlotReady, buffer: GroupBuffer) -> None:
        step, kind = g // 2, GROUP_KINDS[g % 2]
        group = self.layout.group(offer.layer, kind)
        plan = self.plans[offer.layer]
        base = self.ring.slot_base(offer.slot)
        gc = GroupCopy(step, kind, offer.slot, offer.generation, buffer)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if buffer.free_event is not None:
                    self.copy_stream.wait_event(buffer.free_event)   # never overwrite what compute reads
                self._copy_entries(group, plan, base, buffer)
                gc.event = torch.cuda.Event()
                gc.event.record(self.copy_stream)
        else:
            self._copy_entries(group, plan, base, buffer)
        self.copies[g] = gc
        self.stats.h2d_copies += 1
        self.stats.h2d_bytes += sum(e.extent.nbytes for e in group.entries)

    def _copy_entries(self, group, plan: LayerPlan, base: int, buffer: GroupBuffer) -> None:
        for e in group.entries:
            src_at = base + plan.tensor_slot_offset[e.extent.name]
            src = self.ring_tensor[src_at:src_at + e.extent.nbytes]
            buffer.buf[e.buf_offset:e.buf_offset + e.extent.nbytes].copy_(src, non_blocking=self.cuda)

    def _verify(self, gc: GroupCopy) -> None:
        """After the copy completed, before compute may use it: the slot still holds what we were
        told (shm.ring, step a) and no loader wrote into it late (steps b, c)."""
        state, layer, generation = self.ring.read_slot(gc.slot)
        if generation != gc.generation or state != READY or layer != gc.step % self.n:
            raise TornCopy(
                f"ring slot {gc.slot} changed under a copy of layer {gc.step % self.n} {gc.kind}: "
                f"expected generation {gc.generation}, found {generation} (state {state}, layer {layer})")
        late = self.ring.late_write(gc.slot, gc.generation)
        if late is not None:
            raise TornCopy(f"ring slot {gc.slot} (layer {layer}, generation {generation}) under a copy of layer "
                           f"{gc.step % self.n} {gc.kind}: {late}")
        gc.checked = True

    def _release_slots(self) -> None:
        """Release a step's slot once both its groups are copied and verified."""
        for gc in self.copies.values():
            if not gc.checked and gc.complete():
                self._verify(gc)
        steps = {gc.step for gc in self.copies.values()}
        for step in sorted(steps):
            if step in self.released:
                continue
            parts = [self.copies.get(2 * step + k) for k in (0, 1)]
            # a group already consumed counts as copied and checked
            done = all((p is None and 2 * step + k <= self.consumed) or (p is not None and p.checked)
                       for k, p in enumerate(parts))
            if done:
                offer = self.offered.pop(step)
                self.released.add(step)
                self.coord.send(Release(step, offer.slot, offer.generation, max(self.step, 0)),
                                timeout=self.engine.wait_timeout_s)
        self.released = {s for s in self.released if s >= self.step - 1}

    def warm_up(self) -> int:
        """warmup_layers: have the first streamed layers' groups on the GPU before the first token.

        Waits for exactly EngineConfig.warmup_layers_for(streamed) layers, both groups each. That
        count never exceeds what _pump issues before compute starts: Wants reach lookahead_layers
        streamed layers past step 0, copies copy_ahead <= lookahead of them (one more when step 0
        itself streams), and the group buffers hold that many of each kind (none is released
        before compute). Returns the layers waited for."""
        layers = self.engine.warmup_layers_for(self.streamed_count)
        deadline = time.perf_counter() + self.engine.wait_timeout_s
        while sum(1 for gc in self.copies.values() if gc.complete()) < 2 * layers:
            if time.perf_counter() > deadline:
                raise StreamStalled(f"warm-up of {layers} layers did not finish in {self.engine.wait_timeout_s:.0f} s")
            self._pump()
            self._receive(timeout=0.005)
        return layers

    def _log_groups(self) -> None:
        now = time.monotonic()
        if now - self.logged_at < GROUP_LOG_INTERVAL_S:
            return
        self.logged_at = now
        used = {k: len(b) - len(self.free[k]) for k, b in self.buffers.items()}
        total = sum(len(b) for b in self.buffers.values())
        log.info("[WSM] GPU groups: %d/%d used (attn=%d, ffn=%d)%s", used["attn"] + used["ffn"], total,
                 used["attn"], used["ffn"],
                 f"; layers 0..{self.resident_count - 1} resident" if self.resident else "")
