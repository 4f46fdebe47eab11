"""StreamingSource: the WeightSource that feeds the model from the shared ring.

It carries out what `workers.scheduler.StreamScheduler` decides (what to Want, which group to
copy into which buffer, when to Release a slot) and owns what needs torch and the queues: the
GPU group buffers, the copy stream and its events, the slot check, the messages to the
coordinator, the stats page. docs/PROTOCOL.md has the whole protocol.

Per group (attn or ffn of one layer) the life of a GPU group buffer is

    free --(copy stream waits on the buffer's last compute event)--> copying --copy event-->
    copied --(host: event done, slot checked [P7])--> in compute --release()--> free (compute
    stream records the event the next copy into that buffer waits on [P8])

A group is copied in as few copies as its bytes allow: its tensors' contiguous runs in the ring
slot (a 70B attn group is 2 runs, an ffn group 1), into the buffer at the same relative offsets,
so the model's weight views are laid out once per (layer, kind) (`shm.slot_plan.GroupViews`).

The host waits for a copy only when compute needs that very group, and keeps pumping while it
waits (offers in, new copies out), so the copy engine never idles for the host. On device "cpu"
copies are plain synchronous tensor copies; everything else is the same.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from ringllm.checkpoint.layout import GROUP_KINDS, ModelLayout
from ringllm.shm.channel import Channel, Release, Shutdown, SlotReady, Want
from ringllm.shm.ring import READY, Ring
from ringllm.shm.slot_plan import GroupViews, LayerPlan
from ringllm.workers.model import AttnWeights, FfnWeights
from ringllm.workers.process_setup import stop_requested
from ringllm.workers.scheduler import GroupCopy, Lookahead, SlotOffer, StreamScheduler
from ringllm.workers.weights import assemble_group, typed_view

log = logging.getLogger("ringllm.gpu")
GROUP_LOG_INTERVAL_S = 1.0
WAIT_POLL_S = 0.0002          # how often the host looks at a copy it waits for (pumping meanwhile)


class TornCopy(RuntimeError):
    """A ring slot changed while (or before) we copied from it."""


class StreamStalled(RuntimeError):
    """A layer did not arrive within the wait timeout."""


@dataclass
class StreamStats:
    h2d_bytes: int = 0
    h2d_copies: int = 0                     # groups copied
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
                 passes: int | None = None, registrar=None, rank: int = 0):
        self.layout, self.engine = layout, engine
        self.rank = rank          # tensor parallel: which GPU process this is, named in Want and Release
        self.ring, self.ring_tensor, self.device = ring, ring_tensor, device
        self.coord, self.inbox = coord, inbox
        self.n = layout.config.num_layers
        # layers 0..R-1 stay on the GPU (loaded once) and only the others stream. Resident layers
        # come first in the pass so that their compute overlaps the copies of the streamed ones.
        self.resident = resident or {}
        if sorted(self.resident) != list(range(len(self.resident))):
            raise ValueError("GPU-resident layers must be the first ones of the pass")
        self.sched = StreamScheduler(self.n, len(self.resident), Lookahead.of(engine), engine.group_budget, passes)
        self.views = [{kind: GroupViews.plan(layout.group(layer, kind), plans[layer]) for kind in GROUP_KINDS}
                      for layer in range(self.n)]
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # as the memory plan sizes them; a group laid out by its runs never needs more for a Llama
        # checkpoint (the last tensor of each kind needs no padding), but never trust that
        sizes = {kind: max(layout.max_group_bytes[kind], *(v[kind].nbytes for v in self.views))
                 for kind in GROUP_KINDS}
        self.buffers = {kind: [torch.empty(sizes[kind], dtype=torch.uint8, device=device)
                               for _ in range(count)]
                        for kind, count in zip(GROUP_KINDS, engine.group_budget)}
        # per buffer: "compute finished reading it" and "the copy into it finished"; recorded
        # again on every use (no allocation per group)
        self.free_events = {kind: [torch.cuda.Event() if self.cuda else None for _ in bufs]
                            for kind, bufs in self.buffers.items()}
        self.copy_events = {kind: [torch.cuda.Event() if self.cuda else None for _ in bufs]
                            for kind, bufs in self.buffers.items()}
        self.stats = StreamStats()
        self.logged_at = 0.0
        self.chaos_rng, self.chaos_delay = random.Random(chaos[0]), chaos[1]   # tests only
        self.page, self.published_at, self.tokens = stats_page, 0.0, 0
        # [P18] offers whose slot is not registered with CUDA yet wait here, in arrival order
        self.registrar = registrar
        self.unregistered: deque[SlotOffer] = deque()

    @property
    def resident_count(self) -> int:
        return self.sched.resident

    # --- the WeightSource interface ------------------------------------------------------------
    def attn(self, layer: int) -> AttnWeights:
        return self._acquire(layer, 0)

    def ffn(self, layer: int) -> FfnWeights:
        return self._acquire(layer, 1)

    def release(self, layer: int, kind: str) -> None:
        copy = self.sched.done()
        if copy is None:                     # a GPU-resident group: nothing to recycle
            return
        if self.cuda:   # [P8] the next copy into this buffer waits for the compute issued on it
            self.free_events[copy.kind][copy.buffer].record(torch.cuda.current_stream(self.device))
        self._pump()

    # --- internals -----------------------------------------------------------------------------
    def _acquire(self, layer: int, kind_index: int):
        g = self.sched.next_group(layer, kind_index)
        kind = GROUP_KINDS[kind_index]
        if layer < self.resident_count:
            self.sched.take(g)
            self.stats.groups_served += 1
            self._pump()
            return self.resident[layer][kind]
        if self.chaos_delay:
            time.sleep(self.chaos_rng.uniform(0, self.chaos_delay))
        t0 = time.perf_counter()
        deadline = t0 + self.engine.wait_timeout_s
        waited = False
        # Wait until this group's copy is complete and checked, pumping all the while.
        while True:
            self._pump()
            copy = self.sched.copies.get(g)
            if copy is not None and copy.verified:
                break
            waited = True
            if stop_requested():
                raise SystemExit(143)
            if time.perf_counter() > deadline:
                if copy is not None:
                    where = "copied to the device (the copy never completed)"
                elif g // 2 in self.sched.offered:
                    where = "copied: offered, but no copy could start (buffers, backlog or pair limit)"
                elif any(o.step == g // 2 for o in self.unregistered):
                    where = "copied: offered, but its ring slot was never registered with CUDA"
                else:
                    where = "offered by the coordinator (the ring never held it)"
                raise StreamStalled(f"layer {layer} ({kind}) not {where} after {self.engine.wait_timeout_s:.0f} s")
            self._receive(timeout=0.005 if copy is None else WAIT_POLL_S)
        if waited:
            self.stats.waits += 1
            self.stats.wait_seconds += time.perf_counter() - t0
        event = self.copy_events[kind][copy.buffer]
        if self.cuda:   # [P8] compute reads the group only after its copy
            torch.cuda.current_stream(self.device).wait_event(event)
        self.sched.take(g)
        self.stats.groups_served += 1
        buf, views = self.buffers[kind][copy.buffer], self.views[layer][kind]
        group = self.layout.group(layer, kind)
        return assemble_group(group, [typed_view(buf, at, e.extent) for at, e in zip(views.offsets, group.entries)])

    def _receive(self, timeout: float) -> None:
        try:
            msg = self.inbox.items.get(timeout=timeout) if timeout else self.inbox.items.get_nowait()
            while True:
                if msg is None:
                    if self.inbox.shutdown.is_set():
                        raise SystemExit(143)
                else:
                    self.unregistered.append(SlotOffer(msg.step, msg.layer, msg.slot, msg.generation))
                msg = self.inbox.items.get_nowait()
        except queue.Empty:
            pass
        # [P18] a copy starts only out of a registered slot: pass offers on in order once it is
        while self.unregistered and (self.registrar is None or self.registrar.ready(self.unregistered[0].slot)):
            self.sched.offer(self.unregistered.popleft())

    def _complete(self, g: int) -> bool:
        copy = self.sched.copies[g]
        event = self.copy_events[copy.kind][copy.buffer]
        return event is None or event.query()

    def _pump(self) -> None:
        """Everything the scheduler allows now: take offers in, send Wants, check finished
        copies, Release slots, start copies."""
        self._receive(timeout=0)
        compute = self.sched.compute
        for step in self.sched.wants():
            self.coord.send(Want(step, compute, self.rank), timeout=self.engine.wait_timeout_s)
        self._check_finished()
        for offer in self.sched.releases():
            self.coord.send(Release(offer.step, offer.slot, offer.generation, compute, self.rank),
                            timeout=self.engine.wait_timeout_s)
        for copy in self.sched.start_copies(self.sched.in_flight(self._complete)):
            self._copy(copy)
        self._log_groups()
        self.publish()

    def _check_finished(self) -> None:
        for copy in list(self.sched.copies.values()):
            if not copy.verified and self._complete(copy.g):
                self._verify(copy)

    def publish(self, force: bool = False) -> None:
        """Update the stats page for `ringllm top` (at most 20 times a second)."""
        now = time.monotonic()
        if self.page is None or (not force and now - self.published_at < 0.05):
            return
        self.published_at = now
        in_flight = sum(1 for c in self.sched.copies.values() if not c.verified)
        total = sum(len(b) for b in self.buffers.values())
        used = total - sum(len(f) for f in self.sched.free.values())
        self.page.gpu(self.tokens, self.stats.h2d_bytes, in_flight, used, total, self.resident_count,
                      self.stats.wait_seconds, self.sched.compute)

    def _copy(self, copy: GroupCopy) -> None:
        kind, views = copy.kind, self.views[copy.offer.layer][copy.kind]
        buf = self.buffers[kind][copy.buffer]
        base = self.ring.slot_base(copy.offer.slot)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                # [P8] never overwrite what compute still reads (an event not yet recorded: no wait)
                self.copy_stream.wait_event(self.free_events[kind][copy.buffer])
                for src, dst, nbytes in views.runs:
                    buf[dst:dst + nbytes].copy_(self.ring_tensor[base + src:base + src + nbytes], non_blocking=True)
                self.copy_events[kind][copy.buffer].record(self.copy_stream)
        else:
            for src, dst, nbytes in views.runs:
                buf[dst:dst + nbytes].copy_(self.ring_tensor[base + src:base + src + nbytes])
        self.stats.h2d_copies += 1
        self.stats.h2d_bytes += sum(run[2] for run in views.runs)

    def _verify(self, copy: GroupCopy) -> None:
        """[P7] After the copy completed, before compute may use it: the slot still holds what we
        were told (shm.ring, step a) and no loader wrote into it late (steps b, c)."""
        o, kind = copy.offer, copy.kind
        state, layer, generation = self.ring.read_slot(o.slot)
        if generation != o.generation or state != READY or layer != o.layer:
            raise TornCopy(
                f"ring slot {o.slot} changed under a copy of layer {o.layer} {kind}: "
                f"expected generation {o.generation}, found {generation} (state {state}, layer {layer})")
        late = self.ring.late_write(o.slot, o.generation)
        if late is not None:
            raise TornCopy(f"ring slot {o.slot} (layer {layer}, generation {generation}) under a copy of layer "
                           f"{o.layer} {kind}: {late}")
        self.sched.verified(copy.g)

    def warm_up(self) -> int:
        """warmup_layers: have the first streamed layers' groups on the GPU before the first token.
        Waits for EngineConfig.warmup_layers_for(streamed) layers, and of those exactly the groups
        the scheduler issues before compute starts [P14]. Returns the layers waited for."""
        layers = self.engine.warmup_layers_for(self.sched.streamed)
        target = set(self.sched.warm_up_groups(layers))
        deadline = time.perf_counter() + self.engine.wait_timeout_s
        while not all(g in self.sched.copies and self.sched.copies[g].verified for g in target):
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
        used = {k: len(b) - len(self.sched.free[k]) for k, b in self.buffers.items()}
        total = sum(len(b) for b in self.buffers.values())
        log.info("[WSM] GPU groups: %d/%d used (attn=%d, ffn=%d)%s", used["attn"] + used["ffn"], total,
                 used["attn"], used["ffn"],
                 f"; layers 0..{self.resident_count - 1} resident" if self.resident else "")
