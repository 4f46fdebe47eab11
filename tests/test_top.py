"""`ringllm top` in a pseudo-terminal, against a live run: the window moves, and top exits when
the run ends."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from tests.test_lifecycle import ALL, long_run_model, start, wait_for_children, wait_for_tokens  # noqa: F401

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def read_pty(fd, seconds):
    out, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return ANSI.sub("", out.decode(errors="replace"))


def test_top_follows_a_live_run_and_exits_when_it_ends(long_run_model):
    run = start(long_run_model)
    top = None
    try:
        _, run_id = wait_for_children(run, ALL)
        wait_for_tokens(run)
        master, slave = pty.openpty()
        # --run: the newest live run on a shared machine may be another test's
        top = subprocess.Popen([sys.executable, "-m", "ringllm", "top", "--run", run_id, "--interval", "0.2"],
                               stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        screen = read_pty(master, 3.0)
        windows = set(re.findall(r"CPU ring window (\d+)\.\.(\d+)", screen))
        layers = set(re.findall(r"compute at layer (\d+) \(pass (\d+)\)", screen))
        assert f"supervisor pid {run.pid}" in screen, screen[-2000:]
        assert len(windows) >= 2, screen[-2000:]          # the window position changes while we watch
        assert len(layers) >= 2
        assert "ring slots:" in screen and "loaders GB/s: load0" in screen and "tokens/s" in screen
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=30)
        tail = read_pty(master, 5.0)
        assert top.wait(timeout=10) == 0, tail
        os.close(master)
    finally:   # a failed assertion must not leave the run (and top) going
        for proc in (run, top):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.communicate(timeout=30)


def test_top_without_a_run_says_so():
    r = subprocess.run([sys.executable, "-m", "ringllm", "top", "--run", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "no running ringllm run nope found" in r.stderr
