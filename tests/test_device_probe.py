"""The default device without torch (ringllm.device_probe), and a command whose supervisor side
never imports torch (the GPU process does, while the loaders read)."""
from __future__ import annotations

import subprocess
import sys

from ringllm import device_probe
from tests.conftest import make_model_dir


def test_cuda_only_with_a_cuda_torch_a_gpu_and_gpus_visible(tmp_path, monkeypatch):
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    (gpus / "0000:01:00.0").mkdir()
    assert device_probe.nvidia_gpus(gpus) == 1 and device_probe.nvidia_gpus(tmp_path / "none") == 0
    nodes = tmp_path / "dev"
    nodes.mkdir()
    assert not device_probe.device_nodes_usable(nodes)          # a container without its GPUs
    (nodes / "nvidiactl").touch()
    assert not device_probe.device_nodes_usable(nodes)
    (nodes / "nvidia0").touch()
    assert device_probe.device_nodes_usable(nodes)
    monkeypatch.setattr(device_probe, "device_nodes_usable", lambda: True)
    monkeypatch.setattr(device_probe, "nvidia_gpus", lambda: 1)
    monkeypatch.setattr(device_probe, "torch_cuda_version", lambda: "12.4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_probe.default_device() == "cuda"
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert device_probe.default_device() == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert device_probe.default_device() == "cuda"
    monkeypatch.setattr(device_probe, "torch_cuda_version", lambda: None)
    assert device_probe.default_device() == "cpu"
    monkeypatch.setattr(device_probe, "torch_cuda_version", lambda: "12.4")
    monkeypatch.setattr(device_probe, "nvidia_gpus", lambda: 0)
    assert device_probe.default_device() == "cpu"


def test_the_installed_torchs_cuda_version_is_read_without_importing_it():
    import torch     # the reference: torch's own answer
    assert device_probe.torch_cuda_version() == torch.version.cuda


def test_a_streaming_run_never_imports_torch_in_the_command(tmp_path):
    """torch made unimportable in the command's own process: the run still works (its children
    are fresh interpreters and import torch themselves)."""
    d = tmp_path / "m"
    make_model_dir(d, num_hidden_layers=2)
    # argv from sys.argv, as the installed command runs (main(None) imports the engine's modules)
    code = ("import sys; sys.modules['torch'] = None\n"
            f"sys.argv = ['ringllm', 'generate', '--model', {str(d)!r}, '--prompt', 'w3 w4', "
            "'--max-new-tokens', '3', '--loaders', '1']\n"
            "from ringllm.cli import main\n"
            "raise SystemExit(main())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
