"""What a run asks of the machine: the device, and glibc's reuse of freed blocks during the epochs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from transdnn.errors import ConfigError
from transdnn.hardware import _glibc, resolve_device

# Minor page faults of three steps that each allocate two 48 MB tensors, after four warm-up steps:
# outside the block, inside it, and after it. In a fresh process, so the heap starts the same each time.
_PAGE_FAULTS = """
import json, resource, torch
from transdnn.hardware import reuse_freed_memory

def step():
    a = torch.ones(3072, 4096)
    return float((a * 2)[0, 0])

def faults():
    for _ in range(4):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults()
with reuse_freed_memory(torch.device("cpu")):
    inside = faults()
print(json.dumps([outside, inside, faults()]))
"""


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="option 'device'"):
        resolve_device("tpu")


@pytest.mark.skipif(_glibc() is None, reason="needs glibc")
def test_freed_blocks_are_reused_inside_the_block_only():
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True).stdout
    outside, inside, after = json.loads(out.strip().splitlines()[-1])
    assert outside > 1000, "large tensors are mapped afresh by default"
    assert inside < outside / 4, (inside, outside)
    assert after > 1000, "glibc's defaults are back after the block"
