"""tools/serve_bench (the serving load test) end to end on CPU against `ringllm serve` on the
streaming engine with a tiny model, so that the GPU session's one command does not rot: every
stream gets its tokens, the rows add up, the server drains and exits 0."""
from __future__ import annotations

import json

from ringllm.tools import serve_bench
from tests.conftest import make_model_dir


def test_rounds_add_up_and_the_server_exits_clean(tmp_path):
    d = make_model_dir(tmp_path / "m", num_hidden_layers=2)
    out = tmp_path / "out"
    code = serve_bench.main(["--model", str(d), "--out", str(out), "--streams", "1,3", "--max-tokens", "5",
                             "--prompt-tokens", "6", "--", "--device", "cpu", "--loaders", "2",
                             "--set", "GPU_AHEAD_LAYERS=1"])
    assert code == 0
    report = json.loads((out / "serve-bench.json").read_text())
    assert [r["streams"] for r in report["rounds"]] == [1, 3]
    for r in report["rounds"]:
        assert r["errors"] == [] and r["tokens"] == 5 * r["streams"]
        assert r["tokens_per_s"] == r["tokens"] / r["wall_s"]
        assert 0 < r["token_latency_p50_s"] <= r["token_latency_p95_s"]
    one, three = report["rounds"]
    assert three["over_1_stream"] == three["tokens_per_s"] / one["tokens_per_s"]
    assert report["server_exit"] == 0
    assert "x 1 stream" in (out / "serve-bench.txt").read_text()
