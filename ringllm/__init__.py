"""ringllm: run a Llama model far larger than your GPU by streaming its weights
SSD -> pinned shared-memory ring in DRAM -> GPU.

The repository's top-level folders are the architecture; each installs as a subpackage here
(pyproject.toml maps them): ringllm.checkpoint, ringllm.shm, ringllm.coordinator,
ringllm.workers, ringllm.supervisor, ringllm.tools.
"""
__version__ = "0.1.0"
