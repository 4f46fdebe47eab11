"""Which compute device `ringllm generate` defaults to, answered without importing torch.

Importing torch took 6 s of the command's start on an H200 host, and the streaming engine's
supervisor needs nothing else from it: the GPU process imports torch itself, in parallel with
the loaders' first reads. So the default device comes from what the machine and the installed
torch say about themselves: an NVIDIA GPU (the driver lists it under /proc/driver/nvidia/gpus),
a torch built with CUDA (torch/version.py), and CUDA_VISIBLE_DEVICES not hiding every GPU. The
GPU process checks with torch itself and ends the run with one line if torch disagrees.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built with (torch.version.cuda), or None."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def nvidia_gpus(proc: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """GPUs the NVIDIA driver lists (0 without the driver)."""
    try:
        return sum(1 for _ in proc.iterdir())
    except OSError:
        return 0


def device_nodes_usable(dev: Path = Path("/dev")) -> bool:
    """/dev/nvidiactl and a /dev/nvidiaN we may open: a container started without its GPUs sees
    the host's /proc/driver/nvidia but not these."""
    ctl = dev / "nvidiactl"
    if not os.access(ctl, os.R_OK | os.W_OK):
        return False
    return any(os.access(p, os.R_OK | os.W_OK) for p in dev.glob("nvidia[0-9]*"))


def all_gpus_hidden(env=os.environ) -> bool:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and visible.strip() in ("", "-1")


def default_device() -> str:
    """'cuda' when this machine and its torch can run CUDA, else 'cpu'."""
    if torch_cuda_version() and nvidia_gpus() and device_nodes_usable() and not all_gpus_hidden():
        return "cuda"
    return "cpu"
