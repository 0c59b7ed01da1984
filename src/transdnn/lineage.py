"""What a training was made from: the record the training workflow builds and tracking logs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

RANKED_ON = ("human", "mouse", "genes", "homology")  # a homology rank's inputs: ranks compare only alike


@dataclass(frozen=True)
class RunSpec:
    """Which partition and data set, the effective settings, the data shapes, the replicate seeds, the
    input files (digested for lineage) and the DVC stage that asked for the training."""

    partition: str
    dataset: str
    params: dict[str, Any]
    info: dict[str, Any]
    seeds: list[int]
    inputs: dict[str, Path]
    stage: str | None = None
