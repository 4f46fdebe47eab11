"""How a run ends: Ctrl-C, SIGTERM, a dead child. Exit codes, messages, and nothing left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import posix_ipc
import psutil
import pytest

from ringllm.config import EngineConfig
from tests.conftest import make_model_dir

STOP_BASE_S, REAP_AFTER_KILL_S = EngineConfig.stop_base_s, EngineConfig.reap_after_kill_s


@pytest.fixture
def long_run_model(tmp_path):
    """A model whose runs take seconds: 8 layers through a 2-slot ring, no EOS token at all."""
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=8, hidden_size=128, intermediate_size=256, max_position_embeddings=1024)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return d


def start(model_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "ringllm", "generate", "--model", str(model_dir), "--device", "cpu",
         "--no-chat", "--prompt", "w5 w6", "--max-new-tokens", "400", "--loaders", "2",
         "--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_children(proc, names, timeout=60):
    """Wait until the run's processes exist; return {name: psutil.Process} and the run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = {p.name(): p for p in psutil.Process(proc.pid).children() if p.is_running()}
        rings = [p.name for p in Path("/dev/shm").glob(f"ringllm-{proc.pid}-*-ring")]
        if set(names) <= set(kids) and rings:
            return kids, rings[0][len("ringllm-"):-len("-ring")]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"processes {names} did not appear")


def wait_for_tokens(proc):
    """Block until the first token byte arrives on stdout (read unbuffered: communicate() reads
    the same file descriptor afterwards, so nothing may sit in a Python-side buffer)."""
    assert os.read(proc.stdout.fileno(), 1) != b""


def assert_nothing_left(run_id, kids):
    base = f"/ringllm-{run_id}"
    for suffix in ("-sup", "-coord", "-gpu", "-load0", "-load1"):
        with pytest.raises(posix_ipc.ExistentialError):
            posix_ipc.MessageQueue(base + suffix)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(base + "-ring")
    assert not list(Path("/dev/shm").glob(f"ringllm-{run_id}*"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE
                                              for k in kids.values()):
        time.sleep(0.05)
    assert not [k for k in kids.values() if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


ALL = ("ringllm-coord", "ringllm-gpu", "ringllm-load0", "ringllm-load1")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_decode(long_run_model, sig, code):
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    wait_for_tokens(proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - t0 < 10
    assert_nothing_left(run_id, kids)


@pytest.mark.parametrize("victim", ["ringllm-gpu", "ringllm-coord"])
def test_dead_gpu_or_coordinator_ends_the_run(long_run_model, victim):
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    wait_for_tokens(proc)
    t0 = time.monotonic()
    kids[victim].kill()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 5
    role = {"ringllm-gpu": "gpu", "ringllm-coord": "coordinator"}[victim]
    assert f"ringllm: error: the {role} process exited unexpectedly" in err.strip().splitlines()[-1]
    assert_nothing_left(run_id, kids)


def test_killed_loader_is_restarted_and_tokens_are_unchanged(long_run_model):
    args = ("--max-new-tokens", "60")
    reference = subprocess.run(
        [sys.executable, "-m", "ringllm", "generate", "--model", str(long_run_model), "--device", "cpu",
         "--no-chat", "--prompt", "w5 w6", "--resident", *args], capture_output=True, text=True, timeout=120)
    proc = start(long_run_model, *args)
    kids, run_id = wait_for_children(proc, ALL)
    wait_for_tokens(proc)
    kids["ringllm-load1"].kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == reference.stdout[1:]            # the first byte was read by wait_for_tokens
    assert sum("ringllm-load1 died" in line or "loader1 died" in line for line in err.splitlines()) == 1
    assert_nothing_left(run_id, kids)


@pytest.mark.parametrize("first,second,code", [(signal.SIGINT, signal.SIGINT, 130),
                                               (signal.SIGINT, signal.SIGTERM, 130),
                                               (signal.SIGTERM, signal.SIGINT, 143)])
def test_more_signals_during_shutdown_do_not_stop_the_cleanup(long_run_model, first, second, code):
    """Ctrl-C pressed again (or a SIGTERM) while the supervisor is stopping its children: the
    first signal decides the exit code, and the cleanup still removes everything."""
    proc = start(long_run_model)
    kids, run_id = wait_for_children(proc, ALL)
    wait_for_tokens(proc)
    # A GPU process that does not respond: stopped, it reads no Shutdown and acts on no SIGTERM,
    # so the supervisor's shutdown lasts until it sends SIGKILL at the end of its deadline.
    kids["ringllm-gpu"].suspend()
    try:
        proc.send_signal(first)
        t0 = time.monotonic()
        for pause in (0.5, 2.0):          # while Shutdown is pending, then after SIGTERM went out
            time.sleep(pause)
            assert proc.poll() is None, "the supervisor exited while its GPU process was still alive"
            proc.send_signal(second)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for k in kids.values():           # without the fix the stopped process stays behind
            if k.is_running():
                k.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert_nothing_left(run_id, kids)
    # SIGKILL only at the end of the budget (no memory registered on the CPU), not before
    assert STOP_BASE_S <= elapsed < STOP_BASE_S + REAP_AFTER_KILL_S + 3, err


def start_in_own_group(model_dir):
    """`start`, in a process group of its own: killpg then reaches the supervisor and its
    children at once, as a terminal's Ctrl-C reaches the foreground process group. SIGINT at
    its default, as in a terminal (a shell's background job would inherit it ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ringllm", "generate", "--model", str(model_dir), "--device", "cpu",
         "--no-chat", "--prompt", "w5 w6", "--max-new-tokens", "400", "--loaders", "2",
         "--set", "CPU_CAP_VALUE=2", "--set", "GPU_AHEAD_LAYERS=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


EARLY = [("supervisor start", 0.5), ("supervisor start", 1.0), ("children spawned", 0.0),
         ("children spawned", 0.2), ("children spawned", 0.5), ("children spawned", 1.0)]


@pytest.mark.parametrize("sig,after,delay", [(signal.SIGINT, *moment) for moment in EARLY] +
                         [(signal.SIGTERM, *moment) for moment in EARLY if moment[0] == "children spawned"])
def test_early_signal_is_quiet(long_run_model, sig, after, delay):
    """Ctrl-C (or a SIGTERM to the process group, as a service manager sends) while the supervisor
    imports torch, or while the children are still starting (importing, attaching): one
    `ringllm: interrupted` / `terminated` line, no traceback from any process. (Before the
    supervisor has its handlers, SIGTERM simply ends it: exit status 143 to the shell.)"""
    proc = start_in_own_group(long_run_model)
    if after == "children spawned":
        deadline = time.monotonic() + 60
        while len(psutil.Process(proc.pid).children()) < len(ALL):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
    time.sleep(delay)
    kids = {p.pid: p for p in psutil.Process(proc.pid).children()}
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
    for needle in ("Traceback", "KeyboardInterrupt", "FakeTensor", "Exception ignored"):
        assert needle not in err, err
    lines = err.splitlines()
    assert lines[-1] == {signal.SIGINT: "ringllm: interrupted", signal.SIGTERM: "ringllm: terminated"}[sig], err
    assert all(line.startswith("[ringllm") for line in lines[:-1]), err
    # the run id starts with the supervisor's pid: no segment, stats page or manifest of it
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"ringllm-{proc.pid}-")]
    psutil.wait_procs(list(kids.values()), timeout=10)
    assert not [k for k in kids.values() if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


def test_tests_judge_only_their_own_runs():
    """The leftover check after every test (conftest.own_leftovers) blames a test for the runs it
    started (in-process, or a child command: its manifest names us as the parent), never for
    another ringllm run alive on the machine. Before, it blamed every new name in /dev/shm."""
    from tests.conftest import own_leftovers

    me = os.getpid()
    before = {p.name for p in Path("/dev/shm").glob("ringllm-*")}
    # pid 1 is alive and not ours: another user's run; a dead pid whose manifest names us: ours
    foreign = Path("/dev/shm/ringllm-1-0badc0de.manifest")
    ours = Path(f"/dev/shm/ringllm-{4_000_000 + me % 100_000}-0c0ffee0.manifest")
    foreign.write_text(json.dumps({"pid": 1, "parent": 0, "segments": [], "queues": []}))
    ours.write_text(json.dumps({"pid": 4_000_000 + me % 100_000, "parent": me, "segments": [], "queues": []}))
    try:
        left = own_leftovers(before)
        assert ours.name in left and foreign.name not in left, left
    finally:
        foreign.unlink(missing_ok=True)
        ours.unlink(missing_ok=True)


def test_a_child_that_dies_before_reading_its_arguments_is_no_closed_stdout(monkeypatch):
    """SIGTERM to the process group can kill a child between its start and the write of its
    arguments; that write then fails with EPIPE, which must not pass for a closed stdout (exit
    141): spawn returns the dead child and the caller notices it (CI saw 141 instead of 143)."""
    import subprocess as sp

    from ringllm.workers import child

    real_popen = sp.Popen

    def dying_popen(cmd, **kwargs):
        proc = real_popen([sys.executable, "-c", "import os; os.close(0)"], **kwargs)   # never reads stdin
        proc.wait(timeout=30)
        return proc

    monkeypatch.setattr(child.subprocess, "Popen", dying_popen)
    tracked = []
    big = b"x" * (1 << 20)           # more than a pipe holds: the write must hit the closed end
    proc = child.spawn(print, big, tracked.append)
    assert tracked == [proc] and proc.poll() is not None


def test_sigterm_during_torchs_import_waits_for_its_end():
    """The GPU process imports torch under sigterm_deferred: a SIGTERM meanwhile is raised as
    SystemExit(143) only when the block ends (raised inside C++-called Python code, it aborted the
    process with "terminate called after throwing ... SystemExit": CI saw it)."""
    from ringllm.workers import process_setup
    from ringllm.workers.process_setup import sigterm_deferred, stop_requested

    reached = False
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            with sigterm_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
                reached = True
        assert reached and exit_.value.code == 143 and stop_requested()
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        process_setup._stop_requested = False     # this test process goes on
