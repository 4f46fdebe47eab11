"""docs/PROTOCOL.md and the code agree: every invariant id on the page is marked `[Pn]` at the
code that enforces it, every marker in the code is on the page, and every message type of
shm/channel.py has its row in the page's message table."""
from __future__ import annotations

import re
from pathlib import Path

from ringllm.shm import channel

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "PROTOCOL.md").read_text()
SOURCES = [p for d in ("checkpoint", "coordinator", "ringllm", "shm", "supervisor", "workers")
           for p in (ROOT / d).rglob("*.py")]


def code_markers() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pid in re.findall(r"\[(P\d+)\]", line):
                found.setdefault(pid, []).append(f"{path.relative_to(ROOT)}:{n}")
    return found


def page_invariants() -> set[str]:
    return set(re.findall(r"^\| (P\d+) \|", PAGE, flags=re.M))


def test_every_invariant_is_enforced_where_the_code_says():
    marked, listed = code_markers(), page_invariants()
    assert listed, "no invariant table found in docs/PROTOCOL.md"
    assert not listed - set(marked), f"on the page but marked nowhere in the code: {sorted(listed - set(marked))}"
    assert not set(marked) - listed, {pid: marked[pid] for pid in set(marked) - listed}


def test_every_message_type_is_on_the_page():
    rows = {int(k): name for k, name in re.findall(r"^\| (\d+) \| (\w+) \|", PAGE, flags=re.M)}
    kinds = {kind: cls.__name__ for kind, cls in channel._KINDS.items()}
    assert rows == kinds
