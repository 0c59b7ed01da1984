"""The one way transdnn writes files: to a temporary sibling, then an atomic rename.

A kill at any moment leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success.

    `durable=False` skips the fsync: still atomic against a killed process, not against power loss
    (for the per-epoch resume state, rewritten every epoch)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_with(path: str | Path, writer: Callable[[Path], Any], durable: bool = True) -> Path:
    """Run `writer(tmp)` and move its file onto `path` atomically."""
    with atomic_path(path, durable) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame, index: bool = True) -> Path:
    return write_with(path, lambda tmp: frame.to_csv(tmp, index=index))
