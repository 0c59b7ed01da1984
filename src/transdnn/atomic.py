"""The one way transdnn writes files: to a temporary sibling, then an atomic rename.

A kill at any moment leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from transdnn.errors import OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success.

    `durable=False` skips the fsync: still atomic against a killed process, not against power loss
    (for the per-epoch resume state, rewritten every epoch)."""
    target = Path(path)
    with _writing(target):  # the folder, the temporary file, the caller's writes into it, the rename
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
            yield tmp_path
            if durable:
                with open(tmp_path, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp_path, target)
        finally:
            tmp_path.unlink(missing_ok=True)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """The system's refusal to write (a file in the way, no permission, a full disk) as one line naming
    the file, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot write ({exc.strerror or exc}); expected a folder this user may write to, with free space"
        ) from None


def check_output_folder(folder: Path) -> None:
    """Refuse an output folder that cannot be made, before a job opens runs or trains for hours: the
    nearest existing folder on its path must be a folder this user may write to. Nothing is created."""
    _refuse_unusable(folder, _nearest_existing(folder))


def _refuse_unusable(folder: Path, existing: Path) -> None:
    if not existing.is_dir():
        why = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    else:
        return
    raise OutputError(
        f"{folder}: cannot hold outputs ({why}); expected a folder this user may write to: `out` in params.yaml or --out"
    )


_HELD: set[Path] = set()  # the output folders this process holds: a job inside a job (test's training) holds on


@contextmanager
def output_folder(folder: Path, job: str) -> Iterator[None]:
    """Hold a partition's output folder for one job: a second `transdnn train` or `embed` there (a
    manual one beside `dvc repro`) would clear or replace the first one's checkpoints under it. The lock
    (`<folder>/.transdnn.lock`) is the kernel's, so a killed job leaves nothing held. A job that fails
    before its first output removes the folders it made for the lock: a refused input leaves no trace.
    A folder that cannot be made is refused as `check_output_folder` refuses it. Held again by the
    process that holds it, it stays held until the outer job ends."""
    where = Path(os.path.abspath(folder))
    if where in _HELD:
        yield
        return
    lock = where / ".transdnn.lock"
    existing = _nearest_existing(where)
    _refuse_unusable(folder, existing)
    with _writing(lock):
        where.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "a+")  # noqa: SIM115 (held open for the whole job)
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise OutputError(
                f"{folder}: in use by {holder}; expected one transdnn job per output folder at a time "
                "(wait for it to end, or give this one another `out` or --out)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"`transdnn {job}` (pid {os.getpid()})\n")
        fh.flush()
        _HELD.add(where)
        try:
            yield
        except BaseException:
            if existing != where and [p.name for p in where.iterdir()] == [lock.name]:
                _remove_made(lock, existing)
            raise
        finally:
            _HELD.discard(where)
    finally:
        fh.close()


def _nearest_existing(folder: Path) -> Path:
    """The folder, or the nearest of its parents that exists (absolute)."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def _remove_made(lock: Path, existing: Path) -> None:
    """Remove the lock and the empty folders made for it, up to the folder that existed before."""
    lock.unlink()
    folder = lock.parent
    with contextlib.suppress(OSError):  # a folder another job has written into meanwhile stays
        while folder != existing:
            folder.rmdir()
            folder = folder.parent


def remove_others(folder: Path, pattern: str, kept: set[Path]) -> None:
    """Remove the subfolders of `folder` matching `pattern` that are not `kept`: per-replicate folders an
    earlier run wrote for a replicate this one has not, which belong to another model."""
    for other in folder.glob(pattern):
        if other.is_dir() and other not in kept:
            shutil.rmtree(other)


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


class AlternatingFile:
    """A large file rewritten often (the per-epoch resume state), atomically and without fresh pages.

    Writing a new 500 MB file and renaming it over the old one costs 1-6 s of system time on these
    machines, nearly all of it the kernel taking fresh memory for the new file's pages (on a VM that
    hands freed memory back to its host, each MB costs ~10 ms to take again). Here two buffers
    (`<stem>.0<suffix>`, `<stem>.1<suffix>`) are rewritten in place, alternately, and a small pointer
    file, replaced atomically, names the complete one (~0.06 s for the same bytes). A kill while a buffer
    is written leaves the pointer on the other, complete buffer. Like `durable=False`: safe against a
    killed process, not against power loss.
    """

    def __init__(self, path: Path) -> None:
        self.pointer = path.with_suffix(".current")
        self.buffers = (path.with_suffix(f".0{path.suffix}"), path.with_suffix(f".1{path.suffix}"))

    def exists(self) -> bool:
        return self.pointer.is_file()

    def current(self) -> Path | None:
        """The complete buffer, or None before the first write."""
        if not self.pointer.is_file():
            return None
        name = self.pointer.read_text().strip()
        return next((b for b in self.buffers if b.name == name), None)

    def write(self, writer: Callable[[BinaryIO], Any]) -> Path:
        """Rewrite the other buffer in place, then point at it."""
        target = self.buffers[1] if self.current() == self.buffers[0] else self.buffers[0]
        with _writing(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "r+b" if target.exists() else "wb") as fh:
                writer(fh)
                fh.truncate()
        with atomic_path(self.pointer, durable=False) as tmp:
            tmp.write_text(target.name + "\n")
        return target

    def remove(self) -> None:
        """Pointer first: a kill half-way leaves no pointer to a missing buffer."""
        self.pointer.unlink(missing_ok=True)
        for b in self.buffers:
            b.unlink(missing_ok=True)
