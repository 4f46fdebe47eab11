"""The one exception type for input the user can fix (a file, a tensor, a parameter, a limit).

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""
import sys


class RingllmError(Exception):
    """Bad input or an unmet limit, described in one line that names what is wrong."""


def report_failure(err: "RingllmError | KeyboardInterrupt") -> int:
    """How a command (the CLI, a bench tool) ends on bad input or Ctrl-C, once its runs have cleaned
    up: one line on stderr and the exit code, `ringllm: error: ...` and 1, or `ringllm: interrupted`
    and 130."""
    if isinstance(err, KeyboardInterrupt):
        print("ringllm: interrupted", file=sys.stderr)
        return 130
    print(f"ringllm: error: {err}", file=sys.stderr)
    return 1
