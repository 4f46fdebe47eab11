"""warmup_layers never waits for more than the copy look-ahead issues: with GPU-resident layers,
with WSM_BALANCE_AHEAD above the look-ahead, with few group buffers.

Real runs (supervisor + coordinator + loaders + GPU process on cpu) for the reported stalls, tokens
against the in-process reference; then a wide sweep that drives the real StreamingSource against
the real RingPolicy in this process (loads complete at once), so that hundreds of configurations
take seconds.
"""
from __future__ import annotations

import itertools
import queue
import threading
from collections import Counter
from dataclasses import replace

import pytest
import torch

from ringllm.checkpoint.layout import load_layout
from ringllm.config import EngineConfig, build_config, resolve_config
from ringllm.coordinator.policy import RingPolicy
from ringllm.shm.channel import Release, SlotReady, Want
from ringllm.shm.slot_plan import plan_model, slot_size
from ringllm.supervisor.supervisor import Supervisor
from ringllm.workers.generation import SamplingParams
from ringllm.workers.streaming import StreamingSource
from tests.conftest import make_hf_checkpoint
from tests.test_streaming import assert_run_cleaned, resident_tokens

PROMPTS = [[7, 8, 9, 10]]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    d = tmp_path_factory.mktemp("warm") / "m"
    make_hf_checkpoint(d, num_hidden_layers=7, seed=9)
    return d, resident_tokens(d, PROMPTS, NEW_TOKENS)


def run(model_dir, engine: EngineConfig):
    sup = Supervisor(load_layout(model_dir), engine, "cpu", "float32")
    result = sup.run(PROMPTS, NEW_TOKENS, SamplingParams(), (), lambda i, t: None)
    assert_run_cleaned(sup)
    return result


# wait_timeout_s=5: before the fix these ended in StreamStalled ("warm-up of 3 layers did not finish")
@pytest.mark.parametrize("knobs", [
    dict(gpu_resident_layers=3, warmup_layers=3, balance_ahead=2),
    dict(gpu_ahead_layers=2, balance_ahead=4, warmup_layers=5),
], ids=["3-resident-warmup3-balance2", "ahead2-balance4-warmup5"])
def test_reported_warm_up_stalls_finish(seven, knobs):
    d, reference = seven
    result = run(d, build_config(loaders=2, wait_timeout_s=5, **knobs))
    assert result.outputs == reference


def test_warm_up_reach_comes_from_the_engine_config_not_the_raw_knobs(seven):
    """An EngineConfig made without build_config (nothing lowered at config time): the GPU
    process still waits only for what its copy look-ahead issues."""
    d, reference = seven
    engine = replace(build_config(loaders=2, gpu_ahead_layers=2, cpu_cap=3, wait_timeout_s=5),
                     balance_ahead=4, warmup_layers=5, gpu_resident_layers=3)
    assert (engine.copy_ahead, engine.warmup_layers_for(7 - 3)) == (2, 2)
    assert run(d, engine).outputs == reference


def test_config_lowers_what_cannot_take_effect_with_one_line_each():
    r = resolve_config(overrides={"GPU_AHEAD_LAYERS": "2", "WSM_BALANCE_AHEAD": "4", "warmup_layers": "5"})
    assert (r.engine.balance_ahead, r.engine.warmup_layers) == (2, 2)
    assert len(r.notes) == 2
    assert r.notes[0].startswith("WSM_BALANCE_AHEAD=4 (--set WSM_BALANCE_AHEAD) is beyond the look-ahead of 2 layers")
    assert r.notes[1].startswith("warmup_layers=5 (--set warmup_layers) is more than can be copied")
    # the streamed layers bound the warm-up when they are known
    assert resolve_config(warmup_layers=4, streamed_layers=1).engine.warmup_layers == 1
    # a look-ahead from prefetch_distance: the derived balance follows it, no note
    r = resolve_config(overrides={"prefetch_distance": "2"})
    assert (r.engine.balance_ahead, r.engine.copy_ahead, r.notes) == (2, 2, ())


# --- the sweep -------------------------------------------------------------------------------------
class InboxStandIn:
    """What StreamingSource's InboxReader reads: a queue of messages and the Shutdown flag."""

    def __init__(self):
        self.items, self.shutdown = queue.Queue(), threading.Event()


class InProcessCoordinator:
    """The coordinator's decisions without its process, for `ranks` StreamingSources: Want and
    Release go straight to a RingPolicy with the rank they carry, every load completes at once,
    and every offer lands in each rank's inbox (`inboxes[rank]`). `seen` counts the messages by
    (type, rank)."""

    def __init__(self, policy: RingPolicy, ranks: int = 1):
        self.policy, self.seen = policy, Counter()
        self.inboxes = [InboxStandIn() for _ in range(ranks)]

    def send(self, msg, timeout=None):
        self.seen[type(msg).__name__, msg.rank] += 1
        if isinstance(msg, Want):
            self.policy.want(msg.step, msg.compute_step, msg.rank)
        elif isinstance(msg, Release):
            self.policy.release(msg.step, msg.slot, msg.generation, msg.compute_step, msg.rank)
        while True:
            loads, offers = self.policy.schedule()
            for o in offers:
                for inbox in self.inboxes:
                    inbox.items.put(SlotReady(o.step, o.layer, o.slot, o.generation))
            if not loads:
                return
            for load in loads:
                self.policy.loaded(load.slot, load.generation)


class PolicyRing:
    """The ring header as the policy keeps it; every slot's bytes are one scratch slot."""

    def __init__(self, policy: RingPolicy):
        self.policy = policy

    def slot_base(self, slot: int) -> int:
        return 0

    def read_slot(self, slot: int):
        info = self.policy.slots[slot]
        return info.state, info.layer, info.generation

    def late_write(self, slot: int, generation: int):
        return None                      # no loaders here: nothing can write late


def walk(layout, plans, scratch, engine: EngineConfig, resident: int, passes: int) -> int:
    """Warm up, then compute `passes` forward passes group by group; returns the layers the
    warm-up waited for. A stall raises StreamStalled after engine.wait_timeout_s."""
    n = layout.config.num_layers
    policy = RingPolicy(n, engine.ring_slots, engine.cpu_ring_offset, engine.cpu_cap, engine.cpu_ring_mode,
                        engine.cpu_hwm, engine.cpu_lwm, engine.cpu_back_margin)
    policy.set_resident(resident)
    coord = InProcessCoordinator(policy)
    source = StreamingSource(layout, plans, engine, PolicyRing(policy), scratch, torch.device("cpu"), coord,
                             coord.inboxes[0],
                             resident={layer: {"attn": None, "ffn": None} for layer in range(resident)},
                             passes=passes)
    warmed = source.warm_up() if engine.warmup_layers else 0
    copied_before_compute = sum(1 for copy in source.sched.copies.values() if copy.verified)
    assert copied_before_compute >= 2 * warmed
    for step in range(passes * n):
        layer = step % n
        source.attn(layer)
        source.release(layer, "attn")
        source.ffn(layer)
        source.release(layer, "ffn")
    return warmed


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep") / "m"
    make_hf_checkpoint(d, num_hidden_layers=5)
    layout = load_layout(d)
    plans = plan_model(layout)
    return layout, plans, torch.zeros(slot_size(plans), dtype=torch.uint8)


@pytest.mark.parametrize("ahead,balance", [(1, 1), (1, 3), (2, 1), (2, 4), (3, 3), (4, 2), (4, 6)])
def test_no_configuration_stalls(five, ahead, balance):
    """GPU-resident layers 0..5 of 5, warmup_layers 0..6, 2/3/11 group buffers, the smallest and
    the largest ring: the warm-up and two passes finish, and the warm-up waits for
    min(warmup_layers, copy look-ahead, streamed layers, buffers per kind) layers."""
    layout, plans, scratch = five
    n = layout.config.num_layers
    for resident, warmup, groups, cap_kind in itertools.product(range(n + 1), range(7), (2, 3, 11), ("min", "all")):
        streamed = n - resident
        cap = max(1, min(ahead, streamed)) if cap_kind == "min" else max(1, streamed)
        engine = EngineConfig(gpu_ahead_layers=ahead, balance_ahead=balance, warmup_layers=warmup,
                              gpu_max_groups=groups, cpu_cap=cap, cpu_hwm=cap + 3, cpu_lwm=max(0, cap - 3),
                              cpu_ring_offset=ahead, wait_timeout_s=0.5)
        case = f"resident={resident} warmup={warmup} groups={groups} cap={cap}"
        warmed = walk(layout, plans, scratch, engine, resident, passes=2)
        assert warmed == min(warmup, ahead, balance, streamed, groups // 2), case
        # what build_config makes of the same knobs, knowing what streams, warms up the same
        resolved = resolve_config(gpu_ahead_layers=ahead, balance_ahead=balance, warmup_layers=warmup,
                                  gpu_max_groups=groups, cpu_cap=cap, streamed_layers=streamed)
        assert resolved.engine.warmup_layers == warmed, case
