"""What every ringllm child process does first: name itself, die with its parent, leave Ctrl-C
to the supervisor, and log to stderr with its role."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def set_process_name(name: str) -> None:
    """Set /proc/self/comm (what `ps` and `top` show); the kernel keeps 15 characters."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class ParentGone(SystemExit):
    pass


_stop_requested = False


def _on_sigterm(signum, frame):
    # Remember it as well as raising: inside a message-queue wait posix_ipc replaces the
    # exception with SignalError, so loops also poll stop_requested().
    global _stop_requested
    _stop_requested = True
    sys.exit(143)


def stop_requested() -> bool:
    return _stop_requested


def child_start(name: str, parent_pid: int, verbose: bool = False) -> None:
    set_process_name(name)
    # SIGINT reaches the whole foreground process group; the supervisor decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (from the supervisor, or from the kernel when the supervisor dies) -> SystemExit,
    # so that `finally` blocks run.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:    # the parent died before the death signal was armed
        raise ParentGone(1)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=f"[{name}] %(message)s")


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid
