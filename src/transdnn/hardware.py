"""What a run asks of the machine: the torch device, the CPU threads, how the CPU allocator treats large tensors,
and running out of memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from transdnn.cpus import usable_cpus
from transdnn.errors import ConfigError, ResourceError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1
_GLIBC_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024))
# what torch's bare RuntimeErrors say when memory ran out: the CPU allocator, a CUDA call, cuBLAS's set-up
_OUT_OF_MEMORY = ("can't allocate memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def resolve_device(name: str) -> torch.device:
    """The device a command computes on, with torch's CPU threads fitted to the CPUs the process may use
    (`fit_cpu_threads`): every command that computes resolves its device here, so none can miss the cap."""
    device = _named_device(name)
    fit_cpu_threads()
    return device


def _named_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; naming an absent device is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"option 'device': unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"option 'device': {name!r} requested but no CUDA GPU is available (expected auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= (n := torch.cuda.device_count()):
        raise ConfigError(
            f"option 'device': {name!r} requested but this machine has {n} CUDA GPU(s) (expected cuda:0 to cuda:{n - 1}, cuda or auto)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"option 'device': {name!r} is not supported (expected auto, cpu, cuda or cuda:N)")
    return device


def training_device(name: str, precision: str) -> torch.device:
    """The device a training runs on, refused where its precision would be emulated: bf16 autocast is an
    opt-in speed-up, and on a device without native bf16 it is a slow-down (a subcortex training pass on a
    2-core AVX2 CPU took 27x as long in bf16 as in fp32)."""
    device = resolve_device(name)
    if precision == "bf16" and not native_bf16(device):
        raise ConfigError(
            f"option 'precision': 'bf16' requested but {_described(device)} has no native bf16, so autocast would "
            "train many times slower than fp32 (expected fp32 here, or bf16 on a CPU with AVX-512 or a GPU of compute capability 8.0 or later)"
        )
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware: on a CUDA GPU of compute capability 8.0 or later (or ROCm), or on
    a CPU where oneDNN runs bf16 natively (AVX-512, AMX, Arm's bf16), by torch's own test."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _described(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    return f"this CPU ({torch.backends.cpu.get_cpu_capability()})"


def fit_cpu_threads() -> int:
    """Cap torch's CPU threads at the CPUs this process may use (`cpus.usable_cpus`); returns the threads it
    keeps. torch sizes its pool by the cores it sees: 64 threads on a 2-CPU container quota spend the epochs
    throttled. On 2 cores, two threads under a 1-CPU quota took 1.2x as long per GEMM as one."""
    cpus = usable_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


@contextmanager
def reuse_freed_memory(device: torch.device) -> Iterator[None]:
    """While training on the CPU, let glibc reuse freed large blocks instead of returning them.

    glibc maps every allocation above 32 MB afresh and unmaps it on free, so each training step's
    activations and gradients (~90 MB each on cortex) page-fault in anew: ~10 % of a CPU training pass.
    Inside this block they come from the heap and freed ones are kept for the next step; on leaving it,
    glibc's defaults return and the kept memory goes back to the kernel. Scoped to the epochs because
    loading and saving allocate in patterns the heap would fragment on (peaks up to 1.7x on 100k rows).
    A no-op off glibc (macOS, musl) and on CUDA.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    try:
        yield
    finally:
        for option, value in _GLIBC_DEFAULTS:
            libc.mallopt(option, value)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def within_memory(what: object, device: torch.device) -> Iterator[None]:
    """Running out of host or GPU memory becomes one line naming the data set and the device, with what a
    user can change, instead of a traceback (torch's CPU allocator raises a bare RuntimeError)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        message = str(exc)
        if not isinstance(exc, MemoryError | torch.OutOfMemoryError) and not any(m in message for m in _OUT_OF_MEMORY):
            raise
        raise ResourceError(
            f"{what}: out of memory on {device}{_failed_allocation(message)}; expected a data set and model that "
            "fit it (fewer train.replicates, smaller model.hidden_units or train.batch_size, another --device)"
        ) from None


def _failed_allocation(message: str) -> str:
    """The size torch (CPU: bytes; CUDA: GiB) or numpy says it could not allocate, if it says one."""
    found = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]iB)", message)
    if found is None:
        return ""
    return f" (an allocation of {int(found[1]) / 2**30:.2f} GiB failed)" if found[1] else f" (an allocation of {found[2]} failed)"
