"""What a run asks of the machine: the device, and glibc's reuse of freed blocks during the epochs."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from transdnn.errors import ConfigError, ResourceError
from transdnn.hardware import _glibc, native_bf16, resolve_device, training_device, within_memory

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
