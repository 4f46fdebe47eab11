"""`ringllm serve --tensor-parallel 2` on cpu: what the ranks must get right beyond the happy path
(tests/test_serve_streaming.py has concurrent greedy requests and the drain). --resident with
ranks is refused in one line; rank 1's GPU process killed mid-stream means 503s, a non-zero exit
and nothing left (both ranks' queues); a client that leaves mid-stream does not disturb the other
request; an unseeded sampled request is answered (the ranks agree on its seed) and a stop string
stops where a one-process server stops. The autouse leak check in conftest.py runs after each."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.test_serve_lifecycle import free_port  # noqa: E402


def test_resident_with_ranks_refused_in_one_line(tiny):
    """serve refuses --resident --tensor-parallel 2 as generate does, before anything starts
    (it used to serve on one process, the ranks silently dropped)."""
    model_dir, _ = tiny
    proc = subprocess.Popen([sys.executable, "-m", "ringllm", "serve", "--model", str(model_dir), "--port",
                             str(free_port()), "--device", "cpu", "--resident", "--tensor-parallel", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.terminate()       # it serves instead of refusing: stop it, then fail
        err = proc.communicate(timeout=30)[1]
        pytest.fail(f"serve --resident --tensor-parallel 2 kept running instead of refusing:\n{err}")
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == ["ringllm: error: --tensor-parallel 2 runs the streaming engine (one process "
                                        "a rank); --resident is one process"], err
