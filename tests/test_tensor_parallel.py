"""Tensor parallel: the row split of every tensor (checked against safetensors' own loading), the
ring-slot views of a shard, and world 2 / 3 ranks as real processes (gloo) against transformers."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import GROUP_KINDS, load_layout
from ringllm.checkpoint.sharding import ShardPlan, shard_layout, split_sizes
from tests.conftest import hf_greedy_cached, make_hf_checkpoint

CPU = torch.device("cpu")
# 3 kv heads (2 q heads each): world 2 splits them 2 + 1, world 3 one each; every other
# intermediate 112 and vocab 128 split unevenly over 3 ranks (hidden 96 evenly)
TP_CONFIG = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16, num_hidden_layers=2)
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def tensor_rows(path: str, name: str) -> torch.Tensor:
    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def file_bytes(path: str, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def row_range(full, part) -> tuple[int, int]:
    """The rows of `full` (a TensorExtent) that the sub-extent `part` covers."""
    row_bytes = full.nbytes // full.shape[0]
    assert (part.offset - full.offset) % row_bytes == 0 and part.nbytes % row_bytes == 0, part
    first = (part.offset - full.offset) // row_bytes
    return first, first + part.nbytes // row_bytes


def check_split(full, parts: list, split: bool) -> list[tuple[int, int]]:
    """The ranks' extents of one tensor: whole on every rank, or rows that tile it in rank order;
    each rank's bytes (plain file reads) equal safetensors' rows of the tensor."""
    if not split:
        assert all(p == full for p in parts), full.name
        return [(0, full.shape[0] if full.shape else 1)] * len(parts)
    ranges = [row_range(full, p) for p in parts]
    assert ranges[0][0] == 0 and ranges[-1][1] == full.shape[0], (full.name, ranges)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:] + [(full.shape[0],)])), \
        (full.name, ranges)
    whole = tensor_rows(full.path, full.name)
    for p, (r0, r1) in zip(parts, ranges):
        assert p.shape == (r1 - r0,) + tuple(full.shape[1:]) and p.path == full.path and p.dtype == full.dtype
        want = whole[r0:r1].contiguous().view(torch.uint8).numpy().tobytes()
        assert file_bytes(p.path, p.offset, p.nbytes) == want, (full.name, r0, r1)
    return ranges


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny TP checkpoints: sharded files (layers straddle them), tied, FP8 per channel (with an
    FP8 lm_head) and FP8 per tensor."""
    from ringllm.convert import convert_to_fp8
    from tests.fp8_reference import write_fp8_checkpoint

    root = tmp_path_factory.mktemp("tp")
    make_hf_checkpoint(root / "sharded", max_shard_size="40KB", **TP_CONFIG)
    make_hf_checkpoint(root / "tied", tie_word_embeddings=True, **TP_CONFIG)
    make_hf_checkpoint(root / "bf16", dtype=torch.bfloat16, **TP_CONFIG)
    convert_to_fp8(root / "bf16", root / "fp8_channel", quantize_lm_head=True, progress=False)
    write_fp8_checkpoint(root / "bf16", root / "fp8_tensor", per_tensor=True)
    return root


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["sharded", "tied", "fp8_channel", "fp8_tensor"])
def test_ranks_rows_tile_every_tensor(checkpoints, name, world):
    full = load_layout(checkpoints / name)
    if name == "sharded":     # some layer straddles two files
        assert any(len({e.extent.path for kind in GROUP_KINDS for e in full.group(layer, kind).entries}) > 1
                   for layer in range(full.config.num_layers))
    shards = [shard_layout(full, r, world) for r in range(world)]
    cfg, rep = full.config, full.config.num_heads // full.config.num_kv_heads
    for layer in range(cfg.num_layers):
        ranges = {}
        for kind in GROUP_KINDS:
            for i, entry in enumerate(full.group(layer, kind).entries):
                parts = [s.group(layer, kind).entries[i] for s in shards]
                assert all((p.role, p.part) == (entry.role, entry.part) for p in parts)
                per_channel = entry.part == "weight_scale" and entry.extent.shape[:1] not in ((), (1,))
                split = entry.role in LINEAR_ROLES and (entry.part == "weight" or per_channel)
                ranges[entry.role, entry.part] = check_split(entry.extent, [p.extent for p in parts], split)
        # a rank's q heads are the ones of its kv heads; o/down share hidden rows, gate/up intermediate
        assert ranges["q", "weight"] == [(a * rep, b * rep) for a, b in ranges["k", "weight"]]
        assert ranges["k", "weight"] == ranges["v", "weight"]
        assert ranges["o", "weight"] == ranges["down", "weight"]
        assert ranges["gate", "weight"] == ranges["up", "weight"]
        for s, (k0, k1), (i0, i1) in zip(shards, ranges["k", "weight"], ranges["gate", "weight"]):
            assert (s.config.kv_size, s.config.q_size, s.config.intermediate_size) == (k1 - k0, (k1 - k0) * rep, i1 - i0)
            assert (s.config.head_dim, s.config.hidden_size) == (cfg.head_dim, cfg.hidden_size)
    head = full.lm_head or full.embed
    vocab = check_split(head, [s.lm_head for s in shards], split=True)
    if full.lm_head_scale is not None:
        assert check_split(full.lm_head_scale, [s.lm_head_scale for s in shards], split=True) == vocab
    assert all(s.embed == full.embed and s.final_norm == full.final_norm for s in shards)


def test_split_sizes_are_even_larger_first():
    assert split_sizes(7, 3) == [3, 2, 2] and split_sizes(6, 3) == [2, 2, 2] and split_sizes(3, 2) == [2, 1]


def test_a_rank_without_its_rendezvous_fails_in_one_line():
    from ringllm.workers.tensor_parallel import init_distributed

    port = free_port()          # nobody serves it
    with pytest.raises(RingllmError) as err:
        init_distributed(1, 2, "127.0.0.1", port, "gloo", timeout_s=1)
    assert str(err.value).startswith(f"tensor parallel rank 1 of 2: no rendezvous at 127.0.0.1:{port} within 1 s (")
    assert "\n" not in str(err.value)


def test_more_ranks_than_kv_heads_is_refused_in_one_line(checkpoints):
    layout = load_layout(checkpoints / "tied")
    with pytest.raises(RingllmError) as err:
        shard_layout(layout, 0, 4)
    assert str(err.value) == "--tensor-parallel 4: the model has 3 key/value heads, so at most 3 ranks"
    assert shard_layout(layout, 0, 1) is layout


@pytest.mark.parametrize("world", [2, 3])
def test_shard_group_views_come_from_the_whole_layers_slot(checkpoints, world):
    """The loaders read whole layers into the ring; a rank's group views (GroupViews of its shard
    over the whole layer's LayerPlan) must hold that rank's rows."""
    from ringllm.shm.slot_plan import GroupViews, plan_layer
    from ringllm.workers.weights import typed_view

    full = load_layout(checkpoints / "sharded")
    for layer in range(full.config.num_layers):
        plan = plan_layer(full, layer)
        slot = bytearray(plan.nbytes)
        for read in plan.reads:               # what a loader puts in the slot
            data = file_bytes(read.path, read.file_offset, read.length)
            slot[read.slot_offset:read.slot_offset + len(data)] = data
        slot = torch.frombuffer(slot, dtype=torch.uint8)
        for rank in range(world):
            shard = shard_layout(full, rank, world)
            for kind in GROUP_KINDS:
                group = shard.group(layer, kind)
                views = GroupViews.plan(group, plan)
                buf = torch.zeros(views.nbytes, dtype=torch.uint8)
                for src, dst, n in views.runs:  # what the GPU process copies out of the slot
                    buf[dst:dst + n] = slot[src:src + n]
                for entry, whole, at in zip(group.entries, full.group(layer, kind).entries, views.offsets):
                    r0, r1 = row_range(whole.extent, entry.extent) if entry.extent != whole.extent else (0, None)
                    want = tensor_rows(whole.extent.path, whole.extent.name)[r0:r1]
                    assert torch.equal(typed_view(buf, at, entry.extent), want), (layer, kind, entry.role, rank)


# --- world 2 and 3 as processes ------------------------------------------------------------

PROMPT = [1, 17, 99, 4, 60, 23, 8, 111, 42]
STEPS = 8


def _rank_main(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    """One rank: its shard's weights (the resident loaders), Llama.forward on PROMPT (all logits),
    greedy decode, and the same greedy decode as the engine runs it: two rows, one prefilled whole
    and one in chunks in the same pass, then decoded together (the batched attention)."""
    from ringllm.workers.model import ALL, NO_LOGITS, KVCache, Llama, Segment
    from ringllm.workers.resident import ResidentSource, load_resident_weights
    from ringllm.workers.tensor_parallel import TensorParallel, close_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, "gloo", timeout_s=60)
    try:
        full = load_layout(model_dir)
        layout = shard_layout(full, rank, world)
        f32, cfg = torch.float32, layout.config
        tp = TensorParallel(rank, world, ShardPlan.of(full.config, world))
        model = Llama(cfg, load_resident_weights(layout, f32, CPU), ResidentSource(layout, f32, CPU), f32, CPU, tp=tp)
        model.warm_up_kernels(1, 4, model.weights.attn(0), model.weights.ffn(0))

        T = len(PROMPT)
        cache = KVCache(cfg, 1, T + STEPS, f32, CPU)
        logits = model.forward(cache, [Segment(0, PROMPT, 0, logits=ALL)])[None]     # [1, T, V]
        tokens = [int(logits[0, -1].argmax())]
        for pos in range(T, T + STEPS - 1):
            step = model.forward(cache, [Segment(0, [tokens[-1]], pos)])
            tokens.append(int(step[0].argmax()))

        cache = KVCache(cfg, 2, T + STEPS, f32, CPU)
        first = model.forward(cache, [Segment(0, PROMPT, 0), Segment(1, PROMPT[:4], 0, logits=NO_LOGITS)])
        rows = [[int(first[0].argmax())], [int(model.forward(cache, [Segment(1, PROMPT[4:], 4)])[0].argmax())]]
        for pos in range(T, T + STEPS - 1):
            step = model.forward(cache, [Segment(r, [rows[r][-1]], pos) for r in (0, 1)])
            for r in (0, 1):
                rows[r].append(int(step[r].argmax()))
        assert rows[0] == rows[1], "the two rows of one prompt decoded apart"
        seg_tokens = rows[1]
        torch.save({"logits": logits, "tokens": tokens, "segment_tokens": seg_tokens}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        close_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, model_dir: Path, out_dir: Path, timeout_s: float = 120) -> list[dict]:
    """Start `world` rank processes (plain subprocesses: multiprocessing's spawn would leave its
    resource tracker behind) and return what each saved."""
    port, root = free_port(), Path(__file__).resolve().parents[1]
    ranks = [subprocess.Popen([sys.executable, "-c", "import sys; from tests.test_tensor_parallel import _rank_main; "
                               "_rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])",
                               str(r), str(world), str(port), str(model_dir), str(out_dir)],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline, failures = time.monotonic() + timeout_s, []
    try:
        for r, proc in enumerate(ranks):
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode:
                failures.append(f"rank {r} exited {proc.returncode}:\n{out[-3000:]}")
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert not failures, "\n".join(failures)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world,name", [(2, "sharded"), (3, "tied"), (2, "fp8_channel")])
def test_ranks_match_transformers(tmp_path, world, name):
    hf = make_hf_checkpoint(tmp_path / name, seed=world, max_shard_size="40KB" if name == "sharded" else None,
                            tie_word_embeddings=name == "tied", **TP_CONFIG)
    if name == "fp8_channel":    # per-channel scales split with their rows, an FP8 lm_head too
        from ringllm.convert import convert_to_fp8
        from tests.test_fp8_engine import transformers_fp8

        convert_to_fp8(tmp_path / name, tmp_path / "fp8", quantize_lm_head=True, progress=False)
        name, hf = "fp8", transformers_fp8(tmp_path / "fp8")
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits
    ref_tokens = hf_greedy_cached(hf, PROMPT, STEPS)
    for rank, got in enumerate(run_ranks(world, tmp_path / name, tmp_path)):
        err = ((got["logits"] - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"rank {rank} of {world}: logits differ from transformers' by {err:.3g}"
        assert got["tokens"] == ref_tokens, f"rank {rank} of {world}: forward's greedy tokens"
        assert got["segment_tokens"] == ref_tokens, f"rank {rank} of {world}: the engine-shaped passes' greedy tokens"
