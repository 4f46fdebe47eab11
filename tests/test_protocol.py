"""Protocol hardening (issue #10): records in shared memory are never read torn, loaders that
write late into a reassigned slot stop the run, messages fit the queue cap for any batch and
any text, and O_DIRECT reads are planned aligned and never fall back on a file system that
takes them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import posix_ipc
import pytest

# --- item 4: seqlocked records --------------------------------------------------------------

# The writer rewrites records in a tight loop with values whose fields must agree: every field
# of write k holds k (k >= 1), so a torn read shows as fields that differ, or as a zero.
RING_WRITER = """
import sys, time
from ringllm.shm.ring import Ring
ring = Ring.attach(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
k = 1
while time.monotonic() < end:
    for _ in range(1000):
        ring.write_slot(0, k & 0x7fffffff, k & 0x7fffffff, k)
        k += 1
ring.close()
"""

STATS_WRITER = """
import sys, time
from ringllm.shm.stats import StatsPage
page = StatsPage(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
k = 1
while time.monotonic() < end:
    for _ in range(1000):
        page.coordinator(k, k, k, k, k, k, k, k)
        page.gpu(k, k, k, k, k, k, float(k), k)
        page.loader(0, k, float(k), k)
        k += 1
page.close()
"""

WRITE_SECONDS = 2.0


def start_writer(code: str, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, name, str(WRITE_SECONDS)])


def read_while_writing(writer: subprocess.Popen, read) -> tuple[int, list]:
    """Call read() until the writer exits; return (reads, the torn ones: tuples whose fields
    disagree or go back in time). read() returns one tuple per record; records start all zero."""
    reads, torn, last = 0, [], {}
    deadline = time.monotonic() + WRITE_SECONDS + 30
    while writer.poll() is None and time.monotonic() < deadline:
        for record, values in enumerate(read()):
            reads += 1
            k = values[0]
            if any(v != k for v in values) or k < last.get(record, 0):
                torn.append(values)
            last[record] = max(last.get(record, 0), k)
    writer.wait(timeout=30)
    return reads, torn


def assert_never_torn(writer_code: str, name: str, read) -> None:
    """Rewrite the records of shared memory `name` in another process while reading them here:
    enough reads, and none torn."""
    writer = start_writer(writer_code, name)
    reads, torn = read_while_writing(writer, read)
    assert writer.returncode == 0
    assert reads > 1000
    assert not torn, f"{len(torn)} of {reads} reads torn, e.g. {torn[:5]}"


def test_ring_slot_records_are_never_read_torn():
    from ringllm.shm.ring import Ring

    name = f"/rltest-{os.getpid()}-ring"
    ring = Ring.create(name, slot_count=2, slot_size=4096, loaders=1)
    ring.write_slot(0, 0, 0, 0)
    try:
        assert_never_torn(RING_WRITER, name, lambda: [ring.read_slot(0)])
    finally:
        ring.close()
        posix_ipc.unlink_shared_memory(name)


def test_stats_records_are_never_read_torn():
    from ringllm.shm.stats import StatsPage

    name = f"/rltest-{os.getpid()}-stats"
    page = StatsPage(name, create=True, layers=4, loaders=1, slots=2)

    def read():
        s = page.read()
        loader = s["loader"][0]
        return [tuple(s["coord"].values()), tuple(s["gpu"].values()),
                (loader["bytes"], loader["busy_s"], loader["chunks"])]

    try:
        assert_never_torn(STATS_WRITER, name, read)
    finally:
        page.close()
        posix_ipc.unlink_shared_memory(name)


# --- item 3: late loader writes -------------------------------------------------------------

PROMPT = [4, 5, 6]


@pytest.fixture
def four_layers(tmp_path):
    from tests.conftest import make_model_dir

    return make_model_dir(tmp_path / "m", num_hidden_layers=4)


def streaming_run(model_dir, faults, max_new: int, steps: list, **engine):
    """A streamed run on cpu with fault hooks; each token is appended to `steps` (as a one-token step)."""
    from ringllm.checkpoint.layout import load_layout
    from ringllm.config import build_config
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.generation import SamplingParams

    sup = Supervisor(load_layout(model_dir), build_config(**engine), "cpu", "float32", faults=faults)
    return sup.run([PROMPT], max_new, SamplingParams(), (), lambda i, t: steps.append([t]))


def test_late_write_into_a_reassigned_slot_stops_the_run(four_layers):
    """Loader 1 passes its before-check for its first chunk (a whole layer: 16 MiB chunks),
    reports the chunk, and writes it again 1 s later. Meanwhile that slot completes, is evicted
    and is given to another layer (2 slots for 4 layers). The late write must end the run, and
    no token computed from it may come out."""
    from ringllm.checkpoint.errors import RingllmError
    from ringllm.faults import FaultPlan
    from tests.test_streaming import resident_tokens

    steps = []
    with pytest.raises(RingllmError) as err:
        streaming_run(four_layers, FaultPlan(late_write=(1, 0, 1.0)), 200, steps, loaders=2, cpu_cap=2,
                      gpu_ahead_layers=1)
    # Either side may see it first: the loader's after-check, or the GPU process's check of a
    # copy out of the reassigned slot while the late write's record is still up.
    text = str(err.value)
    by_loader = re.search(r"^loader1: late write into ring slot \d: loader1 read layer \d \(generation (\d+), "
                          r".*\) after the slot had moved on to layer \d, generation (\d+)", text)
    by_gpu = re.search(r"^gpu: TornCopy: ring slot \d \(layer \d, generation (\d+)\) under a copy of layer \d \w+: "
                       r"loader1 (?:is writing into it|wrote into it late),? for generation (\d+)", text)
    assert by_loader or by_gpu, text
    late, current = map(int, by_loader.groups() if by_loader else reversed(by_gpu.groups()))
    assert current > late, text           # the slot had been given to another layer
    if steps:   # greedy: the reference's first tokens are those of a shorter run
        assert [step[0] for step in steps] == resident_tokens(four_layers, [PROMPT], len(steps))[0]


def test_late_duplicate_job_is_skipped_and_counted(four_layers):
    """Loader 1 serves its first job a second time, once the slot has moved on after its report
    (at least 0.05 s later): the before-check skips it; the run gives the reference tokens and
    the coordinator counts the skip (the run is long enough for the report to arrive)."""
    from ringllm.faults import FaultPlan
    from tests.test_streaming import resident_tokens

    steps = []
    result = streaming_run(four_layers, FaultPlan(late_duplicate=(1, 0, 0.05)), 200, steps, loaders=2, cpu_cap=2,
                           gpu_ahead_layers=1)
    assert result.outputs == resident_tokens(four_layers, [PROMPT], 200)
    assert result.coordinator["skipped_chunks"] == 1
    assert result.coordinator["stale_chunk_reports"] == 0


@pytest.fixture
def ring():
    from ringllm.shm.ring import Ring

    name = f"/rltest-{os.getpid()}-ring"
    ring = Ring.create(name, slot_count=2, slot_size=2 * 4096, loaders=2)
    yield ring
    ring.close()
    posix_ipc.unlink_shared_memory(name)


def test_gpu_check_sees_a_late_write_in_progress_or_finished(ring):
    """StreamingSource._verify against the ring's records: slot 1 holds layer 3, generation 5."""
    from types import SimpleNamespace

    from ringllm.shm.ring import READY
    from ringllm.workers.scheduler import GroupCopy, SlotOffer
    from ringllm.workers.streaming import StreamingSource, TornCopy

    ring.write_slot(1, READY, 3, 5)
    verified = []
    source = SimpleNamespace(ring=ring, sched=SimpleNamespace(verified=verified.append))

    def verify():     # the ffn group of step 7 (layer 3 of 4), told to be in slot 1, generation 5
        StreamingSource._verify(source, GroupCopy(2 * 7 + 1, SlotOffer(7, 3, 1, 5), buffer=0))
        assert verified.pop() == 2 * 7 + 1

    verify()
    ring.begin_write(0, 0, 4)          # another slot: none of this copy's business
    ring.begin_write(1, 1, 5)          # this generation: a duplicate of the same bytes
    verify()
    ring.begin_write(1, 1, 4)          # in progress, for the slot's previous generation
    with pytest.raises(TornCopy, match=r"ring slot 1 \(layer 3, generation 5\) under a copy of layer 3 ffn: "
                                       r"loader1 is writing into it for generation 4"):
        verify()
    ring.taint(1, 1, 4)                # ... finished: taint first, then the record cleared
    ring.end_write(1)
    with pytest.raises(TornCopy, match=r"loader1 wrote into it late, for generation 4"):
        verify()


def test_loader_checks_the_slot_before_and_after_each_read(ring, tmp_path):
    from ringllm.shm.channel import ReadJob
    from ringllm.shm.ring import LOADING, READY
    from ringllm.workers.loader import LateWrite, SlotWriter

    data = os.urandom(8192)
    (tmp_path / "shard").write_bytes(data)
    writer = SlotWriter(1, ring, (str(tmp_path / "shard"),))
    job = ReadJob(job=0, slot=1, generation=2, layer=6, file=0, file_offset=4096, length=4096, slot_offset=4096,
                  needed=4096)
    base = ring.slot_base(1)
    try:
        ring.write_slot(1, LOADING, 6, 2)
        done = writer.serve(job)
        assert (done.nbytes, done.skipped) == (4096, False)
        assert ring.map[base + 4096:base + 8192] == data[4096:]
        assert ring.writing(1) is None and ring.tainted(1) is None

        ring.map[base:base + 2 * 4096] = bytes(2 * 4096)
        ring.write_slot(1, READY, 6, 2)            # the slot moved on: skip, write nothing
        done = writer.serve(job)
        assert done.skipped and done.nbytes == 0
        assert ring.map[base:base + 2 * 4096] == bytes(2 * 4096)
        assert ring.writing(1) is None and ring.tainted(1) is None

        ring.write_slot(1, LOADING, 6, 2)          # it moves on between the before-check and the write
        seen = []

        def reassign():
            seen.append(ring.writing(1))
            ring.write_slot(1, LOADING, 0, 3)
        with pytest.raises(LateWrite, match=r"late write into ring slot 1: loader1 read layer 6 \(generation 2, "
                                            r".*shard at offset 4096\) after the slot had moved on to layer 0, "
                                            r"generation 3 \(loading\)"):
            writer.serve(job, before_write=reassign)
        assert seen == [(1, 2)]                    # the record was up before the write
        assert ring.tainted(1) == (1, 2) and ring.writing(1) is None
    finally:
        writer.close()


# --- item 5: messages within the queue's cap ------------------------------------------------

def test_300_rows_stream_like_the_resident_engine(tmp_path):
    """A Llama-3-sized vocabulary makes token ids take 3-5 bytes: one step of 300 rows no longer
    fits a 1 KiB message, so the tokens must travel in parts and be put together again."""
    import msgpack
    import torch

    from ringllm.shm.channel import MESSAGE_BYTES
    from tests.conftest import make_hf_checkpoint
    from tests.test_streaming import resident_tokens, stream_tokens

    d = tmp_path / "m"
    make_hf_checkpoint(d, vocab_size=128256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128256, (3,), generator=gen).tolist() for _ in range(300)]
    reference = resident_tokens(d, prompts, 3)
    steps = [[row[i] for row in reference] for i in range(3)]
    assert any(len(msgpack.packb(step)) > MESSAGE_BYTES for step in steps)   # one message could not carry it
    seen = [[] for _ in prompts]
    result = stream_tokens(d, prompts, 3, on_tokens=lambda i, t: seen[i].append(t), loaders=1, cpu_cap=2,
                           gpu_ahead_layers=1)
    assert result.outputs == reference
    assert seen == reference


def test_fatal_text_fits_the_cap_by_bytes():
    from ringllm.shm.channel import MESSAGE_BYTES, Fatal, decode, encode

    for text in ["模型" * 2000 + " the end", "x" * 5000, "\udcff" * 3000, "é" * 1021 + "z"]:
        msg = Fatal("loader", 3, text)
        assert len(encode(msg)) <= MESSAGE_BYTES
        back = decode(encode(msg))
        assert back.text[:2] == msg.text[:2] and back.text[-3:] == msg.text[-3:] and " ... " in back.text
    assert Fatal("gpu", 0, "short, ü").text == "short, ü"


def test_read_error_under_a_long_non_ascii_path_is_reported(tmp_path):
    """The loader's report of a read error names the file: with a model directory named in CJK
    characters the text is three times as many bytes as characters. The run must end with the
    loader's own error, not with the loader dying while it reports it ("died 4 times")."""
    from ringllm.checkpoint.errors import RingllmError
    from ringllm.faults import FaultPlan
    from tests.conftest import make_model_dir

    d = tmp_path
    for word in ("模型目录", "权重文件", "检查点", "数据集合", "实验记录"):
        d = d / (word * 20)                         # 240 bytes a name: under the 255-byte limit
    make_model_dir(d, num_hidden_layers=2)
    assert len(str(d).encode()) > 1024
    with pytest.raises(RingllmError) as err:
        streaming_run(d, FaultPlan(read_errors=((0, 0),)), 4, [], loaders=1, cpu_cap=2, gpu_ahead_layers=1)
    assert re.fullmatch(r"loader0: /.* \.\.\. .*实验记录/model\.safetensors: read error at offset \d+ "
                        r"\(injected read error\)", str(err.value)), str(err.value)


# --- item 21: O_DIRECT alignment ------------------------------------------------------------

def odd_sharded_checkpoint(path):
    """Tensors of odd byte sizes (bf16, 40 x 97 ...) over several shards: no tensor and no layer
    starts on a 4096 boundary by chance."""
    import torch

    from tests.conftest import make_model_dir

    return make_model_dir(path, hidden_size=40, intermediate_size=97, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=10, num_hidden_layers=5, dtype=torch.bfloat16, max_shard_size="30KB")


def safetensors_extents(model_dir) -> dict:
    """name -> (file, first byte, end), from the safetensors headers themselves."""
    import json
    import struct
    from pathlib import Path

    out = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        raw = shard.read_bytes()
        (n,) = struct.unpack_from("<Q", raw, 0)
        for name, info in json.loads(raw[8:8 + n]).items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                out[name] = (str(shard), 8 + n + begin, 8 + n + end)
    return out


def test_every_planned_read_is_4096_aligned(tmp_path):
    from ringllm.checkpoint.layout import load_layout
    from ringllm.shm.slot_plan import DEFAULT_CHUNK_BYTES, plan_model

    d = odd_sharded_checkpoint(tmp_path / "odd")
    extents = safetensors_extents(d)
    assert len({f for f, _, _ in extents.values()}) >= 3
    assert any(start % 4096 for _, start, _ in extents.values())     # the checkpoint itself is not aligned
    files = {f: open(f, "rb").read() for f, _, _ in extents.values()}
    for plan in plan_model(load_layout(d)):
        for chunk_bytes in (4096, 3 * 4096, DEFAULT_CHUNK_BYTES):
            for c in plan.chunks(chunk_bytes):
                assert (c.file_offset % 4096, c.slot_offset % 4096, c.length % 4096) == (0, 0, 0), \
                    f"layer {plan.layer} chunk {c}"
        # the reads put every tensor where the plan says (an aligned superset, read as planned)
        slot = bytearray(plan.nbytes)
        for r in plan.reads:
            data = files[r.path][r.file_offset:r.file_offset + r.length]
            slot[r.slot_offset:r.slot_offset + len(data)] = data
        for name, at in plan.tensor_slot_offset.items():
            f, begin, end = extents[name]
            assert slot[at:at + end - begin] == files[f][begin:end], name


def o_direct_works(directory) -> bool:
    import errno
    import mmap

    probe = directory / "o_direct_probe"
    probe.write_bytes(os.urandom(8192))
    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [buf], 4096) == 4096
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    finally:
        buf.close()
        probe.unlink()


def test_streaming_run_reads_everything_with_o_direct(tmp_path):
    import json

    if not o_direct_works(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    d = odd_sharded_checkpoint(tmp_path / "odd")
    metrics = tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, "-m", "ringllm", "generate", "--model", str(d), "--device", "cpu", "--no-chat",
                        "--prompt", "w5 w6 w7", "--max-new-tokens", "3", "--loaders", "2", "--set", "CPU_CAP_VALUE=2",
                        "--set", "GPU_AHEAD_LAYERS=1", "--metrics-json", str(metrics)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(metrics.read_text())
    assert m["ring_loads"] >= 5 and m["disk_bytes"] > 0
    assert (m["buffered_chunks"], m["direct_fallback_chunks"]) == (0, 0), r.stderr
    assert "buffered I/O" not in r.stderr


def test_fallback_warning_says_what_it_costs():
    from ringllm.supervisor.checks import fallback_warning

    assert fallback_warning({"buffered_chunks": 7, "direct_fallback_chunks": 0}) is None   # tmpfs: said at open
    text = fallback_warning({"buffered_chunks": 7, "direct_fallback_chunks": 3})
    assert text.startswith("3 chunk(s) were read with buffered I/O") and "page cache" in text
