"""What a run asks of the machine: the torch device, and how the CPU allocator treats large tensors."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from transdnn.errors import ConfigError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; naming an absent device is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"option 'device': unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"option 'device': {name!r} requested but no CUDA GPU is available (expected auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"option 'device': {name!r} is not supported (expected auto, cpu, cuda or cuda:N)")
    return device


def keep_freed_memory() -> bool:
    """Let glibc reuse freed large blocks instead of returning them to the kernel.

    glibc maps every allocation above 32 MB afresh and unmaps it on free, so each training step's
    activations and gradients (~90 MB each on cortex) page-fault in anew: ~15 % of a CPU training pass.
    Serving them from the heap and keeping up to 2 GiB of freed memory makes them reusable; the peak
    stays the same, the memory just goes back to the kernel later. Returns False where libc has no
    `mallopt` (macOS); process-wide, so it is called once a CPU training starts.
    """
    path = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(path), "mallopt", None) if path else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
