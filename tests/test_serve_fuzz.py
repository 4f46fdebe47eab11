"""The serve fuzzer's short run (issue #23): `ringllm serve` on the tiny checkpoint, on the
resident and on the streaming engine, gets 150 hostile requests (tools/fuzz_catalogue.py, seed 0)
beside 8 honest openai-client streams. Every honest answer must be transformers' greedy text,
every hostile request a 4xx (or, where it may be valid, a well-formed 200), the engine idle with
an empty KV cache afterwards, and the server must exit 0 on SIGTERM leaving nothing behind. The
long run is the tool: python -m ringllm.tools.serve_fuzz --requests 2000 --honest 64."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("httpx")

from ringllm.tools.fuzz_catalogue import FuzzTarget, draw  # noqa: E402
from ringllm.tools.serve_fuzz import run_fuzz, summary  # noqa: E402


@pytest.mark.parametrize("engine", ["resident", "streaming"])
def test_serve_survives_hostile_requests_beside_honest_streams(tiny, engine):
    report = run_fuzz(tiny[0], requests=150, honest=8, seed=0, resident=engine == "resident")
    assert report["ok"], summary(report)


def test_a_probe_is_the_same_drawn_alone():
    """--replay i must send exactly the request the run sent as number i."""
    target = FuzzTarget("127.0.0.1:8000", "fuzz", 128, 1 << 18)
    run = [draw(7, i, target) for i in range(40)]
    assert [draw(7, i, target).raw for i in (39, 3, 17)] == [run[39].raw, run[3].raw, run[17].raw]
    assert len({p.mutation.split(":")[0] for p in run}) >= 4, "the catalogue's kinds are all drawn"
