"""The bench runs on CPU in CI with a tiny checkpoint, so that it never rots."""
from __future__ import annotations

import json

from ringllm.cli import main
from ringllm.tools.make_checkpoint import make_checkpoint


def test_make_checkpoint_is_a_valid_sharded_hf_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ringllm.checkpoint.layout import load_layout

    d = make_checkpoint(tmp_path / "c", "tiny", 3, shard_bytes=30_000, progress=False)
    names = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    layout = load_layout(d)
    assert layout.config.num_layers == 3 and layout.dtype == "BF16" and layout.config.rope_scaling
    hf = AutoModelForCausalLM.from_pretrained(d)          # transformers reads it too
    assert hf.config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(d)("t5 t6")["input_ids"] == [5, 6]


def test_bench_on_cpu(tmp_path, capsys):
    d = make_checkpoint(tmp_path / "c", "tiny", 6, shard_bytes=60_000, progress=False)
    out = tmp_path / "r.json"
    code = main(["bench", "--model", str(d), "--device", "cpu", "--gpu-mem", "300MiB", "--decode-tokens", "4",
                 "--prompt-tokens", "16", "--prefill-tokens", "64", "--peers", "naive,accelerate", "--loaders", "2",
                 "--set", "CPU_CAP_VALUE=3", "--set", "GPU_AHEAD_LAYERS=1", "--set", "GPU_RESIDENT_LAYERS=2",
                 "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"ceiling: group copies back to back", "ringllm decode DRAM-fed", "ringllm decode disk-fed",
                         "ringllm prefill 64 DRAM-fed", "naive", "accelerate"}
    # the group ceiling moves exactly the streamed layers' bytes, read from the checkpoint itself
    from tests.conftest import layer_tensor_bytes
    assert report["streamed_bytes_per_pass"] == layer_tensor_bytes(d, first_layer=2)
    ceiling = rows["ceiling: group copies back to back"]
    assert ceiling["gbps"] > 0 and abs(ceiling["seconds"] * ceiling["gbps"] * 1e9 - report["streamed_bytes_per_pass"]) < 1
    dram_row = rows["ringllm decode DRAM-fed"]
    assert dram_row["extra"]["group_ceiling_ratio"] == ceiling["seconds"] / dram_row["seconds"]
    for name in ("ringllm decode DRAM-fed", "ringllm decode disk-fed", "ringllm prefill 64 DRAM-fed", "naive"):
        assert rows[name]["seconds"] > 0 and rows[name]["floor"] > 0 and rows[name]["ratio"] > 0, name
    assert rows["naive"]["note"] == "same tokens as ringllm: yes"      # same model code: exact
    assert "needs a CUDA device" in rows["accelerate"]["note"]
    assert report["resident_layers"] == 2 and report["streamed_layers"] == 4
    dram = report["runs"]["decode DRAM-fed"]["coordinator"]["since_mark"]
    assert dram["disk_bytes"] == 0                         # the timed part never touched the disk
    disk = report["runs"]["decode disk-fed"]["coordinator"]["since_mark"]
    assert disk["disk_bytes"] > 0
    assert "floor/ach" in table and "ringllm decode DRAM-fed" in table
    # the disk ceiling comes from the loaders reading the streamed layers' chunks (not threads
    # reading whole shards): every chunk of layers 2.. once, cut at the end of its file
    from ringllm.checkpoint.layout import load_layout
    from ringllm.shm.slot_plan import plan_model
    from tests.test_disk_probe import bytes_in_files
    c = report["ceilings"]
    assert c["disk_loaders"] == 2 and report["disk_by_loaders"] == {"2": c["disk_gbps"]}
    assert c["disk_bytes"] == bytes_in_files(plan_model(load_layout(d))[2:], report["engine"]["chunk_bytes"])[0]
    assert c["disk_gbps"] > 0 and c["disk_threaded_gbps"] > 0
    # each run carries RunResult's start-up and wall-clock times
    for run in report["runs"].values():
        assert run["result"]["startup_wall_s"] > 0 and run["result"]["first_token_wall_s"] > 0


def test_tier_bench_on_cpu(tmp_path, capsys):
    """The tier bench end to end on a tiny model: 8 layers, 2 on the "GPU", 6 stream, a ring of 3
    with a look-ahead of 1; the tiers pin as auto does (all but a disk window of 2): 1 pinned."""
    from ringllm.tools.tier_bench import main as tier_main
    from tests.conftest import layer_tensor_bytes

    d = make_checkpoint(tmp_path / "c", "tiny", 8, shard_bytes=60_000, progress=False)
    out = tmp_path / "out"
    code = tier_main(["--model", str(d), "--out", str(out), "--device", "cpu", "--gpu-mem", "300MiB",
                      "--resident-layers", "2", "--new-tokens", "4", "--prompt-tokens", "8", "--loaders", "2",
                      "--set", "GPU_AHEAD_LAYERS=1", "--set", "WSM_CPU_RING_MODE=0"])
    assert code == 0
    report = json.loads((out / "tier-bench.json").read_text())
    assert report["card"] == "cpu" and "--resident-layers 2" in report["command"]
    assert (report["streamed_layers"], report["ring_slots"], report["lookahead"], report["pinned_layers"]) == (6, 3, 1, 1)
    streamed = layer_tensor_bytes(d, first_layer=2)
    assert report["streamed_bytes_per_pass"] == streamed
    ceilings = report["ceilings"]
    assert ceilings["disk_gbps"] > 0 and ceilings["disk_loaders"] == 2 and ceilings["disk_threaded_gbps"] > 0
    sliding, tiers = report["runs"]["sliding window"], report["runs"]["tiers"]
    assert (sliding["engine"]["cpu_cap"], sliding["engine"]["cpu_pinned_layers"]) == (3, 0)
    assert (tiers["engine"]["cpu_cap"], tiers["engine"]["cpu_pinned_layers"]) == (3, 1)
    assert report["same_tokens"]
    # the sliding window reads every streamed layer each pass, counted from the Mark after the
    # ring's fill: 4 passes of the 6 streamed layers, less the 3 the full ring holds when timing
    # starts (WSM_CPU_RING_MODE=0: no window reads ahead into a 5th pass). The tiers never read
    # their pinned layer 2 again: 4 passes of layers 3..7, less the 2 in the ring at the start.
    # A layer's read costs its chunks, cut at the end of their file.
    from ringllm.checkpoint.layout import load_layout
    from ringllm.shm.slot_plan import plan_model
    from tests.test_disk_probe import bytes_in_files
    layer_read = [bytes_in_files([p], report["runs"]["tiers"]["engine"]["chunk_bytes"])[0]
                  for p in plan_model(load_layout(d))]
    assert sliding["disk_bytes_timed"] == 4 * sum(layer_read[2:]) - sum(layer_read[2:5])
    assert tiers["disk_bytes_timed"] == 4 * sum(layer_read[3:]) - sum(layer_read[3:5])
    assert sliding["metrics"]["disk_bytes_per_token"] == sliding["disk_bytes_timed"] / 4
    for run in (sliding, tiers):
        m = run["metrics"]
        assert m["s_per_token"] > 0 and m["disk_over_streamed"] == m["disk_bytes_per_token"] / streamed
        assert m["floor_s"] == m["disk_bytes_per_token"] / (ceilings["disk_gbps"] * 1e9)
        assert m["floor_over_achieved"] == m["floor_s"] / m["s_per_token"]
        assert run["result"]["startup_wall_s"] > 0 and run["result"]["first_token_wall_s"] > 0
    assert report["speedup_tiers_over_sliding"] == sliding["metrics"]["s_per_token"] / tiers["metrics"]["s_per_token"]
    table = (out / "tier-bench.txt").read_text()
    assert table.strip() == capsys.readouterr().out.strip()
    assert "sliding window" in table and "tiers over the sliding window" in table


def test_tier_bench_bad_input_is_one_line(tmp_path, capsys):
    from ringllm.tools.tier_bench import main as tier_main

    d = make_checkpoint(tmp_path / "c", "tiny", 3, shard_bytes=60_000, progress=False)
    code = tier_main(["--model", str(d), "--out", str(tmp_path / "o"), "--device", "cpu", "--resident-layers", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("ringllm: error: --resident-layers 2: 1 of the 3 layers would stream"), err
