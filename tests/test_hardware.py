"""What a run asks of the machine: the device, and glibc's reuse of freed blocks during the epochs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transdnn.errors import ConfigError, ResourceError
from transdnn.hardware import _glibc, cpu_quota, native_bf16, resolve_device, training_device, usable_cpus, within_memory

# Minor page faults of three steps that each allocate two 48 MB tensors: outside the block and inside
# it after four warm-up steps, and right after it. In a fresh process, so the heap starts the same.
# Right after, not after a warm-up: blocks kept in the middle of the heap stay there (glibc trims only
# its top), so a warmed-up loop may reuse them resident; what leaving the block promises is that the
# kept memory went back to the kernel, so the first steps after it fault their pages in again.
_PAGE_FAULTS = """
import json, resource, torch
from transdnn.hardware import reuse_freed_memory

def step():
    a = torch.ones(3072, 4096)
    return float((a * 2)[0, 0])

def faults(warm_up):
    for _ in range(warm_up):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults(4)
with reuse_freed_memory(torch.device("cpu")):
    inside = faults(4)
print(json.dumps([outside, inside, faults(0)]))
"""


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="option 'device'"):
        resolve_device("tpu")


def test_a_cuda_index_beyond_the_machines_gpus_is_refused(monkeypatch: pytest.MonkeyPatch):
    """On a one-GPU machine `cuda:1` is a one-line configuration error, not a traceback from the first copy."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"'cuda:1' requested but this machine has 1 CUDA GPU\(s\) \(expected cuda:0 to cuda:0"):
        resolve_device("cuda:1")


def test_bf16_is_refused_where_the_cpu_would_emulate_it():
    """bf16 autocast is a speed-up only where the hardware has bf16: elsewhere it trains many times slower,
    so the training refuses it in one line instead of running for hours. Which case runs is this machine's."""
    cpu = torch.device("cpu")
    assert training_device("cpu", "fp32") == cpu
    if platform.machine() in ("x86_64", "AMD64"):  # oneDNN runs bf16 natively from AVX-512 on (AMX included)
        assert native_bf16(cpu) == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    if native_bf16(cpu):
        assert training_device("cpu", "bf16") == cpu
    else:
        with pytest.raises(ConfigError, match=r"option 'precision': 'bf16' requested but this CPU \(\w+\) has no native bf16"):
            training_device("cpu", "bf16")


def test_bf16_on_a_gpu_needs_compute_capability_8(monkeypatch: pytest.MonkeyPatch):
    """The CUDA branch, which this CPU machine cannot reach for real: a V100 (7.0) emulates bf16, an A100 (8.0)
    has it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
    assert training_device("cuda", "fp32") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"but cuda \(Tesla V100-SXM2-16GB, compute capability 7\.0\) has no native bf16"):
        training_device("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert training_device("cuda", "bf16") == torch.device("cuda")


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
def test_torch_threads_are_capped_at_a_real_cgroup_cpu_quota(one_cpu_cgroup: Path):
    """A process in a cgroup allowed one CPU, as under `docker run --cpus 1`, sees every core and torch starts a
    thread for each; `resolve_device`, through which every command that computes picks its device, brings them
    down to one."""
    # the process moves itself in before torch starts (a preexec_fn is unsafe in a threaded pytest worker)
    script = (
        "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
        "import torch; from transdnn.hardware import resolve_device; "
        "seen = torch.get_num_threads(); resolve_device('cpu'); print(seen, torch.get_num_threads())"
    )
    procs = one_cpu_cgroup / "cgroup.procs"
    out = subprocess.run([sys.executable, "-c", script, str(procs)], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 2 and out[1] == "1", out


@pytest.mark.skipif(_glibc() is None, reason="needs glibc")
def test_freed_blocks_are_reused_inside_the_block_only():
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True).stdout
    outside, inside, after = json.loads(out.strip().splitlines()[-1])
    assert outside > 1000, "large tensors are mapped afresh by default"
    assert inside < outside / 4, (inside, outside)
    assert after > outside / 4, ("the kept memory went back to the kernel", after, outside)


def test_a_gpu_out_of_memory_is_one_line_and_other_errors_pass_through():
    """The CUDA branch, which this CPU machine cannot reach for real (the CPU one is in test_cli.py):
    torch's own exception type with its own message."""
    cuda_message = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.1 GiB is "
        "free.\nIf reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    gpu = torch.device("cuda:0")
    with pytest.raises(ResourceError) as caught, within_memory("set.h5ad", gpu):
        raise torch.OutOfMemoryError(cuda_message)
    assert str(caught.value).startswith("set.h5ad: out of memory on cuda:0 (an allocation of 2.00 GiB failed); expected")
    assert "\n" not in str(caught.value)
    cublas = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    with pytest.raises(ResourceError, match=r"^set.h5ad: out of memory on cuda:0; expected"), within_memory("set.h5ad", gpu):
        raise RuntimeError(cublas)
    with pytest.raises(RuntimeError, match="shape mismatch"), within_memory("set.h5ad", torch.device("cpu")):
        raise RuntimeError("shape mismatch")
