"""ringllm: run a Llama model far larger than your GPU by streaming its weights
SSD -> pinned shared-memory ring in DRAM -> GPU.

The repository's top-level folders are the architecture; each installs as a subpackage here
(pyproject.toml maps them): ringllm.checkpoint, ringllm.shm, ringllm.coordinator,
ringllm.workers, ringllm.supervisor, ringllm.tools.
"""
import os as _os

__version__ = "0.1.0"

# Imported from a source checkout (Python puts the working directory first on the path, so a
# command run in the repository's root finds this folder before the installed package, editable
# or not), the subpackages are the checkout's top-level folders: look for them there too, as
# pyproject.toml's package-dir maps them. The installed package holds them inside and is unchanged.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "workers")) and _os.path.isfile(
        _os.path.join(_checkout, "workers", "__init__.py")):
    __path__.append(_checkout)
