"""torch's CPU threads in the GPU process: as many as the run may use (affinity mask, cgroup CPU
quota) less one for the coordinator and loaders, or what the user set with OMP_NUM_THREADS."""
from __future__ import annotations

import os

import pytest

from ringllm.checkpoint.layout import load_layout
from ringllm.config import build_config
from ringllm.supervisor.supervisor import Supervisor
from ringllm.workers.generation import SamplingParams
from ringllm.workers.process_setup import cgroup_cpu_quota, torch_threads_for
from tests.conftest import make_model_dir
from tests.test_streaming import assert_run_cleaned


@pytest.mark.parametrize("affinity,quota,expected", [
    (1, None, 1),          # never fewer than one
    (2, None, 1),          # 2 cores: one for torch, one for the coordinator and loaders
    (16, None, 15),
    (16, 4.0, 3),          # a quota of 4 CPUs on a 16-core machine
    (16, 2.5, 1),          # 2.5 CPUs: 2 threads would already exceed it at times
    (8, 0.5, 1),
    (4, 64.0, 3),          # a quota above the affinity mask changes nothing
])
def test_thread_count_from_affinity_and_quota(affinity, quota, expected):
    assert torch_threads_for(affinity, quota) == expected


@pytest.mark.parametrize("cpus,sharers,expected", [(16, 1, 15), (16, 2, 7), (16, 4, 3), (2, 2, 1), (8, 16, 1)])
def test_tensor_parallel_ranks_split_the_cpus(monkeypatch, cpus, sharers, expected):
    """N ranks compute at once: each gets 1/N of the threads one process would (at least one),
    not every rank all of them (N times the threads the CPUs have, spinning against each other)."""
    from ringllm.workers import process_setup

    class FakeTorch:
        threads = None

        def set_num_threads(self, n):
            self.threads = n

        def get_num_threads(self):
            return self.threads

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(process_setup.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(process_setup, "cgroup_cpu_quota", lambda: None)
    assert process_setup.apply_torch_threads(FakeTorch(), sharers) == expected


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path):
    root, own = tmp_path / "cg", tmp_path / "self-cgroup"
    write(own, "0::/user.slice/run\n")
    write(root / "cpu.max", "max 100000\n")
    write(root / "user.slice" / "cpu.max", "300000 100000\n")
    write(root / "user.slice" / "run" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, own) == 3.0
    write(root / "user.slice" / "run" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(root, own) == 1.5
    write(root / "user.slice" / "cpu.max", "max 100000\n")
    write(root / "user.slice" / "run" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, own) is None


def test_cgroup_v1_quota(tmp_path):
    root, own = tmp_path / "cg", tmp_path / "self-cgroup"
    write(own, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, own) is None
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "200000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, own) == 2.0
    # a path that is not visible here (another cgroup namespace): the mount's own files count
    write(own, "3:cpu,cpuacct:/not/here\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000\n")
    assert cgroup_cpu_quota(root, own) == 0.5


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "missing") is None


@pytest.mark.parametrize("omp", [None, "2"])
def test_gpu_process_applies_the_thread_count(tmp_path, monkeypatch, omp):
    """The GPU process reports the threads torch actually uses (Ready info -> metrics JSON)."""
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        cpus = len(os.sched_getaffinity(0))
        quota = cgroup_cpu_quota()
        if quota is not None:
            cpus = min(cpus, max(1, int(quota)))
        expected = max(1, cpus - 1)
    else:
        # the user's choice stands (2: more than the 1 thread a 2-core machine would get; torch
        # itself caps OMP_NUM_THREADS at the core count)
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
        expected = min(int(omp), os.cpu_count())
    d = make_model_dir(tmp_path / "m", num_hidden_layers=2)
    sup = Supervisor(load_layout(d), build_config(loaders=1, cpu_cap=2, gpu_ahead_layers=1), "cpu", "float32")
    result = sup.run([[4, 5]], 2, SamplingParams(), (), lambda i, t: None)
    assert result.gpu_info["torch_threads"] == expected
    assert_run_cleaned(sup)
