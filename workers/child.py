"""Entry point of every child process: `python -m ringllm.workers.child`, pickled (module, function,
args) on stdin. Plain subprocesses rather than multiprocessing: no helper processes, no
re-import of the caller's __main__, and the supervisor keeps full control of each child."""
from __future__ import annotations

import importlib
import pickle
import sys


def main() -> None:
    module, function, args = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    getattr(importlib.import_module(module), function)(args)


if __name__ == "__main__":
    main()
