"""Child processes do not depend on the working directory (issue #23, item 5).

`ringllm generate` run from a folder that holds a `ringllm/` directory of its own (the repository's
root after a non-editable `pip install .`, where `ringllm/` lacks `workers/`) must still start its
children from the installed package: a child started with the working directory first on its
path imports that folder instead and the run ends with "the coordinator process exited
unexpectedly"."""
from __future__ import annotations

import os
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


def _terminated_while_exiting(marker: str) -> None:
    """A child's target that returns while a SIGTERM arrives during its interpreter's exit, as
    when the supervisor stops every child at the end of a failed run (issue #23 item 16)."""
    import atexit
    import os
    import signal
    import time

    from ringllm.workers.process_setup import child_start

    child_start("exiting", os.getppid())       # the SIGTERM handler every child has

    def late_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)       # the handler runs here, inside the atexit callback
    atexit.register(late_sigterm)
    print(marker, flush=True)


def test_a_sigterm_while_a_child_exits_prints_no_traceback(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    log = tmp_path / "log"
    with open(log, "w") as out:     # the child writes to its parent's stdout and stderr
        run = subprocess.run([sys.executable, "-c",
                              "import sys; sys.path.insert(0, sys.argv[1]); from ringllm.workers.child import spawn;"
                              "from tests.test_child_start import _terminated_while_exiting as t;"
                              "p = spawn(t, 'child ran', lambda p: None); sys.exit(p.wait(timeout=60))", root],
                             stdout=out, stderr=subprocess.STDOUT, timeout=120, env={**os.environ, "PYTHONPATH": root})
    text = log.read_text()
    assert "child ran" in text
    assert "Traceback" not in text and "SystemExit" not in text, text


def test_the_checkout_imports_as_the_package_from_its_root():
    """From the repository's root, Python finds the checkout's `ringllm/` before any installed
    copy (the working directory comes first on the path): after a non-editable `pip install .`,
    `python -m pytest` and `python -m ringllm` there import it, and its subpackages must then be
    the checkout's top-level folders. -S leaves out site-packages (and an editable install's
    finder with it); ringllm.workers.sampling needs nothing outside the checkout."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-S", "-c", "import ringllm.workers.sampling as m; print(m.__file__)"],
                         cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == root / "workers" / "sampling.py"
