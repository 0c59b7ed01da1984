"""CPUs the process may use: the cgroup quota read from v1 and v2 trees, and both thread pools under a real one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transdnn.cpus import cpu_quota, usable_cpus


def test_the_cpu_quota_is_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path: Path):
    """cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us`) trees as the kernel lays them out: a limit set on a
    parent binds its children; no limit anywhere is None; a container's own cgroup, mounted at the root
    while /proc/self/cgroup names the host's path, is still read."""
    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "kubepods" / "cpu.max").write_text("250000 100000\n")
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota("0::/kubepods/pod1\n", v2) == 2.5
    assert cpu_quota("0::/\n", v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n", v1) == 1.5
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota("3:cpu,cpuacct:/\n", v1) is None
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert usable_cpus(proc, v2) == min(2, len(os.sched_getaffinity(0))), "2.5 CPUs keep two threads busy"
    (v2 / "kubepods" / "cpu.max").write_text("garbage\n")
    assert usable_cpus(proc, v2) == len(os.sched_getaffinity(0)), "an unknown layout leaves the threads as they are"


@pytest.fixture
def one_cpu_cgroup() -> Iterator[Path]:
    """A real cgroup v1 with a quota of one CPU per period (root and a writable cpu controller needed)."""
    folder = Path("/sys/fs/cgroup/cpu") / f"transdnn-test-{os.getpid()}"
    try:
        folder.mkdir()
        (folder / "cpu.cfs_quota_us").write_text("100000")
    except OSError:
        pytest.skip("needs a writable cgroup v1 cpu controller (root)")
    yield folder
    folder.rmdir()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch to start more than one thread")
def test_both_thread_pools_fit_a_real_cgroup_cpu_quota(one_cpu_cgroup: Path):
    """A process in a cgroup allowed one CPU, as under `docker run --cpus 1`, sees every core and torch starts a
    thread for each; `resolve_device`, through which every command that computes picks its device, brings them
    down to one, and the loader gathers rows with one thread."""
    # the process moves itself in before torch starts (a preexec_fn is unsafe in a threaded pytest worker)
    script = (
        "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
        "import torch; from transdnn.hardware import resolve_device; "
        "from transdnn.data import _cores; "
        "seen = torch.get_num_threads(); resolve_device('cpu'); print(seen, torch.get_num_threads(), _cores())"
    )
    procs = one_cpu_cgroup / "cgroup.procs"
    out = subprocess.run([sys.executable, "-c", script, str(procs)], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 2 and out[1:] == ["1", "1"], out
