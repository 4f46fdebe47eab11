"""Child processes do not depend on the working directory (issue #23, item 5).

`ringllm generate` run from a folder that holds a `ringllm/` directory of its own (the repository's
root after a non-editable `pip install .`, where `ringllm/` lacks `workers/`) must still start its
children from the installed package: a child started with the working directory first on its
path imports that folder instead and the run ends with "the coordinator process exited
unexpectedly"."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_model_dir

# The console script pip installs beside the interpreter: like any command, it does not put the
# working directory on its own path, so only the children can pick up the folder's `ringllm/`.
RINGLLM_COMMAND = shutil.which("ringllm", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(RINGLLM_COMMAND is None, reason="no `ringllm` console script beside this Python")
def test_generate_from_a_folder_with_its_own_ringllm_package(tmp_path):
    model = make_model_dir(tmp_path / "m", num_hidden_layers=2)
    common = ["generate", "--model", str(model), "--device", "cpu", "--prompt", "w9 w10", "--no-chat",
              "--max-new-tokens", "4", "--loaders", "1"]
    reference = subprocess.run([RINGLLM_COMMAND, *common, "--resident"], capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0 and reference.stdout.strip(), reference.stderr
    here = tmp_path / "checkout"
    # not the installed package: importing it says so, where the installed one has workers/ and all
    (here / "ringllm").mkdir(parents=True)
    (here / "ringllm" / "__init__.py").write_text(
        'raise ImportError("imported the working directory\'s ringllm/, not the installed package")\n')
    run = subprocess.run([RINGLLM_COMMAND, *common], cwd=here, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == reference.stdout, (run.stdout, reference.stdout)
    assert "working directory" not in run.stderr, run.stderr
