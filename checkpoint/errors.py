"""The one exception type for input the user can fix (a file, a tensor, a parameter, a limit).

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class RingllmError(Exception):
    """Bad input or an unmet limit, described in one line that names what is wrong."""
