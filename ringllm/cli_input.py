"""What the command line reads from the user (prompts, paths, intervals), checked before anything
starts: a problem is one RingllmError line naming the option or file, not a traceback or a
failure after the processes are up."""
from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

MIN_TOP_INTERVAL_S = 0.05      # `ringllm top` refreshes no faster: below it, it only burns a core
DEFAULT_PROMPT = "What is the capital of France?"
# owner/name, as on the Hugging Face Hub: a --model value of this shape that is not on disk
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _decode_prompt(raw: bytes, label: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RingllmError(f"{label}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                           "prompts are read as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        raise RingllmError(f"{label}: a binary file, not text (NUL byte at offset {nul})")
    return text


def read_prompts(prompts: list[str] | None, prompt_file: Path | None) -> list[tuple[str, str]]:
    """(label naming where the prompt came from, text) for every prompt of --prompt / --prompt-file."""
    if prompt_file is not None:
        if str(prompt_file) == "-":
            label = "--prompt-file - (stdin)"
            return [(label, _decode_prompt(sys.stdin.buffer.read(), label))]
        try:
            raw = prompt_file.read_bytes()
        except OSError as err:
            raise RingllmError(f"{prompt_file}: cannot read prompt file ({err.strerror})") from None
        return [(str(prompt_file), _decode_prompt(raw, str(prompt_file)))]
    if not prompts:
        return [("the default prompt", DEFAULT_PROMPT)]
    if len(prompts) == 1:
        return [("--prompt", prompts[0])]
    return [(f"--prompt #{i + 1}", text) for i, text in enumerate(prompts)]


def check_model_arg(model: Path) -> None:
    """A --model value that is not on disk but reads as a Hub id (owner/name) gets the way forward;
    every other problem with the directory is load_layout's to name."""
    if model.exists() or not HUB_ID.fullmatch(str(model)):
        return
    raise RingllmError(
        f"{model}: no such directory. ringllm reads a local model directory; if {model} is a Hugging Face "
        f"Hub id, download it first: hf download {model} --local-dir DIR (huggingface-cli download in "
        "huggingface_hub < 1.0), then --model DIR")


def check_output_path(path: Path, option: str) -> None:
    """Fail before the run, not after it, when the file it will write cannot be written."""
    parent = path.parent
    if path.is_dir():
        raise RingllmError(f"{option} {path}: is a directory; give a file name")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise RingllmError(f"{option} {path}: the directory {parent} {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise RingllmError(f"{option} {path}: the file is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise RingllmError(f"{option} {path}: the directory {parent} is not writable")


def check_top_interval(interval: float) -> None:
    if not (math.isfinite(interval) and interval >= MIN_TOP_INTERVAL_S):
        raise RingllmError(f"--interval {interval:g}: must be at least {MIN_TOP_INTERVAL_S} seconds")


def default_cache_dir() -> Path:
    if os.environ.get("RINGLLM_CACHE"):
        return Path(os.environ["RINGLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ringllm"
