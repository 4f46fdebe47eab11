"""Entry point of every child process (CHILD_START, which runs main() here), pickled (module,
function, args) on stdin. Plain subprocesses rather than multiprocessing: no helper processes, no
re-import of the caller's __main__, and the supervisor keeps full control of each child.
`spawn` is the parent's side (the supervisor's, and the disk probe's)."""
from __future__ import annotations

import importlib
import pickle
import signal
import subprocess
import sys
from typing import Callable

# `python -m ringllm.workers.child` would put the working directory first on the child's path, and a
# `ringllm/` folder there (a clone's root after a non-editable `pip install .`) would shadow the
# installed package. `-c` puts '' there instead, which is removed before anything of ours is
# imported (`-P` does this, from Python 3.11 only); with PYTHONSAFEPATH set there is no '' to remove.
CHILD_START = ("import sys\n"
               "if sys.path[:1] == ['']: del sys.path[0]\n"
               "from ringllm.workers.child import main\n"
               "main()\n")


def spawn(target: Callable, args, track: Callable[[subprocess.Popen], None]) -> subprocess.Popen:
    """Run `target(args)` in a new child process. `track(proc)` runs before the arguments are
    sent, so the caller owns the process even if sending fails.

    The child starts with SIGINT blocked: Ctrl-C reaches the whole foreground process group, and
    one landing while the child's interpreter still imports would print a KeyboardInterrupt
    traceback. The mask survives fork and exec; child_start ignores SIGINT, then unblocks it (the
    one pending is discarded). Here a SIGINT only waits for the unblock. (PR_SET_PDEATHSIG needs
    code in the child: child_start arms it and then checks that its parent is still there.)"""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc = subprocess.Popen([sys.executable, "-c", CHILD_START], stdin=subprocess.PIPE)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    track(proc)
    try:
        proc.stdin.write(pickle.dumps((target.__module__, target.__name__, args)))
        proc.stdin.close()
    except BrokenPipeError:
        # The child died before it read its arguments (a signal to the whole process group, as
        # Ctrl-C or a service manager sends): not our stdout closing. Its exit is noticed where
        # the children are watched, and the signal where the caller checks for one.
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
    return proc


def main() -> None:
    module, function, args = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    try:
        getattr(importlib.import_module(module), function)(args)
    finally:
        # On the way out: a SIGTERM now (the supervisor stopping every child at the end of a run)
        # would raise SystemExit inside an atexit callback and print its traceback; the process
        # is ending anyway (and is killed at the stop deadline should its exit hang).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
