"""Fault injection for tests: one frozen plan, built by a test and handed to every process.

A run without faults gets `NO_FAULTS`; nothing in the engine changes behaviour unless a field is
set. Each field says which process acts on it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultPlan:
    # loaders + GPU process: (seed, max seconds) of a random delay before each chunk / group
    chaos_seed: int = 0
    chaos_delay_s: float = 0.0
    # loader: (loader index, chunk number) pairs whose read fails with EIO
    read_errors: tuple[tuple[int, int], ...] = ()
    # loader: every loader dies (exit 1, no goodbye) when this chunk number arrives
    crash_loaders_at_chunk: int = -1
    # loader: (loader index, chunk number, seconds). After reading that chunk and reporting it,
    # the loader serves the same job again this much later: a duplicate job delivered late (its
    # before-check must find the slot moved on, and skip it)
    late_duplicate: tuple[int, int, float] = (-1, -1, 0.0)
    # loader: (loader index, chunk number, seconds). As late_duplicate, but the duplicate passes
    # its before-check at once, before the original is reported, and waits at least this long,
    # and until the slot has been given to another load, before it writes
    late_write: tuple[int, int, float] = (-1, -1, 0.0)
    # coordinator: rewrite the slot's generation in the header just before this offer
    tamper_at_offer: int = -1
    # supervisor: SIGKILL this loader once, as soon as it is ready ...
    kill_loader_when_ready: int = -1
    # ... and hold back the restart notice to the coordinator this long
    restart_notice_delay_s: float = 0.0
    # supervisor: (loader index, N) pairs: SIGKILL each of that loader's first N processes as
    # soon as it is ready (N deaths of that index in a row)
    kill_loaders_when_ready: tuple[tuple[int, int], ...] = ()
    # supervisor: start the coordinator on this estimate of the GPU-resident layers instead of
    # its own (a wrong estimate, which the GPU process's ResidentLayers must correct)
    resident_estimate: int | None = None
    # GPU process of tensor-parallel rank 1: sample with the seed + 1 (ranks that diverge, which
    # the supervisor's agreement check must catch)
    rank_seed_skew: bool = False
    # GPU process of tensor-parallel rank 1: SIGSTOP itself after this many tokens (0: never): a
    # rank alive but hung, which the others must give up on and the supervisor must name
    rank_stops_after_tokens: int = 0

    @property
    def chaos(self) -> tuple[int, float]:
        return self.chaos_seed, self.chaos_delay_s

    def loader_kills(self, loader: int) -> int:
        """How many of this loader's processes the supervisor kills when they report ready."""
        kills = max((n for index, n in self.kill_loaders_when_ready if index == loader), default=0)
        return max(kills, 1 if loader == self.kill_loader_when_ready else 0)

    def read_error_chunk(self, loader: int) -> int:
        """The chunk number at which this loader's read fails, -1 for none."""
        return next((chunk for index, chunk in self.read_errors if index == loader), -1)

    def duplicate_delay(self, loader: int, chunk: int) -> tuple[float, bool] | None:
        """(seconds, whether the before-check is passed first) of a late duplicate of this
        loader's chunk, or None."""
        for (index, at, seconds), checked_first in ((self.late_duplicate, False), (self.late_write, True)):
            if (index, at) == (loader, chunk):
                return seconds, checked_first
        return None


NO_FAULTS = FaultPlan()
