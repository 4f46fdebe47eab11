"""Step arithmetic shared by both ends of the ring protocol (docs/PROTOCOL.md is the full page).

A *step* is `pass * N + layer`: the GPU process walks layers 0..N-1 once per forward pass, pass
after pass, so steps only grow while layers wrap mod N. Layers below `resident` stay on the GPU
for the whole run and never stream. The coordinator's window (coordinator.policy) and the GPU
process's look-ahead (workers.scheduler) both count *streamed* steps from the compute step with
`streamed_steps`, so the two ends skip resident layers and stop at the same boundaries alike.
They start differently on purpose: the coordinator's targets include the compute step itself
(its layer must be in the ring), the GPU process's look-ahead counts the steps after it, and
while compute is on a GPU-resident layer, the steps after the pass's first streamed one
(`step_ahead`).
"""
from __future__ import annotations


def streams(step: int, num_layers: int, resident: int) -> bool:
    """Does this step's layer come through the ring (rather than stay on the GPU)?"""
    return step % num_layers >= resident


def streamed_steps(first: int, count: int, num_layers: int, resident: int, end: int | None = None) -> list[int]:
    """The first `count` steps from `first` (inclusive) whose layer streams, stopping before
    `end` when given. Empty when nothing streams."""
    out: list[int] = []
    if resident >= num_layers:
        return out
    step = first
    while len(out) < count and (end is None or step < end):
        if streams(step, num_layers, resident):
            out.append(step)
        step += 1
    return out


def step_ahead(compute: int, ahead: int, num_layers: int, resident: int, last_step: int | None = None) -> int:
    """The step `ahead` streamed steps past `compute` (compute itself not counted), never past
    `last_step` (the generation's last step) nor behind compute; compute itself when nothing
    streams or ahead is 0.

    While compute is on a GPU-resident layer, the count starts at the pass's first streamed
    step, as if compute were there: no streamed group is in compute then, so the look-ahead
    holds the same number of layers as anywhere else (first, and `ahead` past it). Counted from
    the resident layer itself, the copies ran dry at each pass boundary: the look-ahead stopped
    at the first streamed layers, copied long before, while the resident layers computed (an
    H200 trace: the copy engine idle 28-32 ms a pass with 9 resident 70B layers)."""
    base = compute
    if ahead > 0 and 0 <= resident < num_layers and not streams(compute, num_layers, resident):
        base = compute - compute % num_layers + resident       # this pass's first streamed step
    ahead_steps = streamed_steps(base + 1, ahead, num_layers, resident)
    step = ahead_steps[-1] if ahead_steps else compute
    return step if last_step is None else max(compute, min(step, last_step))
