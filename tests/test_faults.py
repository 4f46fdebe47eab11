"""Faults: loaders that keep dying, torn slot data, a killed supervisor, bad parameters and
limits, two runs at once. Every case: a clear message, the right exit, nothing left behind."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import posix_ipc
import psutil
import pytest

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.layout import load_layout
from ringllm.config import build_config
from ringllm.faults import FaultPlan
from ringllm.shm.channel import Fatal
from ringllm.supervisor.supervisor import Supervisor
from tests.conftest import make_model_dir
from tests.test_lifecycle import ALL, assert_nothing_left, long_run_model, start, wait_for_children  # noqa: F401
from tests.test_streaming import assert_run_cleaned, resident_tokens
from ringllm.workers.generation import SamplingParams


@pytest.fixture
def small(tmp_path):
    d = tmp_path / "small"
    make_model_dir(d, num_hidden_layers=4)
    return d


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_loader_that_keeps_dying_ends_the_run(small):
    sup = Supervisor(load_layout(small), build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1), "cpu", "float32",
                     faults=FaultPlan(crash_loaders_at_chunk=1))
    t0 = time.monotonic()
    with pytest.raises(RingllmError, match=r"loader\d died 4 times within a minute .*giving up"):
        sup.run([[4, 5, 6]], 8, SamplingParams(), (), lambda i, t: None)
    assert time.monotonic() - t0 < 60
    assert_run_cleaned(sup)


def test_torn_slot_stops_the_run_before_compute(small):
    sup = Supervisor(load_layout(small), build_config(loaders=1, cpu_cap=2, gpu_ahead_layers=1), "cpu", "float32",
                     faults=FaultPlan(tamper_at_offer=3))
    tokens = []
    with pytest.raises(RingllmError, match=r"gpu: TornCopy: ring slot \d changed under a copy of layer 3 \w+: "
                                           r"expected generation \d+, found \d+"):
        sup.run([[4, 5, 6]], 8, SamplingParams(), (), lambda i, t: tokens.append(t))
    assert tokens == []           # offer 3 is layer 3 of the prefill: no token was produced
    assert_run_cleaned(sup)


def test_killed_supervisor_children_exit_and_cleanup_sweeps(long_run_model):
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    proc.kill()                                  # SIGKILL: no finally, no cleanup
    proc.wait()
    gone, alive = psutil.wait_procs(list(kids.values()), timeout=10)
    assert not alive, f"children outlived the supervisor: {alive}"
    # Left behind, as expected, unless another ringllm command on this machine started meanwhile
    # and swept it first (any start sweeps the runs of dead supervisors).
    others_alive = other_ringllm_commands()
    left = Path(f"/dev/shm/ringllm-{run_id}.manifest").exists()
    if not others_alive and left:
        posix_ipc.MessageQueue(f"/ringllm-{run_id}-coord").close()          # still there
    elif not others_alive:
        # a ringllm command that started and ended meanwhile swept it (CI saw one): then all of it
        assert not list(Path("/dev/shm").glob(f"ringllm-{run_id}*")), "a half-swept run"
        with pytest.raises(posix_ipc.ExistentialError):
            posix_ipc.MessageQueue(f"/ringllm-{run_id}-coord")
    r = cli("cleanup")
    assert r.returncode == 0, r.stderr
    if left and not others_alive and not other_ringllm_commands():
        assert f"/ringllm-{run_id}-ring" in r.stdout
    assert_nothing_left(run_id, kids)


def test_next_start_sweeps_a_killed_run(long_run_model, small):
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    proc.kill()
    proc.wait()
    psutil.wait_procs(list(kids.values()), timeout=10)
    others_alive = other_ringllm_commands()
    r = cli("generate", "--model", str(small), "--device", "cpu", "--no-chat", "--prompt", "w5", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    if not others_alive:   # else another ringllm start on this machine may have swept it first
        assert "left by earlier run(s) that were killed" in r.stderr and run_id in r.stderr, r.stderr
    assert_nothing_left(run_id, kids)


def other_ringllm_commands() -> list:
    """ringllm supervisors on this machine that this test process did not start."""
    import os
    return [p for p in psutil.process_iter(["name", "ppid"])
            if p.info["name"] == "ringllm-sup" and p.info["ppid"] != os.getpid()]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_starting(long_run_model, sig, code):
    """Right after the processes exist: loaders and GPU process are still starting up."""
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert_nothing_left(run_id, kids)


def test_signal_during_prefill(tmp_path):
    """A long prompt through a slow pipeline; the signal lands before the first token."""
    d = tmp_path / "p"
    make_model_dir(d, num_hidden_layers=6, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)
    prompt = " ".join(f"w{3 + i % 100}" for i in range(3000))
    proc = subprocess.Popen([sys.executable, "-m", "ringllm", "generate", "--model", str(d), "--device", "cpu",
                             "--no-chat", "--prompt", prompt, "--max-new-tokens", "50", "--loaders", "1",
                             "--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids, run_id = wait_for_children(proc, ("ringllm-coord", "ringllm-gpu", "ringllm-load0"))
    # The GPU process reports ready (stats page: RUNNING) right before the 3000-token prefill,
    # which takes seconds here: signal then, with no token produced yet.
    from ringllm.shm.stats import RUNNING, StatsPage
    page = StatsPage(f"/ringllm-{run_id}-stats")
    deadline = time.monotonic() + 60
    while page.read()["status"] != RUNNING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert page.read()["tokens"] == 0
    page.close()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert out == ""         # no token yet: the signal landed before the prefill finished
    assert_nothing_left(run_id, kids)


def test_two_runs_at_once_do_not_interfere(small):
    args = ["generate", "--model", str(small), "--device", "cpu", "--no-chat", "--prompt", "w7 w8 w9",
            "--max-new-tokens", "20", "--loaders", "2", "--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=1"]
    procs = [subprocess.Popen([sys.executable, "-m", "ringllm", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    ref = cli("generate", "--model", str(small), "--device", "cpu", "--no-chat", "--prompt", "w7 w8 w9",
              "--max-new-tokens", "20", "--resident")
    assert outs[0][0] == outs[1][0] == ref.stdout


def error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.startswith("ringllm: error:")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("params,needle", [
    (["--set", "WSM_CPU_CACHE_LWM_LAYERS=9", "--set", "WSM_CPU_CACHE_HWM_LAYERS=5"],
     "WSM_CPU_CACHE_LWM_LAYERS=9 must be below WSM_CPU_CACHE_HWM_LAYERS=5"),
    (["--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=4"],
     "CPU_CAP_VALUE=2 is smaller than the GPU look-ahead of 4 layers"),
    (["--loaders", "0"], "--loaders 0: at least one loader is needed"),
    (["--set", "CPU_CAP_VALUE=many"], "CPU_CAP_VALUE='many' (--set): must be an integer"),
    (["--set", "NO_SUCH_KNOB=1"], "unknown parameter NO_SUCH_KNOB"),
    # a ring beyond DRAM: test_autotune.py::test_ring_larger_than_dram_is_refused (CPU_CAP_VALUE
    # is capped at the streamed layers, so this small model cannot ask for one)
])
def test_bad_parameters_and_limits(small, params, needle):
    r = cli("generate", "--model", str(small), "--device", "cpu", "--max-new-tokens", "2", *params)
    assert needle in error_line(r)   # (the autouse fixture checks that this run created nothing)


def test_unsupported_config(small):
    cfg = json.loads((small / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (small / "config.json").write_text(json.dumps(cfg))
    assert "rope scaling type 'yarn' is not supported" in error_line(
        cli("generate", "--model", str(small), "--device", "cpu"))


def test_missing_shard_named_in_index(tmp_path):
    d = tmp_path / "s"
    make_model_dir(d, max_shard_size="40KB", num_hidden_layers=2)
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    assert f"{victim}: shard named in model.safetensors.index.json is missing" in error_line(
        cli("generate", "--model", str(d), "--device", "cpu"))


def test_shard_that_is_a_directory_is_unreadable(tmp_path):
    d = tmp_path / "s"
    make_model_dir(d, num_hidden_layers=2)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    line = error_line(cli("generate", "--model", str(d), "--device", "cpu"))
    assert line.startswith(f"ringllm: error: {d / 'model.safetensors'}: cannot read ("), line


def test_work_sent_to_a_dead_loader_is_read_once(small):
    """The coordinator keeps sending a dead loader work until it hears of the restart; the new
    process must leave those jobs to the re-issue, or a chunk is read twice and the late copy can
    land in a slot that already holds another layer (wrong tokens, no error)."""
    layout = load_layout(small)
    engine = build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1, chunk_bytes=8192)
    sup = Supervisor(layout, engine, "cpu", "float32", faults=FaultPlan(
        chaos_seed=7, chaos_delay_s=0.005, kill_loader_when_ready=1, restart_notice_delay_s=1.5))
    result = sup.run([[4, 5, 6]], 12, SamplingParams(), (), lambda i, t: None)
    assert result.outputs == resident_tokens(small, [[4, 5, 6]], 12)
    assert result.loader_restarts == 1
    assert result.coordinator["stale_chunk_reports"] == 0
    assert_run_cleaned(sup)


def test_each_loader_has_its_own_restart_budget(small):
    """Two loaders that die twice each: four deaths within a minute, but no loader died more
    than 3 times, so the run goes on and its tokens are the resident engine's."""
    sup = Supervisor(load_layout(small), build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1), "cpu", "float32",
                     faults=FaultPlan(kill_loaders_when_ready=((0, 2), (1, 2))))
    result = sup.run([[4, 5, 6]], 8, SamplingParams(), (), lambda i, t: None)
    assert result.outputs == resident_tokens(small, [[4, 5, 6]], 8)
    assert result.loader_restarts == 4
    assert_run_cleaned(sup)


def test_the_loader_named_in_giving_up_is_the_one_that_died(small):
    sup = Supervisor(load_layout(small), build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1), "cpu", "float32",
                     faults=FaultPlan(kill_loaders_when_ready=((1, 9),)))
    with pytest.raises(RingllmError, match=r"^loader1 died 4 times within a minute .*giving up"):
        sup.run([[4, 5, 6]], 8, SamplingParams(), (), lambda i, t: None)
    assert sup.result.loader_restarts == 3
    assert_run_cleaned(sup)


class FatalAfterExit:
    """The supervisor's inbox as it is when a loader's exit is noticed before its Fatal is read
    (the Fatal waits behind other messages): a loader's Fatal comes out only after its process
    has exited, and one receive() later than it arrived."""

    def __init__(self, sup: Supervisor, inbox):
        self.sup, self.inbox, self.held = sup, inbox, None

    def receive(self, timeout):
        if self.held is not None:
            msg, self.held = self.held, None
            return msg
        msg = self.inbox.receive(timeout)
        if isinstance(msg, Fatal) and msg.role == "loader":
            self.sup.procs[f"loader{msg.index}"].wait(timeout=10)
            self.held = msg
            return None
        return msg

    def __getattr__(self, name):
        return getattr(self.inbox, name)


@pytest.mark.parametrize("order", ["as it comes", "exit seen first"])
def test_loader_that_reported_fatal_is_not_restarted(small, monkeypatch, order):
    """An injected EIO: the loader sends Fatal and exits. However the supervisor learns of it
    first, the run ends with the loader's own read error and no restart."""
    if order == "exit seen first":
        create = Supervisor._create

        def create_with_late_fatal(self):
            create(self)
            self.inbox = FatalAfterExit(self, self.inbox)
        monkeypatch.setattr(Supervisor, "_create", create_with_late_fatal)
    sup = Supervisor(load_layout(small), build_config(loaders=2, cpu_cap=2, gpu_ahead_layers=1), "cpu", "float32",
                     faults=FaultPlan(read_errors=((0, 0),)))
    with pytest.raises(RingllmError, match=r"^loader0: .*model\.safetensors: read error at offset \d+ "
                                           r"\(injected read error\)$"):
        sup.run([[4, 5, 6]], 8, SamplingParams(), (), lambda i, t: None)
    assert sup.result.loader_restarts == 0
    assert_run_cleaned(sup)
